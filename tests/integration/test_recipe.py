"""``moe-dist-data recipe emoji``: a fake package in the real layout (no npm), the clear error without one,
and the real package through npm.

The real-package test needs npm and the npm registry. It runs wherever npm is on PATH (npm is installed in
CI, so under CI=true it runs and never skips), and fails with npm's own message when the registry cannot be
reached: the recipe is only useful with the registry, and a silent skip would hide that it broke.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

# 12 emoji over 3 categories, in the package's emoji.json layout (fields trimmed to those read plus a few)
FAKE = [
    ("GRINNING FACE", "grinning", "Smileys & Emotion", "1F600"),
    ("WINKING FACE", "wink", "Smileys & Emotion", "1F609"),
    ("FACE WITH TEARS OF JOY", "joy", "Smileys & Emotion", "1F602"),
    ("THINKING FACE", "thinking_face", "Smileys & Emotion", "1F914"),
    ("DOG FACE", "dog", "Animals & Nature", "1F436"),
    ("CAT FACE", "cat", "Animals & Nature", "1F431"),
    ("TIGER FACE", "tiger", "Animals & Nature", "1F42F"),
    ("PENGUIN", "penguin", "Animals & Nature", "1F427"),
    ("Germany Flag", "flag-de", "Flags", "1F1E9-1F1EA"),
    ("France Flag", "flag-fr", "Flags", "1F1EB-1F1F7"),
    ("Japan Flag", "flag-jp", "Flags", "1F1EF-1F1F5"),
    ("Brazil Flag", "flag-br", "Flags", "1F1E7-1F1F7"),
]
MISSING = "1F427"  # PENGUIN's image is left out: one counted failure


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "data_tools.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def _fake_package(root):
    """A directory in emoji-datasource-google's layout; sort_order reverses the file order on purpose."""
    images = root / "img" / "google" / "64"
    images.mkdir(parents=True)
    entries = []
    for i, (name, short, category, unified) in enumerate(FAKE):
        image = f"{unified.lower()}.png"
        entries.append({"name": name, "unified": unified, "image": image, "short_name": short,
                        "short_names": [short], "category": category, "subcategory": "test",
                        "sort_order": 100 - i if category == "Flags" else i, "has_img_google": True})
        if unified != MISSING:
            # transparent except a coloured square: the recipe flattens it onto white
            img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
            img.paste((40 * (i % 6), 20 * i, 200, 255), (16, 16, 48, 48))
            img.save(images / image)
    (root / "emoji.json").write_text(json.dumps(entries))
    (root / "package.json").write_text(json.dumps({"name": "emoji-datasource-google", "version": "0.0.0-test"}))
    return root


def _samples(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".tar"):
            with tarfile.open(directory / name) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_recipe_from_a_package_directory(tmp_path):
    pkg = _fake_package(tmp_path / "package")
    out = tmp_path / "emoji"
    res = _run("recipe", "emoji", "--out", str(out), "--from", str(pkg), "--val-fraction", "0.3", "--seed", "1",
               "--size", "32", "-q")
    assert res.returncode == 0, res.stderr
    assert "12 inputs: 11 written, 1 failed (missing_image_file: 1)" in res.stdout
    assert "3 classes (Smileys & Emotion: 4, Animals & Nature: 4, Flags: 4)" in res.stdout

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["written"] == 11 and manifest["failed"][0]["reason"] == "missing_image_file"
    assert MISSING in manifest["failed"][0]["input"]
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"] == 11
    assert manifest["splits"]["val"]["samples"] > 0  # seed 1, fraction 0.3: a split of each kind

    classes = json.loads((out / "classes.json").read_text())
    assert classes["classes"] == ["Smileys & Emotion", "Animals & Nature", "Flags"]  # order of first sort_order
    assert all("{}" in t for t in classes["templates"])

    samples = {**_samples(out / "train"), **_samples(out / "val")}
    by_caption = {s["txt"].decode(): s for s in samples.values()}
    assert set(by_caption) == {name.lower() for name, _, _, u in FAKE if u != MISSING}
    # keys follow sort_order: the flags are listed last-first, so Brazil (sort_order 89) is the first flag, key 8
    assert json.loads(samples["000000008"]["json"])["short_name"] == "flag-br"
    for caption, sample in by_caption.items():
        meta = json.loads(sample["json"])
        name, short, category, _ = next(f for f in FAKE if f[0].lower() == caption)
        assert meta["category"] == category and classes["classes"][meta["label"]] == category
        assert meta["short_name"] == short
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.size == (32, 32) and image.mode == "RGB"
        assert image.getpixel((0, 0)) == (255, 255, 255)  # transparency became white

    res = _run("validate", str(out / "train"), "-q")
    assert res.returncode == 0 and "0 broken" in res.stdout, res.stdout + res.stderr
    res = _run("validate", str(out / "val"), "-q")
    assert res.returncode == 0 and "0 broken" in res.stdout, res.stdout + res.stderr

    # deterministic: the same package from a .tgz (npm's layout: everything under package/) gives the same bytes
    tgz = tmp_path / "pkg.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(pkg, arcname="package")
    again = tmp_path / "again"
    res = _run("recipe", "emoji", "--out", str(again), "--from", str(tgz), "--val-fraction", "0.3", "--seed", "1",
               "--size", "32", "-q")
    assert res.returncode == 0, res.stderr
    for split in ("train", "val"):
        for name in os.listdir(out / split):
            if name.endswith(".tar"):
                assert (out / split / name).read_bytes() == (again / split / name).read_bytes()


def test_tarball_members_are_read_never_extracted(tmp_path):
    """Hostile members (absolute, '..', a symlink to /etc/passwd) are neither written nor read as images."""
    pkg = _fake_package(tmp_path / "src")
    tgz = tmp_path / "evil.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(pkg, arcname="package")
        for name in ("../escaped.txt", "/tmp/absolute-escape.txt"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
        link = tarfile.TarInfo("package/img/google/64/1f427.png")  # the missing image, as a symlink
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    work = tmp_path / "work"
    work.mkdir()
    res = subprocess.run([sys.executable, "-m", "data_tools.cli", "recipe", "emoji", "--out", "out", "--from",
                          str(tgz), "-q"], cwd=work, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "11 written, 1 failed (missing_image_file: 1)" in res.stdout  # the symlink is not an image
    assert not (tmp_path / "escaped.txt").exists() and not (work / "escaped.txt").exists()
    assert sorted(os.listdir(work / "out")) == ["classes.json", "manifest.json", "train", "val"]


def test_without_npm_or_from_fails_in_one_line(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}  # no npm (and no anything) on PATH
    res = _run("recipe", "emoji", "--out", str(tmp_path / "out"), env=env)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "npm is not on PATH and --from is not given" in lines[0] and "--from PATH" in lines[0]
    assert not (tmp_path / "out").exists()

    res = _run("recipe", "emoji", "--out", str(tmp_path / "out"), "--from", str(tmp_path / "nowhere"), env=env)
    assert res.returncode == 2 and "does not exist" in res.stderr and len(res.stderr.strip().splitlines()) == 1

    res = _run("recipe", "emoji", "--out", str(tmp_path / "out"), "--from", str(empty), env=env)
    assert res.returncode == 2 and "has no emoji.json" in res.stderr, res.stderr


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed (CI installs it: never skipped there)")
def test_real_package_through_npm(tmp_path):
    out = tmp_path / "emoji"
    res = _run("recipe", "emoji", "--out", str(out), "-q")
    assert res.returncode == 0, f"npm pack needs the npm registry: {res.stderr}"
    manifest = json.loads((out / "manifest.json").read_text())
    classes = json.loads((out / "classes.json").read_text())["classes"]
    # emoji-datasource-google 16.0.0: 1,911 emoji, every image present, 10 categories; 166 in val at seed 0
    assert manifest["written"] == 1911 and manifest["failed_count"] == 0
    assert manifest["splits"]["val"]["samples"] == 166
    assert len(classes) == 10 and "Flags" in classes and "Smileys & Emotion" in classes
    res = _run("validate", str(out / "val"), "-q")
    assert res.returncode == 0, res.stdout + res.stderr

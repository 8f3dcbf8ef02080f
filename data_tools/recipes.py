"""``moe-dist-data recipe NAME``: real image-text datasets built from packages anyone can fetch, no model hub.

    emoji   the npm package emoji-datasource-google (MIT; images are Noto Emoji, Apache-2.0): one
            64-px PNG per emoji (~1,900) captioned with its CLDR name ("grinning face with smiling
            eyes"); its ~10 categories ("Smileys & Emotion", "Flags", ...) are zero-shot labels.

Outline of ``emoji_items`` / ``build_recipe``:
    1. find the package: ``--from PATH`` (an unpacked package directory, the directory holding its
       ``package/``, or the .tgz), else ``npm pack`` of the pinned version into a temporary directory,
       else one clear error;
    2. a .tgz is read in place with tarfile, never extracted: only regular-file members are looked up,
       by exact names built from plain file names, so no member can write (or point) outside anything;
    3. emoji.json in ``sort_order``; the classes are the categories in order of first appearance;
    4. each image is flattened onto white (the PNGs are RGBA on transparent) and resized to --size;
       an emoji whose image is missing is a failed input (manifest "failed", reason missing_image_file);
    5. shard_items writes the shards (train/val split by key hash with --seed, so it is deterministic),
       and classes.json ({"classes", "templates"}, as ``moe-dist-data synth`` writes) goes beside them.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

from .sources import Item

EMOJI_PACKAGE = "emoji-datasource-google"
EMOJI_VERSION = "16.0.0"  # pinned: the same version gives the same samples, keys and split
EMOJI_IMAGES = "img/google/64"
EMOJI_TEMPLATES = ["an emoji from the category {}.", "a {} emoji.", "an icon of {}."]
NPM_TIMEOUT_S = 600


class PackageFiles:
    """Read-only access to the files of an npm package: a directory, or a .tgz read in place.

    A .tgz is read in one sequential pass into memory (the files under ``wanted`` prefixes, ~15 MB for
    the emoji package): looking members up one by one would re-decompress the gzip stream on every
    backward seek."""

    def __init__(self, path: str, label: Optional[str] = None, wanted=("",)):
        self.path = label or path  # what messages and the manifest call it
        self._files: Optional[Dict[str, bytes]] = None
        if os.path.isdir(path):
            nested = os.path.join(path, "package")
            self.root = nested if not os.path.isfile(os.path.join(path, "emoji.json")) and os.path.isdir(nested) \
                else path
        elif os.path.isfile(path):
            self._files = _read_tar(path, wanted)
            self.root = ""
            if "emoji.json" not in self._files and "package/emoji.json" in self._files:
                self._files = {k[len("package/"):]: v for k, v in self._files.items() if k.startswith("package/")}
        else:
            raise ValueError(f"--from {path} does not exist; give the unpacked {EMOJI_PACKAGE} directory or its .tgz")

    def read(self, relpath: str) -> Optional[bytes]:
        """The bytes of ``relpath`` (a '/'-separated path inside the package), or None if absent."""
        if self._files is not None:
            return self._files.get(relpath)
        full = os.path.join(self.root, *relpath.split("/"))
        if not os.path.isfile(full):
            return None
        with open(full, "rb") as f:
            return f.read()


def _read_tar(path: str, wanted) -> Dict[str, bytes]:
    """Regular-file members of a tarball whose names (less a leading "./" or "package/") start with one
    of ``wanted``, by name; links, devices and directories are never read, nothing is written."""
    files: Dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|*") as tar:  # streaming: one pass, no seeks
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                inner = name[len("package/"):] if name.startswith("package/") else name
                if member.isfile() and any(inner.startswith(w) for w in wanted):
                    handle = tar.extractfile(member)
                    files[name] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(f"--from {path} is neither a directory nor a readable .tgz ({err})") from None
    return files


def npm_pack(package: str, dest: str) -> str:
    """``npm pack package`` into ``dest``; returns the .tgz path.

    Raises:
        ValueError: npm is not on PATH, or it failed (no registry access, unknown version).
    """
    npm = shutil.which("npm")
    if npm is None:
        raise ValueError(f"recipe emoji needs the npm package {package}: npm is not on PATH and --from is not given; "
                         "install Node.js/npm, or fetch the tarball elsewhere (npm pack "
                         f"{package}) and pass --from PATH (the .tgz or its unpacked directory)")
    try:
        res = subprocess.run([npm, "pack", package, "--silent"], cwd=dest, capture_output=True, text=True,
                             timeout=NPM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ValueError(f"npm pack {package} took over {NPM_TIMEOUT_S} s (is the npm registry reachable?); "
                         "fetch the tarball elsewhere and pass --from PATH") from None
    tarballs = sorted(glob.glob(os.path.join(dest, "*.tgz")))
    if res.returncode != 0 or not tarballs:
        last = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1][:300]
        raise ValueError(f"npm pack {package} failed ({last}); is the npm registry reachable? Fetch the tarball "
                         "elsewhere and pass --from PATH")
    return tarballs[0]


def _flatten(data: bytes, size: int) -> bytes:
    """An RGBA PNG composited onto white, resized to ``size`` x ``size``, as PNG bytes."""
    from PIL import Image

    from moe_dist.data.decode import to_rgb

    with Image.open(io.BytesIO(data)) as img:
        image = to_rgb(img)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def emoji_caption(entry: dict) -> str:
    """The CLDR name in lower case ("GRINNING FACE" -> "grinning face"); the short name if it has none."""
    name = entry.get("name") or str(entry.get("short_name") or "").replace("_", " ")
    return " ".join(str(name).lower().split())


@dataclass
class RecipeData:
    """What a recipe yields: the items (in key order), the zero-shot classes and templates, and a
    description of the source for the manifest."""

    items: Iterator[Item]
    classes: List[str]
    templates: List[str]
    source: str
    total: int
    counts: Dict[str, int] = field(default_factory=dict)  # entries per class


def emoji_items(files: PackageFiles, size: int = 64) -> RecipeData:
    """The emoji of an emoji-datasource package as Items; see the module docstring.

    Raises:
        ValueError: the package has no readable emoji.json list.
    """
    raw = files.read("emoji.json")
    try:
        entries = json.loads(raw) if raw is not None else None
    except ValueError as err:
        raise ValueError(f"{files.path}: emoji.json is not valid JSON ({err})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{files.path} is not the {EMOJI_PACKAGE} package: it has no emoji.json list (give the "
                         "directory that holds emoji.json, the one above its package/, or the .tgz)")
    entries = sorted((e for e in entries if isinstance(e, dict)), key=lambda e: e.get("sort_order", 0))
    classes: List[str] = []
    for e in entries:
        if e.get("category") and e["category"] not in classes:
            classes.append(e["category"])
    entries = [e for e in entries if e.get("category")]
    counts = {c: sum(e["category"] == c for e in entries) for c in classes}
    meta = _package_json(files)
    source = f"{meta.get('name', EMOJI_PACKAGE)}@{meta.get('version', '?')} ({files.path})"
    return RecipeData(_emoji_stream(files, entries, classes, size), classes, EMOJI_TEMPLATES, source, len(entries),
                      counts)


def _package_json(files: PackageFiles) -> dict:
    try:
        data = json.loads(files.read("package.json") or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _emoji_stream(files: PackageFiles, entries: List[dict], classes: List[str], size: int) -> Iterator[Item]:
    for e in entries:
        image = str(e.get("image") or "")
        ref = f"emoji.json:{e.get('unified', '?')}"
        caption = emoji_caption(e)
        meta = {"label": classes.index(e["category"]), "category": e["category"],
                "subcategory": e.get("subcategory"), "short_name": e.get("short_name"), "unified": e.get("unified")}
        # a plain file name only: "a/b" or ".." could name something else in the package
        if not image or image != os.path.basename(image) or image in (".", ".."):
            yield Item(ref, caption, meta=meta, failure="missing_image_file")
            continue
        data = files.read(f"{EMOJI_IMAGES}/{image}")
        if data is None:
            yield Item(ref, caption, meta=meta, failure="missing_image_file")
            continue
        try:
            data = _flatten(data, size)
        except Exception:  # noqa: BLE001 - handed on as is: shard's decode check names the failure
            pass
        yield Item(ref, caption, data=data, ext="png", meta=meta)


@dataclass(frozen=True)
class Recipe:
    """A recipe: the npm package (pinned) it reads, the package files it needs, and its builder."""

    name: str
    package: str
    wanted: tuple
    build: Callable[[PackageFiles, int], RecipeData]


RECIPES: Dict[str, Recipe] = {
    "emoji": Recipe("emoji", f"{EMOJI_PACKAGE}@{EMOJI_VERSION}", ("emoji.json", "package.json", EMOJI_IMAGES + "/"),
                    emoji_items),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def build_recipe(name: str, out: str, from_path: Optional[str], opts, size: int = 64, progress: bool = True,
                 overwrite: bool = False):
    """Build recipe ``name`` into ``out`` (shards, manifest.json, classes.json).

    Args:
        from_path: the package (directory or .tgz); None runs ``npm pack`` into a temporary directory.
        opts: data_tools.shard.ShardOptions (per-shard, val fraction, seed, workers).
        size: image side in pixels.

    Returns:
        (manifest, RecipeData) of the written dataset.
    """
    from .publish import write_json

    from .shard import shard_items

    recipe = get_recipe(name)
    if size < 1:
        raise ValueError(f"--size {size} must be >= 1")
    if from_path:
        files = PackageFiles(from_path, wanted=recipe.wanted)
    else:
        with tempfile.TemporaryDirectory(prefix="moe-dist-recipe-") as tmp:  # the .tgz is read, then removed
            files = PackageFiles(npm_pack(recipe.package, tmp), f"npm pack {recipe.package}", recipe.wanted)
    data = recipe.build(files, size)
    manifest = shard_items(data.items, out, opts, source=f"recipe {name}: {data.source}", total=data.total,
                           progress=progress, overwrite=overwrite)
    write_json(out, "classes.json", {"classes": data.classes, "templates": data.templates})
    return manifest, data

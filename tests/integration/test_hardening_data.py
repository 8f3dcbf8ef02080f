"""Issue 10, data and run-config side: each test reproduces one hole with real processes and files.

    item 1   no shell (or any non-local URL) from a data spec, after every expansion and indirection
    item 5   shards shorter than their manifest are a reported failure, not silent padding
    item 6   one bad input row never aborts ``moe-dist-data shard``; --out always matches its manifest
    item 8   every run-config field and data path is checked before training starts
    item 11  CSV paths may not leave the input directory; unused members are not read into memory

The commands run through their console scripts (``moe-dist-data``, ``moe-dist train``); the loader
through ``moe_dist.data``.
"""

import concurrent.futures
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers import proc
from helpers.data import ZeroTokenizer, blank_transform
from helpers.train import RUN_CONFIG, make_synth, overrides, run

DATA_CLI = "moe-dist-data"


# ------------------------------------------------------------------ helpers
def cli(*args, cwd=None, env=None, timeout=120):
    return proc.run([str(a) for a in args], timeout, cwd=cwd, env=env)


def data_cli(*args, **kw):
    return cli(DATA_CLI, *args, "-q", **kw)


def tail(res, n=1500):
    return f"exit {res.returncode}\n--- stdout\n{res.stdout[-n:]}\n--- stderr\n{res.stderr[-n:]}"


def error_lines(text):
    return [line for line in text.splitlines() if "error" in line.lower()]


def assert_refused(res, *tokens):
    """Exit 2 with exactly one error line (no traceback) that mentions every token."""
    assert res.returncode == 2, f"expected a refusal (exit 2)\n{tail(res)}"
    assert "Traceback" not in res.stderr, tail(res)
    errors = error_lines(res.stderr)
    assert len(errors) == 1, f"expected one error line, got {errors}\n{tail(res)}"
    for token in tokens:
        assert token in errors[0], f"{token!r} not named in {errors[0]!r}"


def write_png(path, size=8, noise=False):
    data = os.urandom(size * size * 3) if noise else bytes([200, 30, 30]) * (size * size)
    Image.frombytes("RGB", (size, size), data).save(path, format="PNG")
    return path


def samples_in(tar_path):
    with tarfile.open(tar_path) as tar:
        return len({sample_key(m) for m in tar if m.isfile()})


def sample_key(member):
    return member.name.split(".", 1)[0]


def rewrite_tar(path, keep_samples=None, extra=None):
    """Rewrite a shard in place with its first ``keep_samples`` samples; ``extra`` {suffix: bytes} adds
    members to the first sample."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    keys = sorted({sample_key(m) for m, _ in members})[:keep_samples]
    kept = [(m, data) for m, data in members if sample_key(m) in keys]
    added = []
    for suffix, data in (extra or {}).items():
        info = tarfile.TarInfo(f"{sample_key(kept[0][0])}.{suffix}")
        info.size = len(data)
        added.append((info, data))
    with tarfile.open(path, "w") as tar:
        for member, data in kept[:1] + added + kept[1:]:
            tar.addfile(member, io.BytesIO(data))


def top_manifest(out):
    with open(out / "manifest.json") as f:
        return json.load(f)


def listed_shards(split_dir):
    path = split_dir / "manifest.json"
    if not path.exists():
        return {}
    with open(path) as f:
        return {s["name"]: s["samples"] for s in json.load(f)["shards"]}


def assert_manifest_matches_disk(out):
    """Each directory under ``out`` holds exactly the shards its manifest lists, with the listed sample
    counts; the top manifest (if any) describes exactly those directories and their totals."""
    dirs = {p.parent for p in out.rglob("*.tar")} | {p.parent for p in out.glob("*/manifest.json")}
    on_disk = {}
    for directory in sorted(dirs):
        tars, listed = sorted(p.name for p in directory.glob("*.tar")), listed_shards(directory)
        assert tars == sorted(listed), f"{directory}: shards on disk {tars} != its manifest {sorted(listed)}"
        real = {name: samples_in(directory / name) for name in listed}
        assert real == listed, f"{directory}: samples on disk {real} != its manifest {listed}"
        on_disk[str(directory.relative_to(out))] = sum(listed.values())
    if (out / "manifest.json").exists():
        manifest = top_manifest(out)
        described = {split["path"]: split["samples"] for split in manifest["splits"].values()}
        assert described == on_disk, f"manifest.json describes {described}; on disk: {on_disk}"
        assert manifest["written"] == sum(described.values())


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("synth"), n=120)


@pytest.fixture(scope="module")
def shard0(synth):
    return synth / "train" / "train-000000.tar"


@pytest.fixture
def images(tmp_path):
    """An input directory with two small images a.png and b.png."""
    directory = tmp_path / "in"
    directory.mkdir()
    for name in ("a.png", "b.png"):
        write_png(directory / name)
    return directory


def write_table(directory, name, rows):
    """rows: dicts (CSV) or, for .jsonl, dicts or raw lines."""
    path = directory / name
    if name.endswith(".jsonl"):
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "caption"])
            writer.writeheader()
            writer.writerows(rows)
    return path


def shard_table(path, out, *flags, per_shard=100):
    return data_cli("shard", path, "--out", out, "--per-shard", per_shard, *flags)


def assert_counted(res, out, written, failed, reason_has=""):
    assert res.returncode == 0, tail(res)
    manifest = top_manifest(out)
    assert (manifest["written"], manifest["failed_count"]) == (written, failed), manifest["failed"]
    assert all(f["reason"] and reason_has in f["reason"] for f in manifest["failed"]), manifest["failed"]
    assert_manifest_matches_disk(out)


# ------------------------------------------------------------------ item 1: no shell from a data spec
SUBCOMMAND_ARGS = {"validate": [], "stats": [], "tokenizer": ["--out", "{tmp}/tok.model", "--vocab-size", "50"],
                   "shard": ["--out", "{tmp}/resharded"]}


@pytest.mark.parametrize("command", sorted(SUBCOMMAND_ARGS))
def test_brace_pattern_cannot_smuggle_a_pipe(command, shard0, tmp_path):
    marker = tmp_path / "pwned"
    spec = f"{{pipe:touch {marker},{shard0}}}"
    args = [a.format(tmp=tmp_path) for a in SUBCOMMAND_ARGS[command]]
    res = data_cli(command, spec, *args)
    assert not marker.exists(), f"{command} ran the shell command of a pipe: alternative\n{tail(res)}"
    assert_refused(res)


def test_joined_source_cannot_smuggle_a_pipe(shard0, tmp_path):
    marker = tmp_path / "pwned"
    res = data_cli("validate", f"{shard0}::{{pipe:touch {marker},{shard0}}}")
    assert not marker.exists(), f"the second '::' source ran a shell command\n{tail(res)}"
    assert_refused(res)


@pytest.mark.parametrize("index", ["manifest.json", "sizes.json"])
def test_shard_names_from_an_index_file_cannot_be_pipes(index, shard0, tmp_path):
    """Guard: names listed in a manifest.json / sizes.json are checked like the spec itself."""
    directory, marker = tmp_path / "shards", tmp_path / "pwned"
    directory.mkdir()
    shutil.copy(shard0, directory / "a.tar")
    entries = {"a.tar": samples_in(shard0), f"pipe:touch {marker}": 1}
    content = {"shards": [{"name": k, "samples": v} for k, v in entries.items()]} if index == "manifest.json" \
        else entries
    (directory / index).write_text(json.dumps(content))
    res = data_cli("validate", directory)
    assert not marker.exists(), tail(res)
    assert_refused(res)


@pytest.mark.parametrize("url", ["http://host/s.tar", "https://host/s.tar", "file:host/s.tar"])
def test_non_local_urls_are_refused(url, shard0, tmp_path):
    """A look-alike local file (./http:/host/s.tar) makes today's existence check pass, so only a scheme
    check can refuse; a stub curl on PATH shows whether a download was attempted. http(s):// URLs are
    read by moe_dist's own client (issue 14), never by curl: an unknown host is one error line."""
    for lookalike in (tmp_path / url.replace("//", "/"), tmp_path / "host" / "s.tar"):
        lookalike.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shard0, lookalike)
    marker, stubs = tmp_path / "curl-ran", tmp_path / "bin"
    stubs.mkdir()
    (stubs / "curl").write_text(f"#!/bin/sh\ntouch {marker}\nexit 22\n")
    (stubs / "curl").chmod(0o755)
    env = dict(os.environ, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}")
    res = data_cli("validate", url, cwd=tmp_path, env=env)
    assert not marker.exists(), f"{url} was fetched with curl\n{tail(res)}"
    assert_refused(res)


def test_resolve_spec_refuses_a_pipe_inside_braces(shard0, tmp_path):
    from moe_dist.data import resolve_spec

    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match="pipe"):
        resolve_spec(f"{{pipe:touch {marker},{shard0}}}")
    assert not marker.exists()


# ------------------------------------------------------------------ item 5: shards shorter than their manifest
@pytest.fixture
def short_shards(synth, tmp_path):
    """A copy of the synth train shards whose first shard holds 5 samples; its manifest still says more."""
    directory = tmp_path / "short"
    shutil.copytree(synth / "train", directory)
    rewrite_tar(directory / "train-000000.tar", keep_samples=5)
    return directory


def test_validate_reports_a_manifest_mismatch(short_shards):
    res = data_cli("validate", short_shards)
    assert res.returncode == 1, f"validate accepted a shard shorter than its manifest\n{tail(res)}"
    assert "manifest" in (res.stdout + res.stderr).lower(), tail(res)


def test_loader_raises_on_a_short_shard_instead_of_padding(short_shards):
    from moe_dist.data import DataError, LoaderConfig, ShardLoader

    cfg = LoaderConfig(spec=str(short_shards), batch_size=16, mode="exact", workers=0, max_failure_fraction=0.0)
    loader = ShardLoader(cfg, ZeroTokenizer(), transform=blank_transform())
    with pytest.raises(DataError, match=r"(?i)short|fewer|manifest|truncat|missing"):
        for _ in loader:
            pass


# ------------------------------------------------------------------ item 6: one bad row must not abort shard
BAD_ROWS = {
    "csv_oversized_field": ("t.csv", {"image": "b.png", "caption": "x" * 200_000}),
    "jsonl_number_caption": ("t.jsonl", {"image": "b.png", "caption": 5}),
    "jsonl_list_caption": ("t.jsonl", {"image": "b.png", "caption": ["a", "list"]}),
    "jsonl_invalid_line": ("t.jsonl", '{"image": "b.png", "caption": '),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_one_bad_row_is_a_counted_failure(case, images, tmp_path):
    name, bad = BAD_ROWS[case]
    good = [{"image": "a.png", "caption": "a red square"}, {"image": "b.png", "caption": "another red square"}]
    path = write_table(images, name, [good[0], bad, good[1]])
    out = tmp_path / "out"
    assert_counted(shard_table(path, out), out, written=2, failed=1)


@pytest.mark.parametrize("flags, length", [(["--max-caption-chars", "100"], 500), ([], 20_000)],
                         ids=["flag", "default"])
def test_captions_over_the_length_cap_are_counted(flags, length, images, tmp_path):
    rows = [{"image": "a.png", "caption": "a red square"}, {"image": "b.png", "caption": "y" * length}]
    out = tmp_path / "out"
    assert_counted(shard_table(write_table(images, "t.csv", rows), out, *flags), out, written=1, failed=1,
                   reason_has="caption")


def test_resharding_into_an_existing_out_never_mixes_datasets(images, tmp_path):
    out = tmp_path / "out"
    first = write_table(images, "first.csv", [{"image": "a.png", "caption": f"square {i}"} for i in range(8)])
    assert shard_table(first, out, "--val-fraction", "0.5", per_shard=2).returncode == 0
    second = write_table(images, "second.csv", [{"image": "b.png", "caption": "one"}, {"image": "a.png",
                                                                                     "caption": "two"}])
    res = shard_table(second, out, per_shard=2)
    if res.returncode == 2:  # refusing is allowed; then the first dataset is intact
        assert error_lines(res.stderr), tail(res)
    else:
        assert res.returncode == 0, tail(res)
    assert_manifest_matches_disk(out)


def test_io_failure_leaves_no_partial_shard(images, tmp_path):
    """Four small then four ~75 KB images, four per shard, under a 200 KB file-size limit: the second
    shard cannot be written whole."""
    rows = [{"image": "a.png", "caption": f"small {i}"} for i in range(4)]
    for i in range(4):
        write_png(images / f"big{i}.png", size=160, noise=True)
        rows.append({"image": f"big{i}.png", "caption": f"noise {i}"})
    path, out = write_table(images, "t.csv", rows), tmp_path / "out"
    script = f"ulimit -f 200; exec {DATA_CLI} shard {path} --out {out} --per-shard 4 -q"
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0, f"the file-size limit was not hit; make the images bigger\n{tail(res)}"
    assert "Traceback" not in res.stderr and len(error_lines(res.stderr)) == 1, tail(res)
    assert "error" in top_manifest(out), "the manifest does not say that the run stopped early"
    assert_manifest_matches_disk(out)


# ------------------------------------------------------------------ item 11: paths and unused members
@pytest.fixture
def outside_table(images, tmp_path):
    """One good row, then rows whose image lies outside the CSV's directory: ../, absolute, symlink."""
    outside = write_png(tmp_path / "outside.png")
    (images / "link.png").symlink_to("../outside.png")
    rows = [{"image": "a.png", "caption": "inside"}] + [{"image": p, "caption": "outside"}
                                                        for p in ("../outside.png", str(outside), "link.png")]
    return write_table(images, "t.csv", rows)


def test_paths_outside_the_input_directory_are_refused(outside_table, tmp_path):
    out = tmp_path / "out"
    assert_counted(shard_table(outside_table, out), out, written=1, failed=3)


def test_allow_outside_paths_flag_reads_them(outside_table, tmp_path):
    out = tmp_path / "out"
    assert_counted(shard_table(outside_table, out, "--allow-outside-paths"), out, written=4, failed=0)


def peak_rss_kb(*args):
    """Peak RSS of one ``moe-dist-data`` run, measured in a fresh parent that has no other children."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True); "
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    res = cli(sys.executable, "-c", probe, DATA_CLI, *args)
    rc, rss = map(int, res.stdout.split())
    assert rc == 0, f"{args} failed\n{tail(res)}"
    return rss


def test_validate_does_not_read_unused_members(shard0, tmp_path):
    plain, big = tmp_path / "plain.tar", tmp_path / "big.tar"
    shutil.copy(shard0, plain)
    shutil.copy(shard0, big)
    rewrite_tar(big, extra={"npy": b"\0" * (50 << 20)})
    grown_mb = (peak_rss_kb("validate", big, "-q") - peak_rss_kb("validate", plain, "-q")) / 1024
    assert grown_mb < 25, f"a 50 MB .npy member raised validate's peak RSS by {grown_mb:.0f} MB"


# ------------------------------------------------------------------ item 8: config validation up front
CONFIG_CASES = {
    "logging.every=0": ({"logging.every": 0}, "logging.every"),
    "steps=ten": ({"steps": "ten"}, "steps"),
    "checkpoint.every=-1": ({"checkpoint.every": -1}, "checkpoint.every"),
    "eval.every=-1": ({"eval.every": -1}, "eval.every"),
    "max_nonfinite_steps=-1": ({"max_nonfinite_steps": -1}, "max_nonfinite_steps"),
    "data.shuffle_buffer=-5": ({"data.shuffle_buffer": -5}, "shuffle_buffer"),
    "data.epoch_samples=-1": ({"data.epoch_samples": -1}, "epoch_samples"),
    "duplicate_yaml_key": ({}, "seed"),
    "data.val_without_shards": ({"data.val": "{empty}"}, "data.val"),
}
TRAIN_TIMEOUT_S = 90


def _train_case(name, synth, root):
    sets, _ = CONFIG_CASES[name]
    work = root / name
    (work / "empty").mkdir(parents=True)  # a data.val with no shards
    config = RUN_CONFIG
    if name == "duplicate_yaml_key":
        config = work / "dup.yaml"
        config.write_text(Path(RUN_CONFIG).read_text() + "\nseed: 1\n")
    sets = {k: str(v).format(empty=work / "empty") for k, v in sets.items()}
    extra = {"data.workers": 0, "steps": 2, "ep_size": 1, **sets}
    cmd = ["moe-dist", "train", "--config", str(config)] + overrides(synth, work / "run", **extra)
    start = time.monotonic()
    try:
        res = run(cmd, timeout=TRAIN_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:  # its output comes back as bytes even with text=True
        stdout = (err.stdout or b"").decode(errors="replace")
        res = subprocess.CompletedProcess(cmd, -9, stdout, f"timed out after {TRAIN_TIMEOUT_S} s")
    return res, work / "run", time.monotonic() - start


@pytest.fixture(scope="module")
def config_runs(synth, tmp_path_factory):
    """All config cases, two at a time (each is one `moe-dist train` process)."""
    root = tmp_path_factory.mktemp("config")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(_train_case, name, synth, root) for name in CONFIG_CASES}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_is_refused_before_training(case, config_runs):
    res, out, seconds = config_runs[case]
    started = [p.name for p in (out / "checkpoints", out / "metrics.jsonl") if p.exists()]
    assert not started, f"{case}: training started before the config was refused ({started} written)\n{tail(res)}"
    assert_refused(res, CONFIG_CASES[case][1])
    assert seconds < 60, f"{case}: took {seconds:.0f} s to refuse"

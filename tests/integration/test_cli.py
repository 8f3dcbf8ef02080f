"""The console scripts are installed and answer."""

import subprocess
import sys

import moe_dist


def _run(*args):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def test_moe_dist_help_lists_subcommands():
    res = _run("moe-dist", "--help")
    assert res.returncode == 0, res.stderr
    assert "version" in res.stdout and "usage: moe-dist" in res.stdout


def test_help_and_hostfile_do_not_import_torch():
    """What needs no torch answers without importing it (~3 s with DeepSpeed); every other command
    imports DeepSpeed first, with its logger on stderr."""
    probe = ("import logging, sys\nfrom moe_dist.cli import main\ntry:\n    main(sys.argv[1:])\n"
             "except SystemExit:\n    pass\n"
             "print('loaded:', sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))\n"
             "print('logs to stderr:', [h.stream is sys.stderr for h in logging.getLogger('DeepSpeed').handlers])")
    res = _run(sys.executable, "-c", probe, "hostfile", "--slots", "2", "--nodelist", "gpu[01-02]")
    assert res.stdout == "gpu01 slots=2\ngpu02 slots=2\nloaded: []\nlogs to stderr: []\n", res
    res = _run(sys.executable, "-c", probe, "--help")
    assert "usage: moe-dist" in res.stdout and res.stdout.endswith("loaded: []\nlogs to stderr: []\n"), res
    res = _run(sys.executable, "-c", probe, "version")
    # version imports DeepSpeed itself; load_stack has imported it before, with the logger on stderr
    assert res.stdout.endswith("loaded: ['deepspeed', 'torch']\nlogs to stderr: [True]\n"), res


def test_moe_dist_version_reports_package_and_stack():
    res = _run("moe-dist", "version")
    assert res.returncode == 0, res.stderr
    assert f"moe-dist {moe_dist.__version__}" in res.stdout
    assert "torch" in res.stdout and "deepspeed" in res.stdout


def test_moe_dist_data_name_is_reserved():
    res = _run("moe-dist-data", "--help")
    assert res.returncode == 0, res.stderr
    assert "usage: moe-dist-data" in res.stdout


def test_unknown_subcommand_fails_cleanly():
    res = _run(sys.executable, "-m", "moe_dist.cli", "frobnicate")
    assert res.returncode == 2
    assert "invalid choice" in res.stderr and "Traceback" not in res.stderr


def test_params_cli_matches_tensor_count():
    import json

    import torch

    from moe_dist.models import create_model

    res = _run("moe-dist", "params", "--model", "moe-clip-tiny", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)["params"]
    model = create_model("moe-clip-tiny")
    assert report["total"] == sum(p.numel() for p in model.parameters())
    # hand count: each MoE layer (width 64, H 256, E 4, k 1) leaves 3 experts of 64*256+256+256*64+64 idle
    per_expert = 64 * 256 + 256 + 256 * 64 + 64
    moe_layers = 2 + 2
    assert report["active"] == report["total"] - moe_layers * 3 * per_expert
    assert report["expert"] == moe_layers * 4 * per_expert
    vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    assert report["active/image"] == report["total"] - (report["total"] - vision - 1) - 2 * 3 * per_expert
    table = _run("moe-dist", "params", "--model", "moe-clip-tiny")
    assert f"{report['total']:,}" in table.stdout and torch is not None


def test_params_cli_bad_input_is_one_line():
    res = _run("moe-dist", "params", "--model", "moe-clip-tiny", "--set", "vision.moe.blocks=[4]")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "model.vision.moe.blocks=[4] is out of range" in res.stderr

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

"""Shared test setup: helpers importable as ``helpers.*``; no silent skips under CI=true."""

import contextlib
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def cli(capsys):
    """``moe-dist ARGS`` in this process -> (exit code, stdout, stderr)."""
    from moe_dist.cli import main

    def call(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


# DeepSpeed's CPU all-reduce workspaces; which of them existed when the session started
SHM_WORKSPACES = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"
_SHM_AT_START = pytest.StashKey[set]()


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    """Kill the process groups a test started (helpers.proc) and left running: after a failed wait or a
    timeout they would hold CPUs, ports and pipes for every later test."""
    from helpers import proc

    yield
    proc.kill_leftovers()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped test fails: CI installs every component instead of skipping."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (install the component instead): {report.longrepr}"


def pytest_sessionstart(session):
    """One-time work before any timed wait: DeepSpeed JIT-compiles its CPU communication op on first use
    (about a minute on 2 cores). Every test process shares the install's op directory (the one
    ``moe-dist quickstart`` uses), and the op is built here, once, before the first test starts a clock."""
    import glob
    import subprocess

    from moe_dist.cli import load_stack
    from moe_dist.cli.quickstart import extensions_dir

    # what every moe-dist command does first: the CPU accelerator named (in os.environ, so the test's
    # child processes inherit it) and DeepSpeed's logger bound to the real stderr, not to a test's capture
    load_stack()
    session.config.stash[_SHM_AT_START] = set(glob.glob(SHM_WORKSPACES))

    os.environ["TORCH_EXTENSIONS_DIR"] = extensions_dir()
    warm = "from moe_dist.distributed import detect_env, init_distributed; init_distributed(detect_env())"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    subprocess.run([sys.executable, "-c", warm], check=True, timeout=900, capture_output=True, env=env)


def pytest_sessionfinish(session, exitstatus):
    """A child process a test left alive holds the interpreter's exit (multiprocessing joins its children,
    and data workers ignore SIGTERM): kill them and fail the run by name, instead of hanging CI.
    Likewise DeepSpeed CPU all-reduce workspaces left in /dev/shm (~70 MB of RAM each; a few hundred
    runs filled CI's memory): fail the run by name, and remove the ones this session made that are idle
    (untouched for 30 s: not those of another job starting up on this machine)."""
    import glob
    import multiprocessing
    import signal

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    leaked = sorted(set(glob.glob(SHM_WORKSPACES)) - session.config.stash.get(_SHM_AT_START, set()))
    for path in leaked:
        with contextlib.suppress(OSError):
            if time.time() - os.path.getmtime(path) > 30:
                os.unlink(path)
    if leaked:
        if reporter is not None:
            reporter.write_line(f"shared-memory workspaces left in /dev/shm by the tests: {leaked}", red=True)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    left = multiprocessing.active_children()
    if not left:
        return
    # torch's DataLoader SIGCHLD handler raises when a worker it still tracks dies from a signal
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in left:
        child.kill()
    for child in left:
        child.join(timeout=10)
    if reporter is not None:
        reporter.write_line(f"child processes left alive by the tests (killed): {[c.name for c in left]}", red=True)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

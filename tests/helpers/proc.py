"""Child processes that cannot outlive their test.

    res = run(cmd, timeout=300, cwd=..., env=...)    # subprocess.run(capture_output=True, text=True)
    proc = popen(cmd, stdout=f, ...)                  # subprocess.Popen in its own session

Both start the command in a new session (its own process group). ``subprocess.run``'s timeout kills
only the direct child: the ranks a deepspeed launcher or torchrun started ran on to their last step,
taking the CPUs and ports of the tests after it, which then timed out in turn. Here a timeout kills
the whole group, and ``kill_leftovers`` (called after every test by conftest) kills every group a test
started and left running, however the test ended (a failed ``wait_for`` included). Processes of
module-scoped fixtures (a moto server, the SLURM daemons) must not be started here.
"""

import os
import signal
import subprocess

_started = []


def popen(cmd, **kwargs):
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    _started.append(proc)
    return proc


def kill_group(proc, sig=signal.SIGKILL):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def run(cmd, timeout, input=None, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs):
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)``, killing the group on timeout."""
    proc = popen(cmd, stdin=subprocess.PIPE if input is not None else None, stdout=stdout, stderr=stderr,
                 text=True, **kwargs)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    kill_group(proc)  # what it left running: a group keeps its id while any member lives
    _started.remove(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_leftovers():
    """Kill every process group started here; return how many leaders were still running."""
    alive = [p for p in _started if p.poll() is None]
    for proc in _started:  # a group can outlive its leader (ranks of a killed launcher)
        kill_group(proc)
    for proc in alive:
        proc.wait(timeout=30)
    _started.clear()
    return len(alive)

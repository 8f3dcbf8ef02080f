"""The test harness's own guarantee: a timed-out command is killed with everything it started."""

import os
import subprocess
import sys
import time

import pytest

from helpers import proc
from helpers.train import wait_for

# a launcher-like parent whose child (a "rank") would outlive a kill of the parent alone
TREE = "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
       "print(c.pid, flush=True); time.sleep(60)"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return open(f"/proc/{pid}/stat").read().split()[2] != "Z"


def test_a_timeout_kills_the_children_of_the_command():
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as err:
        proc.run([sys.executable, "-c", TREE], timeout=3)
    rank = int(err.value.output.split()[0])
    # not left running (or waited on) for its 60 s
    assert wait_for(lambda: not _alive(rank), timeout=10) and time.monotonic() - start < 30


def test_groups_a_test_left_running_are_killed():
    child = proc.popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    rank = int(child.stdout.readline())
    assert proc.kill_leftovers() == 1
    assert child.returncode == -9
    assert wait_for(lambda: not _alive(rank), timeout=10)

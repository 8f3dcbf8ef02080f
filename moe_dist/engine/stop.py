"""Stopping a run: stop requests (signals, a stop file), the watchdog that ends a stop that cannot
finish, and debug faults that exercise those paths.

Stop outline:
    1. ``GracefulStop`` is installed before the process group starts, so SIGTERM/SIGUSR1 during setup
       (model build, resume) also become a clean stop: the loop sees the request before its first step;
    2. the loop asks ``requested`` after every step; all ranks agree (all-reduce), checkpoint and exit
       with EXIT_PREEMPTED;
    3. a second signal (SAME_REQUEST_S after the first) ends the process at once, and so does the watchdog when the stop has not finished
       within ``timeout_s`` (a rank stuck in a collective or a data wait). Python runs signal handlers
       only between bytecodes of the main thread, which never come while it waits inside a collective,
       so signals are also seen through ``signal.set_wakeup_fd`` by a watcher thread;
    4. ``close`` restores the previous handlers, so a crash is never held up by a handler that only sets
       a flag.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Dict, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_STOP_TIMEOUT = 124  # the stop did not finish within stop_timeout_s (the code timeout(1) uses)
# Signals this close together are one request: SLURM or a shell may signal a whole process group, and the
# deepspeed launcher then forwards the same SIGTERM to its ranks a moment later.
SAME_REQUEST_S = 2.0


class GracefulStop:
    """SIGTERM/SIGUSR1, or the file named by $MOE_DIST_STOP_FILE appearing (what launch/slurm/train.sbatch
    creates on a preemption notice), ask for a stop.

    Args:
        timeout_s: after the first signal, end the process with EXIT_STOP_TIMEOUT if it is still alive
            this many seconds later (0: never).
    """

    def __init__(self, timeout_s: float = 0.0):
        self.signalled = False
        self.timeout_s = timeout_s
        self.stop_file = os.environ.get("MOE_DIST_STOP_FILE", "")
        self._first_at = None
        self._timer = None
        self._previous: Dict[int, object] = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        read_fd, self._wakeup_fd = os.pipe()
        os.set_blocking(self._wakeup_fd, False)
        self._previous_wakeup = signal.set_wakeup_fd(self._wakeup_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_fd,), name="moe-dist-stop", daemon=True).start()

    def _handle(self, signum, frame) -> None:
        self.signalled = True  # the watcher thread counts signals and arms the watchdog

    def _watch(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while True:
                data = pipe.read(64)
                if not data:  # close() closed the write end
                    return
                for signum in data:
                    if signum in STOP_SIGNALS:
                        self._received(signum)

    def _received(self, signum: Optional[int]) -> None:
        self.signalled = True
        now = time.monotonic()
        if self._first_at is None:
            self._first_at = now
            if self.timeout_s > 0:
                self._timer = threading.Timer(self.timeout_s, self._give_up)
                self._timer.daemon = True
                self._timer.start()
        elif signum is not None and now - self._first_at >= SAME_REQUEST_S:  # asked again: the stop is not to wait any longer
            sys.stderr.write(f"moe-dist: second stop signal ({signal.Signals(signum).name}); exiting now\n")
            sys.stderr.flush()
            os._exit(128 + signum)

    def _give_up(self) -> None:
        sys.stderr.write(f"moe-dist: the stop requested {self.timeout_s:g} s ago has not finished "
                         "(stop_timeout_s); exiting without a checkpoint\n")
        sys.stderr.flush()
        os._exit(EXIT_STOP_TIMEOUT)

    @property
    def requested(self) -> bool:
        if not self.signalled and self.stop_file and os.path.exists(self.stop_file):
            self._received(None)  # the stop file (SLURM's preemption path) arms the watchdog too
        return self.signalled

    def close(self) -> None:
        """Restore the handlers that were installed before and stop the watcher; safe to call twice."""
        if self._timer is not None:
            self._timer.cancel()
        if not self._previous:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        signal.set_wakeup_fd(self._previous_wakeup)
        os.close(self._wakeup_fd)


class DebugFaults:
    """Debug section faults, wrapped around the loss function only when configured: a NaN loss at
    ``debug.nan_loss_steps`` on ``debug.nan_loss_rank`` (the all-rank skip), and an exception at micro
    step ``debug.raise_at_step`` on ``debug.raise_rank`` (a crash must end every rank promptly)."""

    def __init__(self, loss_fn, trainer):
        self.loss_fn, self.trainer = loss_fn, trainer

    def __call__(self, out):
        result = self.loss_fn(out)
        debug, step, rank = self.trainer.cfg.debug, self.trainer.micro_step, self.trainer.rank
        if step == debug.raise_at_step and rank == debug.raise_rank:
            raise RuntimeError(f"debug.raise_at_step={step}: injected failure on rank {rank}")
        if step in debug.nan_loss_steps and rank == debug.nan_loss_rank:
            result.total = result.total * float("nan")
        return result

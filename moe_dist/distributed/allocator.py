"""The host memory allocator of CPU ranks: tcmalloc (Debian/Ubuntu ``libtcmalloc-minimal4``) preloaded.

Why: every backward allocates the expert weight gradients afresh ([L, D, H] per layer: 64 MiB for w1 at
E=64, D=256, H=1024). glibc serves blocks above its mmap threshold (at most 32 MiB, whatever
``MALLOC_MMAP_THRESHOLD_`` says) with a fresh mmap and unmaps them on free, so each step page-faults
them in again. Measured on the bench layer (bench/moe_layer.py shapes, E=64, k=2, 4096 tokens, fp32):
48,700 minor page faults per forward+backward (190 MiB touched fresh) with glibc, 46 with tcmalloc
(it keeps freed spans and hands them back); jemalloc, even with PyTorch's recommended ``MALLOC_CONF``,
still faulted 59,000 times. The gradients stay tensors autograd allocates: nothing writes into a
caller's ``.grad``.

``MOE_DIST_ALLOCATOR``: ``auto`` (default: tcmalloc when installed), ``tcmalloc`` (required: an error
when missing), ``system`` (glibc). An ``LD_PRELOAD`` that already names a malloc is left alone.

    python -m moe_dist.distributed.allocator      prints ``export LD_PRELOAD=...`` (launch/deepspeed.sh)
"""

from __future__ import annotations

import ctypes.util
import os
import shlex
import sys
from typing import Dict, Mapping

CHOICES = ("auto", "tcmalloc", "system")
MALLOCS = ("tcmalloc", "jemalloc", "mimalloc")


def find_tcmalloc() -> str:
    """The soname of an installed tcmalloc ("libtcmalloc_minimal.so.4"), or ""."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return ""


def allocator_env(environ: Mapping[str, str]) -> Dict[str, str]:
    """The variables to add to a CPU rank's environment ({} when nothing changes).

    Raises:
        ValueError: MOE_DIST_ALLOCATOR is unknown, or is "tcmalloc" and no tcmalloc is installed.
    """
    choice = environ.get("MOE_DIST_ALLOCATOR", "auto") or "auto"
    if choice not in CHOICES:
        raise ValueError(f"MOE_DIST_ALLOCATOR={choice!r} is unknown; use one of {CHOICES}")
    preload = environ.get("LD_PRELOAD", "")
    if choice == "system" or any(m in preload for m in MALLOCS):
        return {}
    library = find_tcmalloc()
    if not library:
        if choice == "tcmalloc":
            raise ValueError("MOE_DIST_ALLOCATOR=tcmalloc but no tcmalloc is installed; install it "
                             "(apt-get install libtcmalloc-minimal4) or set MOE_DIST_ALLOCATOR=auto")
        return {}
    return {"LD_PRELOAD": f"{library} {preload}".strip()}


def main() -> int:
    try:
        changes = allocator_env(os.environ)
    except ValueError as err:
        print(f"echo {shlex.quote(f'moe_dist.distributed.allocator: {err}')} >&2; exit 2")
        return 2
    for name, value in changes.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Writing files so that no reader ever sees half of one: write a temporary file beside the target,
flush it to disk, rename it over the target, then flush the directory entry.

Every writer in moe_dist that leaves a file for another process (checkpoints and their markers, shard
manifests, hostfiles, benchmark results) goes through ``atomic_path``. A crash leaves at most a
``<name>.tmp.<pid>`` file, which ``remove_stale_temporaries`` cleans up.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Any, Iterator, Union

TMP_MARK = ".tmp."


def fsync_dir(directory: str) -> None:
    """Make a rename or a new entry in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str, durable: bool = True) -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block succeeds, the file written there replaces
    ``path`` (fsynced first when ``durable``); when it raises, the temporary file is removed."""
    tmp = f"{path}{TMP_MARK}{os.getpid()}"
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write(path: str, data: Union[str, bytes], durable: bool = True) -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically."""
    with atomic_path(path, durable) as tmp:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)


def atomic_json(path: str, obj: Any, durable: bool = True) -> None:
    """``obj`` as indented JSON (with a final newline) at ``path``, atomically."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n", durable)


def remove_stale_temporaries(directory: str) -> int:
    """Delete ``*.tmp.<pid>`` files a crashed writer left in ``directory`` (not recursive); returns how many."""
    removed = 0
    for path in glob.glob(os.path.join(glob.escape(directory), f"*{TMP_MARK}*")):
        if os.path.isfile(path) and path.rsplit(TMP_MARK, 1)[1].isdigit():
            with contextlib.suppress(OSError):
                os.remove(path)
                removed += 1
    return removed

"""Writing files so that no reader ever sees half of one: write a temporary file beside the target,
flush it to disk, rename it over the target, then flush the directory entry.

Every writer in moe_dist that leaves a file for another process (checkpoints and their markers, shard
manifests, hostfiles, benchmark results) goes through ``atomic_path``. A crash leaves at most a
``<name>.tmp.<pid>`` file (a checkpoint root's ``latest.tmp.<pid>`` is removed when its run resumes).

``read_small`` reads a file that another process named: only a regular file (never a FIFO, a device or
a symlink, which could block or read without end), up to a size limit.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
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


def read_small(path: str, limit: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    Raises:
        FileNotFoundError (an OSError): there is no such file.
        ValueError: one line naming the file when it is a symlink, not a regular file (opened without
            blocking, so a FIFO cannot hang the reader) or larger than ``limit``.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symlink; only a regular file is read here") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{path} is not a regular file (a FIFO, device or directory)")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit:,} bytes, the most this file may hold")
    return data

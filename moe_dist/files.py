"""Writing files so that no reader ever sees half of one: write a temporary file beside the target,
flush it to disk, rename it over the target, then flush the directory entry.

Every writer in moe_dist that leaves a file for another process (checkpoints and their markers, shard
manifests, hostfiles, benchmark results) goes through ``atomic_path``. A crash leaves at most a
``<name>.tmp.<pid>`` file (a checkpoint root's ``latest.tmp.<pid>`` is removed when its run resumes).

``open_regular`` and ``read_small`` open a file that someone else named (a spec, an index, a
checkpoint, a config): only a regular file (never a FIFO or a device, which could block or read without
end; optionally never a symlink), and ``read_small`` up to a size limit.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from typing import Any, BinaryIO, Iterator, Union

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


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield a new temporary directory beside ``path``; when the block succeeds it is renamed to ``path``,
    when it raises it is removed. ``path`` must not exist, or be an empty directory (ValueError otherwise):
    a folder of files that belong together is never mixed with an older one."""
    import shutil

    if not path:
        raise ValueError("--out is empty; name a new directory to write")
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)):
        raise ValueError(f"--out {path} exists and is not an empty directory; name a new directory or remove it")
    tmp = f"{os.path.abspath(path)}{TMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
    except OSError as err:  # a parent that is a file, no permission, a read-only file system
        raise ValueError(f"--out {path}: cannot create a directory there ({err.strerror or err}); name a "
                         "directory under a writable folder") from None
    try:
        yield tmp
        for name in os.listdir(tmp):
            if os.path.isfile(os.path.join(tmp, name)):
                fsync_file(os.path.join(tmp, name))
        try:
            if os.path.isdir(path):
                os.rmdir(path)
            os.replace(tmp, path)
        except OSError as err:  # EBUSY (a mount point), a directory filled or made meanwhile
            raise ValueError(f"--out {path}: cannot put the written directory there ({err.strerror or err}); "
                             "name a new directory under a writable folder") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write(path: str, data: Union[str, bytes], durable: bool = True) -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically."""
    with atomic_path(path, durable) as tmp:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)


def atomic_json(path: str, obj: Any, durable: bool = True) -> None:
    """``obj`` as indented JSON (with a final newline) at ``path``, atomically."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n", durable)


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink"))


def _not_regular(path: str, what: str, mode: int) -> ValueError:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return ValueError(f"{what} {path!r} is {kind}, not a regular file; name a regular file (a FIFO or a device is "
                      "never read, so that nothing waits on it forever)")


def check_regular(path: str, what: str = "file", follow_symlinks: bool = True) -> None:
    """ValueError (one line naming the file and what it is) unless ``path`` is a regular file, checked
    without opening it; FileNotFoundError when it is missing."""
    mode = (os.stat if follow_symlinks else os.lstat)(path).st_mode
    if not stat.S_ISREG(mode):
        raise _not_regular(path, what, mode)


def open_regular(path: str, what: str = "file", follow_symlinks: bool = True) -> BinaryIO:
    """``open(path, "rb")`` for a regular file only: a FIFO is never waited on (the type is checked
    before opening and again on the descriptor, opened non-blocking), a device never read, and with
    ``follow_symlinks=False`` a symlink is refused too.

    Args:
        what: how messages name the file ("shard", "index", "class file", "config file").
    Raises:
        FileNotFoundError (an OSError): there is no such file.
        ValueError: one line naming the file and what it is instead.
    """
    check_regular(path, what, follow_symlinks)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags if follow_symlinks else flags | getattr(os, "O_NOFOLLOW", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # swapped for a FIFO or a device since the check
            raise _not_regular(path, what, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small(path: str, limit: int, what: str = "file", follow_symlinks: bool = False) -> bytes:
    """The bytes of the regular file ``path`` (``open_regular``; symlinks refused unless
    ``follow_symlinks``), at most ``limit`` of them.

    Raises:
        FileNotFoundError (an OSError): there is no such file.
        ValueError: one line naming the file when it is not a regular file or is larger than ``limit``.
    """
    try:
        f = open_regular(path, what, follow_symlinks)
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink created since the check
            raise _not_regular(path, what, stat.S_IFLNK) from None
        raise
    with f:
        data = f.read(limit + 1)
    if len(data) > limit:
        size = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit:,} bytes"
        raise ValueError(f"{what} {path} is larger than {size}, more than such a file may be; check that it is "
                         "the right file")
    return data

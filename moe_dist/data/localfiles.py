"""The local files a data spec names, and what each may be.

Shards, their indexes (manifest.json, sizes.json) and class files are opened by names that someone else
wrote: a spec, an index, a config. Rules:
    1. a name must be a regular file (symlinks followed): a FIFO would block the reading rank forever, a
       device (/dev/zero, /dev/stdin) never ends or waits on a terminal, a directory is no file. The type
       is checked before opening, and again on the open descriptor, which is opened non-blocking, so a
       FIFO put there in between cannot block either;
    2. a name found in a directory (listed by its index, or matched there by ``*.tar``) must stay in that
       directory once symlinks are resolved: an index describes the files beside it, nothing else;
    3. a JSON file (an index, a class file) is read whole up to a size limit, as UTF-8 JSON; whatever goes
       wrong is one ValueError line that names the file.
"""

from __future__ import annotations

import json
import os
import stat
from typing import BinaryIO, Optional

INDEX_MAX_BYTES = 128 << 20  # a manifest.json of about 600,000 shards; sizes.json is smaller per shard
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _refuse(path: str, what: str, mode: int) -> ValueError:
    return ValueError(f"{what} {path!r} is {_kind(mode)}, not a regular file; name a regular file (a FIFO or a "
                      "device is never read, so that no rank waits on it forever)")


def check_regular(path: str, what: str = "file") -> None:
    """ValueError unless ``path`` (symlinks followed) is a regular file; FileNotFoundError when it is missing.

    Args:
        what: how messages name the file ("shard", "index", "class file").
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _refuse(path, what, mode)


def open_regular(path: str, what: str = "file") -> BinaryIO:
    """``open(path, "rb")`` for a regular file only (rule 1): never blocks on a FIFO, never reads a device."""
    check_regular(path, what)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # swapped for a FIFO or a device since the check
            raise _refuse(path, what, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_inside(path: str, directory: str, found: str) -> str:
    """``path`` when it stays inside ``directory`` with symlinks resolved (rule 2); else a ValueError.

    Args:
        found: how the name was found, for the message ("listed in DIR/sizes.json", "found in DIR").
    """
    real, top = os.path.realpath(path), os.path.realpath(directory)
    if os.path.commonpath([real, top]) != top:
        raise ValueError(f"{path!r} ({found}) is a symlink to {real}, outside {directory}; only what lies inside a "
                         "shard directory is read through it: copy the file in, or name it by its own path in the "
                         "spec")
    return path


def read_json_file(path: str, what: str = "file", max_bytes: Optional[int] = None) -> Optional[object]:
    """The JSON value in the local file ``path`` (rules 1 and 3); None when there is no such file.

    Args:
        what: how messages name the file ("index", "class file").
        max_bytes: the size limit (default ``INDEX_MAX_BYTES``).
    Raises:
        ValueError: not a regular file, larger than ``max_bytes``, not UTF-8 or not JSON; the message names
            ``path``.
    """
    max_bytes = max_bytes or INDEX_MAX_BYTES
    if not os.path.exists(path):
        return None
    with open_regular(path, what) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        limit = f"{max_bytes >> 20} MiB" if max_bytes >= 1 << 20 else f"{max_bytes} bytes"
        raise ValueError(f"{what} {path} is larger than {limit}, more than such a file may be; check that it is "
                         "the right file")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {err.start}); write it as UTF-8 JSON") from None
    except ValueError as err:  # json.JSONDecodeError
        raise ValueError(f"{what} {path} is not valid JSON ({err}); fix or remove it") from None


def shown_value(value: object, limit: int = 60) -> str:
    """A JSON value for a one-line message: as JSON (``true``, ``"5"``), cut at ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."

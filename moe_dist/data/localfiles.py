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
from typing import Optional

from ..files import read_small

INDEX_MAX_BYTES = 128 << 20  # a manifest.json of about 600,000 shards; sizes.json is smaller per shard
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
    if not os.path.exists(path):
        return None
    data = read_small(path, max_bytes or INDEX_MAX_BYTES, what, follow_symlinks=True)
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

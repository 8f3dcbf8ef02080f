"""Command-line arguments carried as one base64 word through a launcher that pastes them into a shell.

DeepSpeed's pdsh runner joins the training command's arguments into one line that the remote node's
login shell runs (``pdsh -w HOSTS "export ...; cd DIR; python -m deepspeed.launcher.launch ... ARGS"``),
quoting none of them, and pdsh replaces ``%n``, ``%h``, ``%u`` and ``%%`` in that line. An argument with
``$(...)``, backticks, ``$VAR``, quotes, ``;`` or a newline would run or change on every node.
``launch/deepspeed.sh`` therefore hands such a launch its arguments as one word,
``--argv-base64=<base64 of the arguments, each followed by a NUL byte>``, whose alphabet (letters,
digits, ``+``, ``/``, ``=``) no shell and no pdsh interprets; ``moe-dist`` expands it back before parsing.

    printf '%s\\0' train --config "$CONFIG" "$@" | base64 | tr -d '\\n'    # what launch/deepspeed.sh sends
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import List

OPTION = "--argv-base64="


def encode_argv(argv: List[str]) -> str:
    """``--argv-base64=WORD`` for ``argv`` (what ``launch/deepspeed.sh`` builds with printf and base64)."""
    data = b"".join(os.fsencode(arg) + b"\0" for arg in argv)
    return OPTION + base64.b64encode(data).decode("ascii")


def decode_argv(argv: List[str]) -> List[str]:
    """``argv`` with an ``--argv-base64=WORD`` element expanded into the arguments it encodes.

    Only an element before the command name counts (``python -m moe_dist --local_rank=0 --argv-base64=...``
    is how the deepspeed launcher starts a rank), so a training argument that merely starts with the same
    text is left alone. Arguments come back byte for byte (``os.fsdecode``, as ``sys.argv`` holds them).

    Raises:
        ValueError: the word is not base64 of NUL-terminated arguments.
    """
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            break
        if arg.startswith(OPTION):
            word = arg[len(OPTION):]
            try:
                data = base64.b64decode(word, validate=True)
            except binascii.Error:
                data = b"?"
            if not data.endswith(b"\0"):
                raise ValueError(f"{OPTION}{word[:40]}... is not base64 of NUL-terminated arguments; it is "
                                 "written by launch/deepspeed.sh (printf '%s\\0' ARGS... | base64)")
            decoded = [os.fsdecode(part) for part in data[:-1].split(b"\0")]
            return argv[:i] + decoded + argv[i + 1:]
    return list(argv)

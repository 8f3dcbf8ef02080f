"""Issue 25: what a launch may carry.

Item 2 (the unit half): the ``--argv-base64`` word launch/deepspeed.sh sends over pdsh expands back to
the arguments byte for byte.
"""

import pytest

from moe_dist.cli import main
from moe_dist.distributed.launch_argv import decode_argv, encode_argv


def test_argv_base64_word_expands_to_the_arguments_byte_for_byte(capsys):
    args = ["a b", "$(touch x)", "`x`", "$HOME", "'\"", ";", "line\nbreak", "%n %h", "", "\udcff"]
    assert decode_argv(["--local_rank=0", encode_argv(args)]) == ["--local_rank=0"] + args
    # only before the command name: a training argument that looks the same stays as it is
    assert decode_argv(["train", "--set", encode_argv(["x"])]) == ["train", "--set", encode_argv(["x"])]
    # what a rank started over pdsh runs: python -m moe_dist --local_rank=N --argv-base64=...
    assert main(["--local_rank=0", encode_argv(["hostfile", "--slots", "1", "--hosts", "n1", "n2"])]) == 0
    assert capsys.readouterr().out == "n1 slots=1\nn2 slots=1\n"
    with pytest.raises(SystemExit) as exc:
        main(["--argv-base64=not base64"])
    assert exc.value.code == 2 and "is not base64 of NUL-terminated arguments" in capsys.readouterr().err

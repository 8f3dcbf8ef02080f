"""Issue 25: what a launch may carry.

Item 12: ``moe-dist hostfile`` writes one ``host slots=N`` line per host, so a value that is not a host
name (a newline or space adds a line or a ``slots=`` field; '#', '=', ',', '$' are read by DeepSpeed's
hostfile parser, launch/deepspeed.sh, pdsh or a shell) is refused with one line naming it, exit 2, as
are a malformed node list and an ``--out`` that cannot be written. Item 2 (the unit half): the
``--argv-base64`` word launch/deepspeed.sh sends over pdsh expands back to the arguments byte for byte.
"""

import pytest

from moe_dist.cli import main
from moe_dist.distributed import expand_nodelist
from moe_dist.distributed.launch_argv import decode_argv, encode_argv


def _hostfile(capsys, *args):
    code = main(["hostfile", "--slots", "2", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("hosts, bad", [
    (["gpu01", "gpu02\nevil slots=64"], "'gpu02\\nevil slots=64'"),  # a second line, 64 slots on "evil"
    (["gpu01 slots=64"], "'gpu01 slots=64'"),
    (["a=b"], "'a=b'"), (["#gpu"], "'#gpu'"), (["a,b"], "'a,b'"), (["$(x)"], "'$(x)'"), (["gpu:1"], "'gpu:1'"),
    (["gpu\t1"], "'gpu\\t1'"),
], ids=["newline", "space", "equals", "hash", "comma", "dollar", "colon", "tab"])
def test_hostfile_refuses_what_is_not_a_host_name(capsys, hosts, bad):
    code, out, err = _hostfile(capsys, "--hosts", *hosts)
    assert (code, out) == (2, ""), out
    assert err.count("\n") == 1 and f"--hosts: {bad} is not a host name" in err, err


@pytest.mark.parametrize("nodelist, want", [
    ("gpu[01-03", "unbalanced brackets"),  # was: one host named "01-03"
    ("gpu[01-02]]", "unbalanced brackets"),
    ("gpu[a-b]", "'a-b' in [a-b] is not a number or a rising range"),  # was: "invalid literal for int()"
    ("gpu[3-1]", "'3-1' in [3-1] is not a number or a rising range"),  # was: "no hosts"
    ("gpu01 gpu02", "'gpu01 gpu02' is not a host name"),
])
def test_hostfile_refuses_a_malformed_node_list(capsys, nodelist, want):
    code, out, err = _hostfile(capsys, "--nodelist", nodelist)
    assert (code, out) == (2, "") and err.count("\n") == 1, err
    assert f"node list {nodelist!r}" in err and want in err, err


def test_node_lists_with_suffixes_and_several_ranges():
    assert expand_nodelist("gpu[01-02]-ib,cpu5") == ["gpu01-ib", "gpu02-ib", "cpu5"]
    assert expand_nodelist("r[1-2]-n[8-9]") == ["r1-n8", "r1-n9", "r2-n8", "r2-n9"]


@pytest.mark.parametrize("out", ["missing/dir/hostfile", "."], ids=["missing-dir", "a-directory"])
def test_hostfile_out_that_cannot_be_written(capsys, tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    code, _, err = _hostfile(capsys, "--hosts", "a", "--out", out)
    assert code == 2 and err.count("\n") == 1 and f"--out {out!r}: cannot write the hostfile there" in err, err
    assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == []


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

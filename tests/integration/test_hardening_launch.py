"""Issue 25, item 2: a multi-node launch over pdsh (``launch/deepspeed.sh`` with a HOSTFILE) puts no
credential on a command line or in a log, and every argument reaches training byte for byte.

The launcher is the real DeepSpeed runner (the installed ``deepspeed``). Only pdsh and ssh are stand-ins,
first on PATH: ssh answers the runner's reachability check, and pdsh records its argv and environment,
then does what pdsh over ssh does on each node: it joins the command words with spaces, substitutes
``%n``/``%h``/``%u``/``%%`` and hands the line to the node's shell (``bash -c``), in the node's own
environment (ssh forwards none). On the node, ``deepspeed.launcher.launch`` is replaced by a recorder
that saves the argv and environment the remote shell gave it, so no rank starts.
"""

import os
import subprocess

from helpers.train import ROOT
from moe_dist.distributed.launch_argv import decode_argv

PDSH = r'''#!/usr/bin/env python3
import os, re, subprocess, sys
record = {record!r}
with open(os.path.join(record, "pdsh.argv"), "wb") as f:
    f.write(b"\0".join(os.fsencode(a) for a in sys.argv[1:]))
with open(os.path.join(record, "pdsh.env"), "wb") as f:
    f.write(b"\0".join(os.fsencode(k) + b"=" + os.fsencode(v) for k, v in os.environ.items()))
args = sys.argv[1:]
while args[0].startswith("-"):  # -S, -f N, -w HOSTS
    if args[0] == "-w":
        hosts = args[1].split(",")
    args = args[2:] if args[0] in ("-f", "-w") else args[1:]
line = " ".join(args).replace("-u -m deepspeed.launcher.launch ", "-u {recorder} ")
for n, host in enumerate(hosts):
    sub = {{"%n": str(n), "%h": host, "%u": "user", "%%": "%"}}
    remote = re.sub("%[nhu%]", lambda m: sub[m.group()], line)
    rc = subprocess.run(["bash", "-c", remote], env={{"PATH": os.environ["PATH"], "HOME": {home!r}}}).returncode
    if rc:
        sys.exit(rc)
'''
RECORDER = r'''import os, sys
node = [a for a in sys.argv if a.startswith("--node_rank=")][0].split("=")[1]
with open(os.path.join({record!r}, "node%s.argv" % node), "wb") as f:
    f.write(b"\0".join(os.fsencode(a) for a in sys.argv[1:]))
with open(os.path.join({record!r}, "node%s.env" % node), "wb") as f:
    f.write(b"\0".join(os.fsencode(k) + b"=" + os.fsencode(v) for k, v in os.environ.items()))
'''
SECRETS = {"MY_API_TOKEN": "s3cret-api", "HF_TOKEN": "s3cret-hf", "NCCL_SECRET_X": "s3cret-nccl",
           "PYTHON_KEYRING_PASSWORD": "s3cret-python", "MLFLOW_TRACKING_TOKEN": "s3cret-mlflow"}


def _stand_ins(tmp_path):
    """bin/ with pdsh and ssh stand-ins, the record directory, and the nodes' home."""
    bin_dir, record, home = tmp_path / "bin", tmp_path / "record", tmp_path / "home"
    for d in (bin_dir, record, home):
        d.mkdir()
    recorder = tmp_path / "launch_recorder.py"
    recorder.write_text(RECORDER.format(record=str(record)))
    (bin_dir / "pdsh").write_text(PDSH.format(record=str(record), recorder=str(recorder), home=str(home)))
    (bin_dir / "ssh").write_text("#!/bin/sh\nexit 0\n")  # the runner's "ssh HOST hostname" check
    for name in ("pdsh", "ssh"):
        (bin_dir / name).chmod(0o755)
    return bin_dir, record, home


def _read0(path):
    return [os.fsdecode(b) for b in path.read_bytes().split(b"\0")]


def test_pdsh_launch_forwards_no_credential_and_every_argument_intact(tmp_path):
    """Before the fix the runner put PYTHON_KEYRING_PASSWORD, NCCL_SECRET_X, MLFLOW_TRACKING_TOKEN and the
    HF_TOKEN of ~/.deepspeed_env on the pdsh command line and in its log, the nodes ran the $(...) and
    backticks of the arguments, of MLFLOW_RUN_NAME's value and of a PYTHON* variable's name, expanded
    $HOME, %n and %h, and dropped the empty argument."""
    bin_dir, record, home = _stand_ins(tmp_path)
    work, marker = tmp_path / "work", tmp_path / "work" / "pwned"  # the remote command runs in work/
    nasty = "$(touch pwned) `touch pwned` $HOME ; 'q' \"dq\" %n %h * \\ {a,b}"
    config_dir = tmp_path / f"cfg {nasty}\nline two"
    config_dir.mkdir()  # a directory name may hold all of it but '/'
    config = config_dir / "run.yaml"
    config.write_text(open(os.path.join(ROOT, "configs", "runs", "tiny-synth.yaml")).read())
    sets = [f"output_dir=/runs/{nasty}\nsecond line", "data.train=plain", ""]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=1\nn2 slots=1\n")
    work.mkdir()
    # a DeepSpeed user's ~/.deepspeed_env, which the runner also reads
    (home / ".deepspeed_env").write_text("HF_TOKEN=s3cret-home\n")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HOSTFILE=str(hostfile),
               HOME=str(home), DS_ACCELERATOR="cuda",  # the runner then exports NCCL_* itself, as on GPU nodes
               NCCL_DEBUG="INFO", MOE_DIST_NOTE="kept", MLFLOW_RUN_NAME=f"run $(touch {marker})",
               **{f"PYTHONX$(touch {marker})": "1"}, **SECRETS)
    env.pop("DS_ENV_FILE", None)
    res = subprocess.run(["bash", os.path.join(ROOT, "launch", "deepspeed.sh"), str(config)]
                         + [a for s in sets for a in ("--set", s)],
                         capture_output=True, text=True, cwd=work, env=env, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not marker.exists(), "a value ran a command on the node"

    pdsh_argv, pdsh_env = " ".join(_read0(record / "pdsh.argv")), "\n".join(_read0(record / "pdsh.env"))
    for value in list(SECRETS.values()) + ["s3cret-home"]:
        assert value not in pdsh_argv, f"{value} on the pdsh command line: {pdsh_argv}"
        assert value not in res.stdout + res.stderr, f"{value} in the launcher's output"
        assert value not in pdsh_env, f"{value} reached pdsh"
    for node in (0, 1):
        argv = _read0(record / f"node{node}.argv")
        user = argv[argv.index("moe_dist") + 1:]
        assert decode_argv(user) == ["train", "--config", str(config)] + [a for s in sets for a in ("--set", s)]
        node_env = dict(kv.split("=", 1) for kv in _read0(record / f"node{node}.env"))
        assert node_env["NCCL_DEBUG"] == "INFO" and node_env["MOE_DIST_NOTE"] == "kept"
        assert not set(SECRETS) & set(node_env) and "MLFLOW_RUN_NAME" not in node_env
    assert "not forwarding MLFLOW_RUN_NAME" in res.stderr

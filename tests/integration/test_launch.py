"""Launch paths: a real local SLURM cluster (sbatch, requeue), two no-ssh deepspeed launchers,
sbatch rendering, hostfiles and bad input."""

import os
import shutil
import stat
import subprocess
import time

import pytest

from helpers.proc import popen, run
from helpers.train import ROOT, make_synth, metrics, clean_env

LOCAL_SLURM = os.path.join(ROOT, "launch", "local_slurm.sh")
SLURM_DIR = "/tmp/moe_dist_slurm_tests"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def slurm():
    """Start launch/local_slurm.sh's two-node cluster (CI installs SLURM; elsewhere a missing one skips)."""
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        pytest.skip("SLURM (slurmctld, slurmd, munge) and root are needed for the local cluster")
    env = dict(os.environ, LOCAL_SLURM_DIR=SLURM_DIR, INSTALL="0")
    res = subprocess.run(["bash", LOCAL_SLURM, "start"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    yield dict(os.environ, SLURM_CONF=os.path.join(SLURM_DIR, "slurm.conf"))
    subprocess.run(["bash", LOCAL_SLURM, "stop"], env=env, capture_output=True, timeout=60)


def _extra(synth, out, **sets):
    base = {"data.train": synth / "train", "data.val": synth / "val", "data.tokenizer": synth / "tok.model",
            "output_dir": out, "logging.progress": "false", "batch.micro_batch": 16, "data.workers": 1}
    base.update(sets)
    return " ".join(f"--set {k}={v}" for k, v in base.items())


def _sbatch(slurm, synth, out, log, wait=False, **sets):
    env = dict(slurm, **clean_env())
    cmd = ["sbatch", "--parsable", "--nodes", "2", "--output", str(log),
           "--export", f"ALL,CONFIG=configs/runs/tiny-synth.yaml,EXTRA_ARGS={_extra(synth, out, **sets)}"]
    if wait:
        cmd.insert(1, "--wait")
    return run(cmd + ["launch/slurm/train.sbatch"], timeout=600, env=env, cwd=ROOT)


def _job(slurm, job_id):
    res = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=slurm)
    return dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)


def test_preempted_job_checkpoints_requeues_and_resumes(slurm, synth, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    res = _sbatch(slurm, synth, out, log, steps=40, ep_size=2, **{"checkpoint.every": 0})
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    deadline = time.time() + 240
    while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 2):
        assert time.time() < deadline, log.read_text()[-3000:] if log.exists() else "job never started"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    while True:  # a requeued job waits cred_expire (10 s, launch/local_slurm.sh) before it starts again;
        # forcing StartTime=now races the revoked credential of its first run ("Job credential revoked")
        info = _job(slurm, job)
        # the first run's end shows briefly as a final state: only the rerun's end counts
        rerun = "(restart 1)" in log.read_text()
        if rerun and info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            break
        assert time.time() < deadline + 240, info
        time.sleep(1)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1" and info["ExitCode"] == "0:0", text[-3000:]
    assert "requeueing job" in text
    stopped = [line for line in text.splitlines() if line.startswith("stopped by signal at step")]
    resumed = [line for line in text.splitlines() if line.startswith("resumed from")]
    assert len(stopped) == 1 and len(resumed) == 1
    step = int(stopped[0].split("step ")[1].split(";")[0])
    assert resumed[0].endswith(f"at step {step}")
    steps = [m["step"] for m in metrics(out) if "loss/total" in m]
    assert steps == list(range(1, 41)), "the step counter must continue after the requeue"


def test_two_no_ssh_deepspeed_launchers(synth, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=1\nn2 slots=1\n")
    from helpers.harness import free_port

    port = str(free_port())
    out = tmp_path / "run"
    args = _extra(synth, out, steps=3, ep_size=2).split()
    procs = []
    for node in (0, 1):
        env = dict(clean_env(), HOSTFILE=str(hostfile), NO_SSH="1", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, NCCL_SECRET_X="s3cret-nccl")  # deepspeed.launcher.launch prints *NCCL*
        procs.append(popen(["bash", "launch/deepspeed.sh", "configs/runs/tiny-synth.yaml"] + args,
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "world size 2" in outputs[0] and (out / "checkpoints" / "step00000003" / "COMPLETE").exists()
    assert not any("s3cret" in output for output in outputs), "a credential was printed (issue 25, item 2)"


def test_render_sbatch_for_4_nodes_x_8_gpus(tmp_path):
    res = subprocess.run(["moe-dist", "slurm", "--config", "configs/runs/tiny-synth.yaml", "--nodes", "4",
                          "--gpus-per-node", "8", "--time", "12:00:00", "--partition", "gpu", "--account", "vlm",
                          "--set", "ep_size=8", "--set", "model.moe.num_experts=16", "--set", "data.train=/data/train",
                          "--dry-run"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    sbatch = [line for line in lines if line.startswith("#SBATCH")]
    for want in ("--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=1", "--time=12:00:00", "--partition=gpu",
                 "--account=vlm", "--signal=B:USR1@120", "--requeue"):
        assert f"#SBATCH {want}" in sbatch, want
    assert lines.index(sbatch[-1]) < min(i for i, line in enumerate(lines) if not line.startswith("#"))
    assert "export GPUS_PER_NODE=8" in lines and "export LAUNCHER=deepspeed" in lines
    assert "EXTRA_ARGS=(--set ep_size=8 --set model.moe.num_experts=16 --set data.train=/data/train)" in lines
    assert any('--node_rank "$SLURM_NODEID"' in line for line in lines)
    assert any("scontrol requeue" in line for line in lines)


def test_hostfile_from_compressed_nodelist():
    res = subprocess.run(["moe-dist", "hostfile", "--slots", "8", "--nodelist", "gpu[01-03,07]"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.stdout == "gpu01 slots=8\ngpu02 slots=8\ngpu03 slots=8\ngpu07 slots=8\n"
    res = subprocess.run(["moe-dist", "hostfile", "--slots", "2"], capture_output=True, text=True, cwd=ROOT,
                         env={k: v for k, v in os.environ.items() if k != "SLURM_JOB_NODELIST"})
    assert res.returncode == 2 and "no hosts" in res.stderr


@pytest.mark.parametrize("case", ["missing_hostfile", "no_slots", "host_name", "cwd", "ep_size", "no_sbatch"])
def test_bad_launch_input_gives_a_clear_message(case, tmp_path):
    env, cwd = dict(os.environ), ROOT
    if case in ("host_name", "cwd"):  # issue 25: what the pdsh runner would paste into the nodes' shell
        (tmp_path / "hf").write_text("n1 slots=1\n" + ("n2;id slots=1\n" if case == "host_name" else "n2 slots=1\n"))
        cmd = ["bash", os.path.join(ROOT, "launch", "deepspeed.sh"), os.path.join(ROOT, "configs/runs/tiny-synth.yaml")]
        env["HOSTFILE"], want = str(tmp_path / "hf"), "line 2 of hostfile"
        if case == "cwd":
            cwd = tmp_path / "run $(id)"
            cwd.mkdir()
            want = f"the working directory '{cwd}' has characters"
    elif case == "missing_hostfile":
        cmd = ["bash", "launch/deepspeed.sh", "configs/runs/tiny-synth.yaml"]
        env["HOSTFILE"], want = str(tmp_path / "nope"), "hostfile '%s' does not exist" % (tmp_path / "nope")
    elif case == "no_slots":
        (tmp_path / "hf").write_text("node1 slots=8\nnode2\n")
        cmd = ["bash", "launch/deepspeed.sh", "configs/runs/tiny-synth.yaml"]
        env["HOSTFILE"], want = str(tmp_path / "hf"), "line 2 of hostfile"
    elif case == "ep_size":
        cmd = ["moe-dist", "slurm", "--config", "configs/runs/tiny-synth.yaml", "--nodes", "3", "--gpus-per-node", "1",
               "--set", "data.train=x", "--dry-run"]
        want = "for 3 nodes x 1 GPUs (world size 3): ep_size=2 must divide the world size 3"
    else:
        cmd = ["moe-dist", "slurm", "--config", "configs/runs/tiny-synth.yaml", "--nodes", "1", "--gpus-per-node", "2",
               "--set", "data.train=x", "--set", f"output_dir={tmp_path}"]
        env["PATH"] = os.path.dirname(shutil.which("moe-dist")) + ":/usr/local/bin:/bin"
        env["PATH"] = ":".join(p for p in env["PATH"].split(":") if not os.path.exists(os.path.join(p, "sbatch")))
        want = "sbatch is not installed"
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert want in res.stderr and "Traceback" not in res.stderr


def test_deepspeed_env_file_is_private_and_forwards_no_credentials(tmp_path):
    """Issue 10, item 10: .deepspeed_env (what the pdsh runner exports to remote ranks) is 0600, leaves
    out HF_TOKEN and other credentials, and no value can add a line. Issue 25, item 2: FORWARD_ENV may not
    name a credential (the runner would put it on the pdsh command line); test_hardening_launch.py runs
    the real runner."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "deepspeed").write_text("#!/usr/bin/env bash\nexit 0\n")  # stands in for the runner
    (fake / "deepspeed").chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=1\nn2 slots=1\n")
    work = tmp_path / "work"
    work.mkdir()
    env_file = work / ".deepspeed_env"
    env_file.write_text("OLD=1\n")
    env_file.chmod(0o644)  # a world-readable file left by an older launch
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", HOSTFILE=str(hostfile),
               HF_TOKEN="hf_secret", HUGGING_FACE_HUB_TOKEN="hf_secret2", HF_HOME="/cache/hf", NCCL_DEBUG="INFO",
               MOE_DIST_NOTE="x\nHF_TOKEN=injected", FORWARD_ENV="")
    cmd = ["bash", os.path.join(ROOT, "launch", "deepspeed.sh"),
           os.path.join(ROOT, "configs", "runs", "tiny-synth.yaml")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    lines = env_file.read_text().splitlines()
    assert "NCCL_DEBUG=INFO" in lines and "HF_HOME=/cache/hf" in lines and "OLD=1" not in lines
    assert not any("secret" in line or line.startswith("MOE_DIST_NOTE") for line in lines), lines
    assert "not forwarding MOE_DIST_NOTE" in res.stderr
    assert sorted(p.name for p in work.iterdir()) == [".deepspeed_env"]  # no temporary file left

    res = subprocess.run(cmd, capture_output=True, text=True, cwd=work,
                         env=dict(env, FORWARD_ENV="NCCL_DEBUG HF_TOKEN"), timeout=60)
    assert res.returncode == 2 and "FORWARD_ENV names HF_TOKEN, a credential" in res.stderr, res.stderr
    assert "hf_secret" not in res.stderr


def test_rendered_script_keeps_every_value_through_real_sbatch(slurm, synth, tmp_path):
    """Issue 10, item 7, on the real sbatch: #SBATCH values with spaces, quotes, '#' and '%' and --set
    values with $(...), backticks, braces and globs arrive unchanged (training is replaced by a recorder
    that saves its argv, so no rank starts)."""
    marker, record, recorder = tmp_path / "pwned", tmp_path / "argv", tmp_path / "recorder"
    recorder.write_text('#!/usr/bin/env bash\nfor a in "$@"; do\n'
                        '  if [ "$a" = train ]; then printf "%s\\0" "$@" > "$RECORD"; exit 0; fi\ndone\n')
    recorder.chmod(0o755)
    out = tmp_path / "run dir's \"q\" no#1 {a,b} 50%"  # (" #" would start a YAML comment in --set)
    job_name = f"it's \"a\" job #2 $(touch {marker})"
    sets = [f"data.train={synth / 'train'}", f"data.val={synth / 'val'}", f"data.tokenizer={synth / 'tok.model'}",
            f"output_dir={out}", f"checkpoint.dir=/x  y $(touch {marker}) `touch {marker}` *", "ep_size=1"]
    cmd = ["moe-dist", "slurm", "--config", "configs/runs/tiny-synth.yaml", "--nodes", "1", "--gpus-per-node", "1",
           "--no-gres", "--launcher", "srun", "--job-name", job_name, '--sbatch=--comment=a # b "c"']
    res = subprocess.run(cmd + [arg for s in sets for arg in ("--set", s)], capture_output=True, text=True, cwd=ROOT,
                         env=dict(slurm, PYTHON=str(recorder), RECORD=str(record)), timeout=120)
    assert res.returncode == 0, res.stderr
    job = res.stdout.split("Submitted batch job ")[1].split()[0]
    deadline = time.time() + 120
    while _job(slurm, job).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.time() < deadline, _job(slurm, job)
        time.sleep(1)
    info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=slurm).stdout
    log = out / f"slurm-{job}.out"
    assert _job(slurm, job)["JobState"] == "COMPLETED", log.read_text() if log.exists() else info
    assert log.exists(), f"the job log is not at {log}: {info}"
    assert f"JobName={job_name}\n" in info and 'Comment=a # b "c"' in info, info
    argv = record.read_bytes().decode().split("\0")[:-1]
    assert [v for flag, v in zip(argv, argv[1:]) if flag == "--set"] == sets, argv
    assert not marker.exists(), "a value ran a command substitution"


def _kill_node(job, node):
    """SIGKILL every process of ``job`` on ``node`` (the launcher srun started there and its ranks): a node
    lost. Both simulated nodes share this machine, so they are told apart by SLURMD_NODENAME."""
    killed = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"SLURM_JOB_ID") == job.encode() and env.get(b"SLURMD_NODENAME") == node.encode() \
                and b"SLURM_STEP_ID" in env and env.get(b"SLURM_STEP_ID") != b"batch":
            try:
                os.kill(int(pid), 9)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


def test_a_node_lost_mid_run_resumes_on_another_layout_with_the_optimizer_state(slurm, synth, tmp_path):
    """Issue 26, item 4: an 8-rank job (4 per node, ep_size 4, ZeRO-2) loses node n2 mid-run; the job
    submitted again on 2 ranks per node (world size 4) resumes the newest complete checkpoint with its Adam
    state (a layout change, so optim_state carries it) and the step counter and data stream go on. SLURM
    keeps a requeued job's environment, so a layout change is a new submission into the same output_dir."""
    out, log1, log2 = tmp_path / "run", tmp_path / "job1.out", tmp_path / "job2.out"
    sets = dict(steps=8, ep_size=4, zero_stage=2, **{"checkpoint.every": 2, "batch.micro_batch": 4,
                                                     "logging.tensorboard": "false", "eval.every": 0,
                                                     "debug.pause_in_save_s": 1})  # the kill lands mid-run
    first = _sbatch(dict(slurm, GPUS_PER_NODE="4"), synth, out, log1, **sets)  # (its launch on both nodes: below)
    assert first.returncode == 0, first.stderr
    job = first.stdout.strip().split(";")[0]
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step00000002" / "COMPLETE").exists():
        assert time.time() < deadline, log1.read_text()[-3000:] if log1.exists() else "job never started"
        assert _job(slurm, job).get("JobState") in ("PENDING", "RUNNING"), log1.read_text()[-3000:]
        time.sleep(0.2)
    assert _kill_node(job, "n2"), "no process of the job on n2"
    while _job(slurm, job).get("JobState") in ("PENDING", "RUNNING", "COMPLETING"):
        assert time.time() < deadline, _job(slurm, job)
        time.sleep(0.5)
    assert _job(slurm, job)["JobState"] == "FAILED", log1.read_text()[-3000:]
    done = [m["step"] for m in metrics(out) if "loss/total" in m]
    assert 2 <= max(done) < 8 and "world size 8: data-parallel 8, expert-parallel 4" in log1.read_text()
    second = _sbatch(dict(slurm, GPUS_PER_NODE="2"), synth, out, log2, wait=True,
                     **dict(sets, **{"batch.micro_batch": 8, "logging.tensorboard": "true"}))
    text = log2.read_text()
    assert second.returncode == 0, second.stderr + text[-3000:]
    assert "nodes n[1-2], 2 per node" in text and "launcher=deepspeed" in text
    assert "world size 4: data-parallel 4, expert-parallel 4" in text
    resumed = [line for line in text.splitlines() if line.startswith("resumed from")]
    assert len(resumed) == 1, text[-3000:]
    step = int(resumed[0].split(" at step ")[1].split()[0])
    assert step >= 2 and step % 2 == 0
    assert ("(world_size 8, ep_size 4, zero_stage 2, precision fp32 -> world_size 4, ep_size 4, zero_stage 2, "
            f"precision fp32): the weights, Adam's moments and step count ({step}) carried over") in resumed[0]
    assert "the data stream continues epoch 0 where the 8 rank(s) of the checkpoint left it" in resumed[0]
    after = [m["step"] for m in metrics(out) if "loss/total" in m]
    assert after[len(done):] == list(range(step + 1, 9)), after
    assert (out / "checkpoints" / "step00000008" / "COMPLETE").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))  # written by the second job only
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/total")] == list(range(step + 1, 9))

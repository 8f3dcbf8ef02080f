"""Issue 10, item 7: ``moe-dist slurm`` may not let a value inject shell lines into the batch script.

Control characters in anything that lands on an ``#SBATCH`` line are refused, and ``--set`` values
reach ``moe-dist train`` unchanged whatever they hold (spaces, quotes, ``$(...)``, braces, globs). The
second check runs the rendered script itself with stub ``srun``/``scontrol``/``deepspeed``/python
commands that record the training command line, so it holds however the script carries the arguments.
"""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_CONFIG = os.path.join(ROOT, "configs", "runs", "tiny-synth.yaml")

# records the argv of the call that starts training (NUL-separated); other calls (hostfile.py) do nothing
RECORDER = """#!/usr/bin/env bash
for arg in "$@"; do
  if [ "$arg" = train ]; then printf '%s\\0' "$@" > "$RECORD"; exit 0; fi
done
"""
STUBS = {
    "srun": '#!/usr/bin/env bash\nwhile [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n',
    "scontrol": '#!/usr/bin/env bash\n[ "${2:-}" = hostnames ] && echo localhost\nexit 0\n',
    "deepspeed": RECORDER,
    "python-stub": RECORDER,
}


def render(*args, timeout=120):
    cmd = ["moe-dist", "slurm", "--config", RUN_CONFIG, "--nodes", "1", "--gpus-per-node", "2", "--dry-run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def report(res, n=1200):
    """Exit code, the head of stdout (the #SBATCH lines and settings) and the tail of stderr."""
    return f"exit {res.returncode}\n--- stdout\n{res.stdout[:n]}\n--- stderr\n{res.stderr[-n:]}"


@pytest.mark.parametrize("args, field", [
    (["--job-name", "a\nb"], "job"),
    (["--partition", "p\ntouch /tmp/x"], "partition"),
    (["--set", 'output_dir="x\\ny"'], "output_dir"),  # YAML double quotes: a real newline
], ids=["job-name", "partition", "output_dir"])
def test_control_characters_in_sbatch_lines_are_refused(args, field):
    res = render(*args)
    assert res.returncode == 2, f"a newline was rendered into the script\n{report(res)}"
    assert "#SBATCH" not in res.stdout, report(res)
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and field in errors[0], report(res)


def stub_bin(directory):
    directory.mkdir()
    for name, text in STUBS.items():
        (directory / name).write_text(text)
        (directory / name).chmod(0o755)
    return directory


def run_batch_script(script, tmp_path):
    """Run a rendered script as a one-node job would, with stubs; returns the recorded training argv."""
    path, record, repo = tmp_path / "train.sbatch", tmp_path / "argv", tmp_path / "repo"
    path.write_text(script)
    repo.mkdir()
    (repo / "a-file").touch()  # something for an unquoted * to expand to
    stubs = stub_bin(tmp_path / "bin")
    env = dict(os.environ, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", PYTHON=str(stubs / "python-stub"),
               REPO=str(repo), RECORD=str(record), SLURM_JOB_ID="7", SLURM_JOB_NODELIST="localhost",
               SLURM_NODEID="0", SLURM_SUBMIT_DIR=str(repo))
    res = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=60, env=env, cwd=repo)
    assert res.returncode == 0 and record.exists(), f"the script did not start training\n{report(res)}"
    return record.read_bytes().decode().split("\0")[:-1]


def set_values(argv):
    return [value for flag, value in zip(argv, argv[1:]) if flag == "--set"]


@pytest.mark.parametrize("launcher", ["deepspeed", "srun"])
def test_set_values_survive_the_batch_script(launcher, tmp_path):
    marker = tmp_path / "pwned"
    sets = [f"checkpoint.dir=/tmp/ck  dir/it's \"quoted\" $(touch {marker}) `touch {marker}` {{a,b}} *",
            "optimizer.betas=[0.9, 0.95]", "steps=7"]
    res = render("--launcher", launcher, *[arg for s in sets for arg in ("--set", s)])
    assert res.returncode == 0, report(res)
    syntax = subprocess.run(["bash", "-n"], input=res.stdout, capture_output=True, text=True)
    assert syntax.returncode == 0, f"the rendered script is not valid bash: {syntax.stderr}"
    argv = run_batch_script(res.stdout, tmp_path)
    assert not marker.exists(), "a --set value ran a command substitution"
    assert set_values(argv) == sets, f"moe-dist train got {argv}"

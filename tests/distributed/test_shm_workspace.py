"""DeepSpeed's CPU all-reduce workspace in /dev/shm (~70 MB, never unlinked by DeepSpeed) is unlinked by
``init_distributed``, also for one rank under the deepspeed launcher (LOCAL_SIZE=1 turns the op on).
Two ranks are covered by tests/integration/test_train.py's launcher test."""

import os
import subprocess
import sys

from helpers.harness import free_port

SCRIPT = """
import os, torch
from moe_dist.distributed import detect_env, init_distributed
env = detect_env()
init_distributed(env)
from deepspeed.comm import comm
print("op", comm.cdb.shm_comm_op is not None)
t = torch.ones(4)
comm.all_reduce(t)
print("sum", float(t.sum()))
"""


def test_one_rank_leaves_no_workspace():
    port = free_port()
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "op True" in res.stdout and "sum 4.0" in res.stdout, res.stdout
    name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0"
    assert not os.path.exists(name)

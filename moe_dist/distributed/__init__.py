"""Process groups and the launcher's environment: one place that reads who started us and where the
other ranks are (torchrun, the deepspeed launcher, srun, MPI, or nothing)."""

from .env import (DistEnv, check_host_name, detect_env, expand_nodelist, free_port, init_distributed,
                  slurm_master_port)

__all__ = ["DistEnv", "check_host_name", "detect_env", "expand_nodelist", "free_port", "init_distributed",
           "slurm_master_port"]

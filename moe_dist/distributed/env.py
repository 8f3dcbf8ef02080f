"""Rank, world size and rendezvous address from whichever launcher started us, in one function.

Checked in order: torchrun / the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
SLURM's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, first host of SLURM_JOB_NODELIST), Open MPI /
MPICH (OMPI_COMM_WORLD_*, PMI_*), and otherwise a single process on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


# A host name as a hostfile line may hold one: DeepSpeed's hostfile parser splits lines on whitespace,
# launch/deepspeed.sh reads '#' as a comment, the pdsh runner pastes the first host into a shell command
# and hands the list to pdsh -w (which splits on ',' and expands '[...]'), DeepSpeed's --include splits
# on ':' and '@', and a leading '-' reads as an option.
_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)


def check_host_name(host: str, source: str) -> str:
    """``host`` unchanged, or a ``ValueError`` naming it and ``source`` (the option or list it came from).

    Letters, digits, '.', '-' and '_', starting with a letter or digit: a newline or space would add a
    hostfile line or a ``slots=`` field, and '=', '#', ',', quotes or '$' would be read by a parser or a shell.
    """
    if not _HOST_NAME.fullmatch(host):
        raise ValueError(f"{source}: {host!r} is not a host name; use letters, digits, '.', '-' and '_' "
                         "(no whitespace, control characters or punctuation such as '=', '#', ',', '$')")
    return host


def _split_outside_brackets(text: str) -> List[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _expand_item(item: str, nodelist: str) -> List[str]:
    """One comma-free item of a SLURM host list: text with any number of ``[ranges]`` groups."""
    match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\](.*)", item)
    if match is None:
        if "[" in item or "]" in item:
            raise ValueError(f"node list {nodelist!r}: unbalanced brackets in {item!r}")
        return [item]
    prefix, ranges, rest = match.groups()
    numbers: List[str] = []
    for part in ranges.split(","):
        lo, dash, hi = part.partition("-")
        if not (lo.isdigit() and (hi.isdigit() or not dash)) or (dash and int(hi) < int(lo)):
            raise ValueError(f"node list {nodelist!r}: {part!r} in [{ranges}] is not a number or a rising "
                             "range N-M")
        numbers += [lo] if not dash else [f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1)]
    return [prefix + number + tail for number in numbers for tail in _expand_item(rest, nodelist)]


def expand_nodelist(nodelist: str) -> List[str]:
    """SLURM compressed host lists: "gpu[01-03,07],cpu5" -> gpu01 gpu02 gpu03 gpu07 cpu5; also
    "rack[1-2]-n[1-2]" -> rack1-n1 rack1-n2 rack2-n1 rack2-n2.

    Raises:
        ValueError: unbalanced brackets, a range that is not N-M with N <= M, or a resulting name that is
            not a host name (``check_host_name``), naming the list.
    """
    hosts: List[str] = []
    for item in _split_outside_brackets(nodelist.strip()):
        if item:
            hosts += [check_host_name(host, f"node list {nodelist!r}") for host in _expand_item(item, nodelist)]
    return hosts


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    hosts = expand_nodelist(nodelist)
    return hosts[0] if hosts else "127.0.0.1"


def slurm_master_port(job_id) -> int:
    """The rendezvous port of a SLURM job: the same on every node, different for jobs sharing a node
    (launch/slurm/train.sbatch asks this function too)."""
    return 20000 + int(job_id or 0) % 20000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_env(environ: Optional[Dict[str, str]] = None) -> DistEnv:
    """The launcher's view of this process (``environ`` defaults to ``os.environ``)."""
    env = os.environ if environ is None else environ
    port = int(env.get("MASTER_PORT", 0) or 0)
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed" if "DEEPSPEED_LAUNCHER" in env or "CROSS_RANK" in env else "torchrun"
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), port or 29500, launcher)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
                       port or slurm_master_port(env.get("SLURM_JOB_ID")), "slurm")
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        rank = int(env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK", 0)))
        world = int(env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE", 1)))
        local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", 0)))
        return DistEnv(rank, world, local, env.get("MASTER_ADDR", "127.0.0.1"), port or 29500, "mpi")
    return DistEnv(0, 1, 0, "127.0.0.1", port or free_port(), "none")


def init_distributed(env: DistEnv) -> None:
    """Export the standard variables and start DeepSpeed's process group on the accelerator's backend."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(env.local_rank)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False,
                               verbose=False)
    if accelerator.device_name() == "cpu":
        release_shm_workspace(env)


def release_shm_workspace(env: DistEnv) -> None:
    """Unlink the name of this rank's DeepSpeed CPU all-reduce workspace once every rank has mapped it.

    DeepSpeed's CPU communication op gives each rank of a single-node group (LOCAL_SIZE == world size,
    as the deepspeed launcher sets it, one rank included) a ~70 MB POSIX shared-memory workspace named
    after uid, master address, port and rank, and never unlinks it: each run left its workspaces in
    /dev/shm, and a few hundred runs filled a node's RAM. The barrier proves every peer has opened this
    rank's workspace; after it, unlinking only drops the name, the mappings stay valid, and the memory
    is freed when the processes exit, however they exit.
    """
    import torch.distributed as dist

    name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.master_addr}_{env.master_port}_{env.rank}"
    if env.world_size > 1:
        dist.barrier()
    try:
        os.unlink(name)
    except FileNotFoundError:  # the op is off (ranks on several nodes, or not built): nothing was created
        pass

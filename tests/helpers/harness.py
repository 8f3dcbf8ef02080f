"""Run a test function on N real ranks (spawned processes, gloo on CPU / nccl on GPU).

    results = run_ranks(fn, world_size=2, args=(...))   # fn(rank, world_size, *args) -> picklable

Each rank initialises ``deepspeed.init_distributed`` on loopback with a fresh port, seeds torch with
1000 + rank, and sends back its return value or its traceback. Any failure or a timeout kills all
ranks and fails the test with the rank's traceback, so a hang never blocks the suite.
"""

import multiprocessing as mp
import os
import queue
import traceback

from moe_dist.distributed import free_port


def _entry(fn, rank, world_size, port, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    try:
        import deepspeed
        import torch
        from deepspeed.accelerator import get_accelerator

        torch.set_num_threads(1)
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   verbose=False)
        torch.manual_seed(1000 + rank)
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", out))
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException:  # report everything, including assertion errors, to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, world_size: int = 2, args=(), timeout: float = 240.0):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outs, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, value = results.get(timeout=timeout)
            if status == "ok":
                outs[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
                break
    except queue.Empty:
        errors.append(f"timed out after {timeout}s waiting for ranks {sorted(set(range(world_size)) - set(outs))}")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed test failed:\n" + "\n".join(errors))
    return [outs[r] for r in range(world_size)]

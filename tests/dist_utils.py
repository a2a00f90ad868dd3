"""Run a test function in N gloo processes on CPU (free port, no fixed 29500)."""

import os
import socket
import sys
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _report(errors, rank: int, what: str) -> None:
    """Send the exception being handled to the parent. SimpleQueue writes to the pipe before
    put returns, and the parent reads only after the processes end, so a message must fit
    the pipe's 64 KiB buffer: keep the tail."""
    errors.put(f"rank {rank}{what}:\n{traceback.format_exc()[-16000:]}")


def _worker(rank, world, port, fn, args, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    code = 0
    try:
        fn(rank, world, *args)
    except BaseException:
        _report(errors, rank, "")
        code = 1
    finally:
        # No interpreter finalization, as in moe_dist.train: a group that fn left alive (a
        # ParallelLayout caught in a traceback's reference cycle) still has a gloo worker
        # thread that may be releasing a finished collective's tensors. It needs the GIL, and
        # a thread taking the GIL during finalization aborts the process ("terminate called
        # without an active exception", SIGABRT; 1 run in ~20 of
        # test_ranks_split_the_shard_hashing_..., gdb: ~AsyncAllgatherWork in
        # ProcessGroupGloo::runLoop -> take_gil -> pthread_exit).
        try:
            dist.destroy_process_group()
        except BaseException:
            _report(errors, rank, ": destroy_process_group")
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def run_distributed(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) on `world` processes; re-raise the first failure."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_worker, args=(world, free_port(), fn, args, errors), nprocs=world, start_method="spawn")
    except Exception as e:
        msg = errors.get() if not errors.empty() else str(e)
        raise AssertionError(msg) from None

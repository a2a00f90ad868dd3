"""Run a test function, or `python -m moe_dist.train`, in N gloo processes on CPU (free port,
no fixed 29500).

Processes come from one forkserver per test session that has imported torch, DeepSpeed and
moe_dist once. Spawning a fresh interpreter per rank costs ~3.4 s of imports on the 2-core CI
machine (4.4 s with DeepSpeed): that was most of the suite's time. A forked child is a fresh
process in every other way: its own pid, environment, working directory and output files.
It is not fresh in what the server set up at import: Python's string-hash seed is the
server's for every rank, where torchrun gives each its own. The ranks run on CPU (gloo),
on a GPU machine too: the server starts with CUDA hidden, so CUDA is never initialised
before a fork. The launch scripts themselves (launch/torchrun.sh, mpirun.sh, deepspeed.sh) are tested for
real in test_launch.py.
"""

import contextlib
import ctypes
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imported once in the forkserver. torch._dynamo (and with it triton, compiled) is among them:
# constructing any torch optimizer imports it, 2.1 s of every training process here.
_PRELOAD = [
    "torch", "torch._dynamo", "torch.distributed", "torch.distributed.checkpoint", "numpy", "yaml", "deepspeed",
    "torch.utils.tensorboard", "webdataset", "torchdata.stateful_dataloader", "tokenizers",
    "moe_dist.train", "moe_dist.trainer.trainer", "moe_dist.trainer.deepspeed_backend", "dist_utils",
]  # fmt: skip
# Read when the server starts or imports, so a child cannot change them: TRITON_INTERPRET=1
# would still find triton compiled. A test that needs one set must start a real subprocess.
# Names, not prefixes like TRITON_ or TORCHINDUCTOR_: torch itself writes variables of those
# (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR, ...) into os.environ when it first compiles,
# for its workers to read at run time, which a forked rank does as well.
_READ_AT_IMPORT = ("TRITON_INTERPRET", "TORCHDYNAMO_", "TORCH_LOGS", "TORCH_CPP_LOG_LEVEL", "PYTHONHASHSEED")
# Set for the server and every rank, whatever the test passes: one-thread CPU ranks
# (importing DeepSpeed asks CUDA for devices, which would make later forks unsafe; DeepSpeed
# caches its accelerator at import).
_CPU_ONLY = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
_SERVER_ENV: dict | None = None  # the _READ_AT_IMPORT variables the server started with


def _context():
    """The session's forkserver context, started under _CPU_ONLY. OMP_NUM_THREADS=1: libgomp
    reads it when torch is loaded, in the server, and every rank here runs one thread (as
    torchrun sets for nproc > 1). The test process's own environment is left as it was."""
    global _SERVER_ENV
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    old = {k: os.environ.get(k) for k in _CPU_ONLY}
    os.environ.update(_CPU_ONLY)
    try:
        if _SERVER_ENV is None:  # the server starts once, on the first call
            _SERVER_ENV = {k: v for k, v in os.environ.items() if k.startswith(_READ_AT_IMPORT)}
        multiprocessing.forkserver.ensure_running()
    finally:
        for k, v in old.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    return ctx


def _check_env(env: dict) -> None:
    for k in sorted(set(env) | set(_SERVER_ENV)):
        if k.startswith(_READ_AT_IMPORT) and env.get(k) != _SERVER_ENV.get(k):
            raise AssertionError(
                f"{k}={env.get(k)!r}, but the forked ranks imported torch, triton and DeepSpeed under "
                f"{k}={_SERVER_ENV.get(k)!r} (tests/dist_utils.py): run this test in a subprocess"
            )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _report(errors, rank: int, what: str) -> None:
    """Send the exception being handled to the parent. SimpleQueue writes to the pipe before
    put returns, and the parent reads only after the processes end, so a message must fit
    the pipe's 64 KiB buffer: keep the tail."""
    errors.put(f"rank {rank}{what}:\n{traceback.format_exc()[-16000:]}")


def _enter_rank(env: dict) -> None:
    """A forked rank takes `env` (the test's environment, as a spawned child would see it)
    under _CPU_ONLY, one thread, and dies with the server."""
    _die_with_server()
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(_CPU_ONLY)
    import torch

    torch.set_num_threads(1)  # _CPU_ONLY's OMP_NUM_THREADS: libgomp read it in the server


def _worker(rank, world, port, fn, args, errors, env):
    _enter_rank(dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)))
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
    ctx = _context()
    _check_env(dict(os.environ))
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(
            _worker, args=(world, free_port(), fn, args, errors, dict(os.environ)), nprocs=world, start_method="forkserver"
        )
    except Exception as e:
        msg = errors.get() if not errors.empty() else str(e)
        raise AssertionError(msg) from None


def _die_with_server() -> None:
    """SIGKILL this rank when the forkserver exits (it exits with the test process): a rank
    whose test was interrupted must not train on as an orphan."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)


def _train_rank(argv, env, cwd, out_path, err_path):
    """One rank of `python -m moe_dist.train argv`: its module's __main__ block, here."""
    _enter_rank(env)
    os.chdir(cwd)
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    from moe_dist import train

    sys.argv = ["moe_dist.train", *argv]
    try:
        rc = train.main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # as moe_dist/train.py ends


def run_train(nproc, argv, *, env=None, cwd=REPO, timeout=600, distributed=True) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node nproc -m moe_dist.train argv` (or, distributed=False, a plain
    `python -m moe_dist.train argv`), as the launcher runs it: the env:// variables set per
    rank, and the first rank to fail ends the others (SIGTERM, then SIGKILL after 10 s), as
    torchrun's agent does. stdout and stderr are the ranks' outputs in rank order; the
    returncode is 0, or that of the lowest rank found failed when the job was stopped (a
    signal as its negative number)."""
    assert distributed or nproc == 1
    base = dict(os.environ if env is None else env)
    port = str(free_port())
    ctx = _context()
    _check_env(base)
    with tempfile.TemporaryDirectory(prefix="moe_dist_run_") as tmp:
        procs, paths = [], []
        try:
            for rank in range(nproc):
                e = dict(base)
                if distributed:
                    e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                             GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
                paths.append((os.path.join(tmp, f"{rank}.out"), os.path.join(tmp, f"{rank}.err")))
                p = ctx.Process(target=_train_rank, args=(list(argv), e, cwd, *paths[-1]))
                p.start()
                procs.append(p)
            deadline, failed, timed_out = time.monotonic() + timeout, None, False
            while any(p.exitcode is None for p in procs):
                failed = next((p for p in procs if p.exitcode not in (None, 0)), None)
                timed_out = time.monotonic() > deadline
                if failed is not None or timed_out:
                    break
                time.sleep(0.05)
        finally:  # a failure, a timeout, or the test itself interrupted: no rank outlives it
            _stop(procs)
        if timed_out:
            raise subprocess.TimeoutExpired(argv, timeout)
        failed = failed or next((p for p in procs if p.exitcode != 0), None)
        read = lambda path: open(path, errors="replace").read() if os.path.exists(path) else ""
        return subprocess.CompletedProcess(
            argv, 0 if failed is None else failed.exitcode,
            "".join(read(out) for out, _ in paths), "".join(read(err) for _, err in paths),
        )  # fmt: skip


def _stop(procs) -> None:
    """SIGTERM the running ranks, SIGKILL those still running 10 s later, reap them all."""
    for p in procs:
        if p.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    end = time.monotonic() + 10
    while time.monotonic() < end and any(p.exitcode is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        if p.exitcode is None:
            p.kill()
        p.join()

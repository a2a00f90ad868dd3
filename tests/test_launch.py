"""Launch paths on CPU (gloo): launch/torchrun.sh, mpirun.sh and deepspeed.sh train 2
processes to the same losses; two torchrun "nodes" on one machine train; a rank that dies
or hangs ends the whole job with a clear error in bounded time."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY
from dist_utils import free_port
from moe_dist.trainer.metrics import WALL_CLOCK_FIELDS

STEPS = 6
BASE = TINY + [
    f"train.max_steps={STEPS}", "train.eval_every=3", "checkpoint.every=0", "checkpoint.save_final=false",
    "data.rank_split=batch", "parallel.ep=2", "train.resume=none",
]


def launch(script, run_dir, *overrides, env=None, timeout=300):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    e.pop("MOE_DIST_FAULT", None)
    if env and "MOE_DIST_FAULT" in env:
        e["MOE_DIST_FAULT"] = env["MOE_DIST_FAULT"]
    cmd = [os.path.join(REPO, "launch", script), os.path.join(REPO, "configs", "quickstart.yaml"), *BASE,
           f"run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK_FIELDS} for line in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "torchrun"
    p = launch("torchrun.sh", run, env={"NPROC": "2"})
    assert p.returncode == 0, p.stderr[-3000:]
    rows = metrics(run)
    assert len([r for r in rows if "loss" in r]) == STEPS and rows[-1]["step"] == STEPS
    return rows


@pytest.mark.parametrize("script, env", [("mpirun.sh", {"NP": "2"}), ("deepspeed.sh", {"NPROC": "2"})])
def test_launchers_give_the_same_losses(script, env, reference, tmp_path):
    p = launch(script, tmp_path / "run", env=env)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    assert metrics(tmp_path / "run") == reference  # bit for bit: same layout, same batches


def test_deepspeed_launcher_with_the_deepspeed_backend(reference, tmp_path):
    """deepspeed.sh running the DeepSpeed engine (ZeRO-2) gives the torch backend's losses."""
    p = launch("deepspeed.sh", tmp_path / "run", "train.backend=deepspeed", "deepspeed.zero_stage=2", env={"NPROC": "2"})
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    got = metrics(tmp_path / "run")
    assert [sorted(r) for r in got] == [sorted(r) for r in reference]
    for a, b in zip(reference, got):
        for k in ("loss", "lm_loss", "aux_loss", "val_loss"):
            if k in a:
                assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (k, a, b)


def test_two_nodes_on_one_machine(reference, tmp_path):
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [os.path.join(REPO, "launch", "torchrun.sh"), os.path.join(REPO, "configs", "quickstart.yaml"), *BASE,
             f"run.dir={tmp_path / 'run'}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1", NNODES="2", NODE_RANK=str(node), NPROC="1",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for node in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert metrics(tmp_path / "run") == reference
    # Without NODE_RANK every node would claim node 0: refused before launching anything.
    p = launch("torchrun.sh", tmp_path / "norank", env={"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
    assert p.returncode == 2
    assert p.stderr.strip() == "error: NNODES=2 needs NODE_RANK (0..1) on every node, or RDZV_ENDPOINT"


@pytest.mark.parametrize("fault, every", [("kill_rank:1:3", 0), ("hang_rank:1:3", 0), ("hang_rank:1:3", 3)])
def test_a_dead_or_hung_rank_ends_the_job(fault, every, tmp_path):
    t0 = time.monotonic()
    p = launch("torchrun.sh", tmp_path / "run", "parallel.timeout_s=10", f"checkpoint.every={every}",
               env={"NPROC": "2", "MOE_DIST_FAULT": fault})
    elapsed = time.monotonic() - t0
    assert p.returncode != 0
    assert elapsed < 120, elapsed
    if fault.startswith("hang"):
        # rank 0 waits at most parallel.timeout_s, then says why and exits
        where = "in the save of step 3" if every else "at step 4"
        assert f"error: rank 0: a collective failed {where}; another rank died or hangs" in p.stderr
    else:
        assert "exitcode  : -9" in p.stderr or "Signal 9" in p.stderr or "SIGKILL" in p.stderr


SLOW_RANK0 = """
import os, runpy, sys, time
import moe_dist.trainer.checkpoint as ckpt
import moe_dist.trainer.trainer as trainer
if os.environ["RANK"] == "0":  # rank 0's one-rank work takes longer than parallel.timeout_s
    prepare, sha = trainer.ensure_prepared, ckpt.sha256_file
    calls = []
    def slow_prepare(*a, **k):
        calls.append(1)
        if len(calls) == 1:  # the preparation the others wait for
            time.sleep(8)
        return prepare(*a, **k)
    def slow_sha(path):
        time.sleep(1.5)
        return sha(path)
    trainer.ensure_prepared, ckpt.sha256_file = slow_prepare, slow_sha
sys.argv = ["moe_dist.train", *sys.argv[1:]]
runpy.run_module("moe_dist.train", run_name="__main__")
"""


def test_rank0_alone_may_take_longer_than_the_collective_timeout(tmp_path):
    """Data preparation and checkpoint checksums grow with the corpus and the checkpoint,
    not the step: the other ranks wait for them on the wait group (parallel.wait_timeout_s),
    not under parallel.timeout_s (5 s here; rank 0 takes 8 s and 6 x 1.5 s)."""
    driver = tmp_path / "slow_rank0.py"
    driver.write_text(SLOW_RANK0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(driver), *BASE, f"run.dir={tmp_path / 'run'}", "parallel.timeout_s=5", "train.max_steps=2",
           "checkpoint.every=2"]
    p = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "step_00000002" / "meta.json")


def test_srun_tasks_without_rank_are_refused(monkeypatch):
    """Plain `srun -n 4 python -m moe_dist.train`: no RANK, so each task was a world of
    one, all training into the same run.dir."""
    from moe_dist.config import ParallelConfig
    from moe_dist.errors import LaunchError
    from moe_dist.parallel.layout import ParallelLayout

    for var in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    with pytest.raises(LaunchError) as e:
        ParallelLayout.from_env(ParallelConfig())
    assert str(e.value).startswith("launched by srun with 4 tasks (SLURM_STEP_NUM_TASKS) but RANK is not set")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # one task (or a batch script): one process
    assert ParallelLayout.from_env(ParallelConfig()).world_size == 1


def test_mpirun_master_address_is_never_loopback_across_nodes(monkeypatch):
    """Rank 0 tells the others where to connect. Its hostname resolving to 127.0.1.1
    (Debian's /etc/hosts) is fine on one node; across nodes the default route's address
    is taken, and with none an error names MASTER_ADDR."""
    import socket

    from moe_dist.errors import LaunchError
    from moe_dist.parallel.layout import master_address

    class Udp:
        addr = "10.1.2.3"

        def __init__(self, *a):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def connect(self, where):
            pass

        def getsockname(self):
            return (self.addr, 5)

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    monkeypatch.setattr(socket, "socket", Udp)
    assert master_address(multi_node=False) == "127.0.1.1"
    assert master_address(multi_node=True) == "10.1.2.3"
    Udp.addr = "127.0.0.1"  # no route out either
    with pytest.raises(LaunchError, match="resolves to 127.0.0.1, which the other nodes cannot reach: set MASTER_ADDR"):
        master_address(multi_node=True)
    monkeypatch.setenv("MASTER_ADDR", "10.9.9.9")
    assert master_address(multi_node=True) == "10.9.9.9"


def test_deepspeed_sh_refuses_its_slurm_runner():
    """DeepSpeed's SLURM runner starts `python -u moe_dist.train` (it drops --module)."""
    p = subprocess.run(["bash", "launch/deepspeed.sh", "configs/quickstart.yaml"], cwd=REPO, capture_output=True,
                       text=True, env=dict(os.environ, DS_LAUNCHER="slurm", HOSTFILE="hosts"), timeout=60)
    assert p.returncode == 2 and "use launch/slurm.sbatch" in p.stderr

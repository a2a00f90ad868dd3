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

"""Benchmark tools stay runnable: tiny shapes, one process (numbers are not checked here)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from dist_utils import free_port


def test_bench_moe_layer_runs_all_three_layers():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
           "tools/bench_moe_layer.py", "--tokens", "256", "--d-model", "32", "--d-expert", "64", "--experts", "4",
           "--warmup", "1", "--iters", "2", "--repeat", "2", "--profile", "1", "--synced"]
    p = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "cf 1.25, torch.float32, median of 2 samples of 2 back-to-back step(s)" in p.stdout
    rows = [line.split() for line in p.stdout.splitlines() if line[:2] in ("1 ", "2 ")]
    assert [(r[0], r[1]) for r in rows] == [(k, n) for k in "12" for n in ("ours", "ours-synced", "deepspeed", "dense")]
    assert all(r[3] == "1.00" for r in rows if r[1] == "ours")
    assert all(float(r[4]) > 0 for r in rows)  # a peak was measured for every layer
    assert "profile of ours, top-2, 1 forward+backward steps:" in p.stdout
    calls = int(p.stdout.split("aten calls per forward+backward (nested calls included): ")[1].split()[0])
    assert calls > 50  # the routed layer's ops were recorded
    assert "aten::_grouped_mm" in p.stdout or "aten::mm" in p.stdout


def test_bench_moe_layer_synced_variant_restores_the_library():
    """--synced runs ours as before commit 0c948e1 (bincount counts: a host read, which
    meta tensors do not allow; drops left out) and then puts the library back."""
    import importlib.util

    import torch

    import moe_dist.moe.dispatch as dispatch
    import moe_dist.moe.layer as layer

    spec = importlib.util.spec_from_file_location("bench_moe_layer", os.path.join(REPO, "tools", "bench_moe_layer.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ids = torch.empty(6, dtype=torch.long, device="meta")
    cuda = torch.device("cuda")
    assert dispatch.computes_dropped(1, cuda) and layer.expert_counts(ids, 4).shape == (4,)
    with bench.synced_counts_and_drops():
        assert not dispatch.computes_dropped(1, cuda)
        for m in (dispatch, layer):
            with pytest.raises(NotImplementedError, match="bincount"):
                m.expert_counts(ids, 4)
    assert dispatch.computes_dropped(1, cuda) and layer.expert_counts(ids, 4).shape == (4,)
    assert layer.expert_counts is dispatch.expert_counts


def test_bench_moe_layer_dropless_and_compiled():
    """cf 0: dropless ours, DeepSpeed with drop_tokens=False; --compile adds ours and dense
    compiled (aot_eager here: the same graphs as inductor, without its code generation)."""
    cmd = [sys.executable, "tools/bench_moe_layer.py", "--tokens", "128", "--d-model", "32", "--d-expert", "64",
           "--experts", "4", "--warmup", "1", "--iters", "1", "--capacity-factor", "0", "--compile",
           "--compile-backend", "aot_eager"]
    p = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "cf 0.0, torch.float32" in p.stdout
    rows = [line.split() for line in p.stdout.splitlines() if line[:2] in ("1 ", "2 ")]
    names = ("ours", "deepspeed", "dense", "ours+c", "dense+c")
    assert [(r[0], r[1]) for r in rows] == [(k, n) for k in "12" for n in names]
    assert all(float(r[2]) > 0 and float(r[4]) > 0 for r in rows)


def test_bench_host_overhead_times_both_launch_paths():
    p = subprocess.run([sys.executable, "tools/bench_host_overhead.py", "--rounds", "1", "--calls", "3", "--tokens", "64"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in p.stdout.splitlines()[2:]}
    assert set(rows) == {"ops", "direct"}
    assert all(len(v) == 2 and min(v) > 0 for v in rows.values())

"""Benchmark tools stay runnable: tiny shapes, one process (numbers are not checked here)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, load_tool
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
    import torch

    import moe_dist.moe.dispatch as dispatch
    import moe_dist.moe.layer as layer

    bench = load_tool("bench_moe_layer")
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


def test_bench_grouped_gemm_parity_check_passes_right_and_fails_wrong_results(capsys):
    """The GPU benchmark checks each case against float32 before its times count. On CPU, in
    bf16, the torch backend must pass and a result off by one expert's weight must fail."""
    import torch

    from moe_dist.ops import grouped_mm as ops

    bench = load_tool("bench_grouped_gemm")
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 17, 1])
    x = torch.randn(23, 32, generator=g).bfloat16()
    w = (torch.randn(4, 32, 48, generator=g) / 32**0.5).bfloat16()
    dy = torch.randn(23, 48, generator=g).bfloat16()
    ref = lambda a, b: ops.grouped_mm_reference(a, b, counts)  # noqa: E731
    errs = bench.parity(lambda a, b: ops.grouped_mm(a, b, counts, "torch"), ref, [x, w], dy)
    assert set(errs) == {"y", "d0", "d1"} and max(errs.values()) < 1e-2
    assert bench.check("ours", errs, bench.PARITY_TOL[torch.bfloat16])
    # expert 3's single row multiplied by expert 2's weight: a wrong group offset
    wrong = torch.tensor([5, 0, 18, 0])
    bad = bench.parity(lambda a, b: ops.grouped_mm(a, b, wrong, "torch"), ref, [x, w], dy)
    assert bad["y"] > 0.05 and bad["d1"] > 0.05
    assert not bench.check("ours", bad, bench.PARITY_TOL[torch.bfloat16])
    # a method that raises fails its check instead of ending the run
    boom = bench.parity(lambda a, b: a[100], ref, [x, w], dy)
    assert not bench.check("ours", boom, 1.0)
    out = capsys.readouterr()
    assert out.out.count("FAILED") == 2 and "parity: IndexError" in out.err


def test_bench_activation_checkpoint_reports_both_settings(capsys):
    bench = load_tool("bench_activation_checkpoint")
    args = ["--config", os.path.join(REPO, "configs/tiny_switch.yaml"), "--batch", "8", "--rounds", "1", "--vocab", "256",
            "model.d_model=64", "model.n_layers=4", "moe.d_expert=128", "data.seq_len=64"]
    assert bench.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["none", "full"]
    totals = [float(line.split("peak MiB: total ")[1].split()[0]) for line in lines[1:]]
    assert 0 < totals[1] < totals[0]  # the checkpointed step peaks lower


def test_bench_host_overhead_times_both_launch_paths():
    p = subprocess.run([sys.executable, "tools/bench_host_overhead.py", "--rounds", "1", "--calls", "3", "--tokens", "64"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in p.stdout.splitlines()[2:]}
    assert set(rows) == {"ops", "direct"}
    assert all(len(v) == 2 and min(v) > 0 for v in rows.values())


# Ops (no views) of one training step on a GPU's path, forward and backward, at torch 2.13.0.
# A change that adds launches to a routed layer must say so here: on a GPU a small layer's
# time is its launches (docs/benchmarks.md). At commit 272f7e3 the routed ones were (71, 42), (71, 40), (51, 39), (46, 27), (90, 74) and (89, 68).
# SwitchHead's combines then stopped using index_add (moe/recompute.py says why) and weight
# their rows in slot order, which drops a gather: (68, 56) -> (66, 54).
LAYER_OPS = {
    "switch top-1 cf1.25": (55, 40),
    "top-2 cf1.25": (53, 32),
    "top-2 dropless": (36, 31),
    "sigma-moe top-2": (36, 27),
    "slicemoe top-2 cf1.25": (74, 66),
    "switchhead attention": (66, 54),
    "dense": (5, 12),
}
HOST_READS = {"_local_scalar_dense", "nonzero", "item", "bincount"}


def test_routed_layers_launch_the_counted_ops_and_read_nothing_on_the_gpu_path():
    import torch

    import moe_dist.moe.dispatch as dispatch

    if not torch.__version__.startswith("2.13."):  # other versions decompose some ops differently
        pytest.skip(f"op counts are pinned at torch 2.13 (the CI pin), not {torch.__version__}")
    tool = load_tool("count_layer_ops")
    got = {name: tuple(len(ops) for ops in tool.count_ops(name, "gpu")) for name in LAYER_OPS}
    assert got == LAYER_OPS
    for name in LAYER_OPS:
        fwd, bwd = tool.count_ops(name, "gpu")
        assert not HOST_READS & set(fwd + bwd), name  # no GPU sync in a step
    # The cpu path reads the kept count on the host (one sync, free here) where it drops.
    fwd, _ = tool.count_ops("top-2 cf1.25", "cpu")
    assert fwd.count("_local_scalar_dense") == 1 and "scatter_add_" not in fwd
    assert dispatch.host_reads_free(torch.device("cpu"))  # the gpu path was undone


def test_count_layer_ops_prints_counts_and_times():
    p = subprocess.run([sys.executable, "tools/count_layer_ops.py", "--tokens", "16", "--d-model", "16",
                        "--d-expert", "32", "--rounds", "1", "--steps", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {line[:24].strip(): line[24:].split() for line in p.stdout.splitlines()[3:]}
    assert set(rows) == set(LAYER_OPS)
    assert rows["dense"][0] == "5+12=17" and rows["dense"][3] == "1.00"
    assert all(float(r[2]) > 0 for r in rows.values())

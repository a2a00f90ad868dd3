#!/usr/bin/env python
"""Host time of one triton-backend grouped_mm call, with the Triton kernels stubbed out (CPU).

    python tools/bench_host_overhead.py [--rounds 5] [--calls 300]

A small MoE layer on a GPU is bound by the host: each call's Python, dispatch and
allocation time, not its kernels. This times everything in our Triton path except
Triton's own autotuner and launcher: the three kernels are replaced by stubs that only
evaluate their grid. The shapes are MoEUT's at T=8192 (387 experts, top-16), with narrow
rows: the host path does not depend on the widths. Two variants, alternated per round:
  ops     every launch through its torch.library custom op (what torch.compile traces)
  direct  eager calls straight to the launchers (ops/grouped_mm.py's _eager_or_op)
Prints the median microseconds per call over --rounds rounds of --calls calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before any triton import: CPU tensors are accepted
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from moe_dist.kernels import grouped_gemm as kgg  # noqa: E402
from moe_dist.kernels import schedule as ks  # noqa: E402
from moe_dist.ops import grouped_mm as ops  # noqa: E402


class StubKernel:
    """kernel[grid](*args, **meta): evaluates the grid, launches nothing."""

    def __init__(self, meta: dict):
        self.meta = meta

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if callable(grid):
                grid({**self.meta, **kwargs})

        return launch


def per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--tokens", type=int, default=8192)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    kgg._grouped_gemm_kernel = StubKernel({"BLOCK_N": 128})
    kgg._grouped_wgrad_kernel = StubKernel({"BLOCK_M": 128, "BLOCK_N": 128})
    ks._block_schedule_kernel = StubKernel({})

    E, K, D, F = 387, 16, 64, 64
    N = a.tokens * K
    torch.manual_seed(0)
    x = torch.randn(N, D, dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(E, D, F, dtype=torch.bfloat16).requires_grad_()
    counts = torch.bincount(torch.randint(0, E, (N,)), minlength=E)
    dy = torch.randn(N, F, dtype=torch.bfloat16)
    variants = {
        "ops": (ops._block_schedule_op, ops._grouped_gemm_op, ops._grouped_wgrad_op),
        "direct": (ops._block_schedule, ops._grouped_gemm, ops._grouped_wgrad),
    }
    times: dict = {(v, d): [] for v in variants for d in ("forward", "backward")}
    try:
        for _ in range(a.rounds):
            for name, fns in variants.items():
                ops._block_schedule, ops._grouped_gemm, ops._grouped_wgrad = fns
                y = ops.grouped_mm(x, w, counts, "triton")

                def fwd():
                    with torch.no_grad():
                        ops.grouped_mm(x, w, counts, "triton")

                def bwd():
                    torch.autograd.grad(y, (x, w), dy, retain_graph=True)

                for d, fn in (("forward", fwd), ("backward", bwd)):
                    per_call_us(fn, max(1, a.calls // 10))  # warm
                    times[(name, d)].append(per_call_us(fn, a.calls))
    finally:
        ops._block_schedule, ops._grouped_gemm, ops._grouped_wgrad = variants["direct"]
    print(f"host us per grouped_mm call, kernels stubbed: {a.tokens} tokens, top-{K}, {E} experts, "
          f"torch {torch.__version__}, median of {a.rounds} rounds x {a.calls} calls")
    print(f"{'variant':<8}{'forward':>10}{'backward':>10}")
    for name in variants:
        fwd_us, bwd_us = (statistics.median(times[(name, d)]) for d in ("forward", "backward"))
        print(f"{name:<8}{fwd_us:>10.1f}{bwd_us:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

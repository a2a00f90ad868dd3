#!/usr/bin/env python
"""Time the Triton grouped GEMMs against cuBLAS, torch._grouped_mm and a per-expert loop (GPU).

    python tools/bench_grouped_gemm.py                         # every family, bf16, table
    python tools/bench_grouped_gemm.py --family moeut --tokens 8192 --json bench.json
    python tools/bench_grouped_gemm.py --family mixtral --dtype fp16

Legend: T tokens, K top-k, E experts (groups), N = T*K routed rows, Din -> Dout one GEMM.

For each shape family and each of its two projections, rows sorted by expert (random top-k
routing, so about balanced):
  ours     grouped_mm(backend="triton")   moe_dist/kernels/grouped_gemm.py
  torch    torch._grouped_mm              one CUTLASS launch (bf16/fp16 on Hopper)
  loop     one cuBLAS matmul per expert   (with its device-to-host sync of the counts)
  dense    one cuBLAS [N, Din] @ [Din, Dout] matmul: the same FLOPs with no grouping, the
           roofline the grouped kernels chase
forward = y; backward = dx and dw (2x the forward FLOPs). Then the whole routed MLP, dispatch
and combine included: expert_mlp on "triton" (gather, activation, routing weight, scatter
fused into the GEMMs) against the unfused "torch" path (permuted copy, _grouped_mm,
activation, _grouped_mm, weight, index_add). Times are medians of triton.testing.do_bench
(ms); the first call of each shape autotunes (Hopper configs), outside the timing.
A call's host-side cost shows in its time when it exceeds the call's GPU time plus the
L2-clearing memset do_bench queues before it. The "host us" columns measure that cost
alone: 20 calls queued without a sync, host time per call. "first s" is the first call:
for ours, the autotuner compiling and timing its configs (what a cold GPU machine pays).

Every case also checks what it timed (after the timing, so that "first s" stays cold): ours
(and the fused MLP) against the same computation in float32 (per-expert loop), outputs and
every gradient, as a relative error ||got - ref|| / ||ref||. Above PARITY_TOL the case is
marked FAILED and the tool exits 1 after the last case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# (name, T, K, E, D, F, act, heads): SwitchHead's heads each route to their own E experts;
# their H*E groups form one grouped GEMM over T*H*K rows (value projection D -> d_head and
# output projection d_head -> D, no activation between them).
FAMILIES = {  # the two families with targets (issue 5) first
    "mixtral": [("mixtral", t, 2, 8, 4096, 14336, "swiglu", 1) for t in (8192,)],
    "moeut": [("moeut", t, 16, 387, 1024, 128, "relu", 1) for t in (8192, 32768)],
    "switchhead": [
        (f"switchhead-dh{dh}-e{e}", t, 2, e, 1024, dh, "none", 4) for t in (8192, 32768) for dh, e in ((64, 8), (128, 4))
    ],
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# bf16 operands with fp32 accumulation land between 1e-3 and 1e-2 (a K of 14336 included);
# a wrong tile or index gives O(1).
PARITY_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def bench(fn, rep_ms: int) -> tuple[float, float, float]:
    """(median ms per call from do_bench, host us per call, seconds of the first call)."""
    import triton.testing

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()  # autotune / warm caches outside the timing
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    ms = triton.testing.do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median")
    return ms, host_us(fn), first_s


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (0 when both are zero)."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300)) if ref.numel() else 0.0


def parity(fn, ref_fn, inputs: list, dy: torch.Tensor) -> dict:
    """Relative errors of fn(*inputs) and of its gradients (dy) against ref_fn on float32
    copies of the inputs: {"y": e, "d0": e, ...} for every floating input; {"y": nan} if
    either raised (printed)."""
    try:
        return _parity(fn, ref_fn, inputs, dy)
    except Exception as e:  # a kernel that cannot run fails its check, and the rest still runs
        print(f"    parity: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return {"y": float("nan")}


def _parity(fn, ref_fn, inputs: list, dy: torch.Tensor) -> dict:
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    refs = [t.detach().float().requires_grad_(t.is_floating_point()) for t in inputs]
    y = fn(*leaves)
    y_ref = ref_fn(*refs)
    grads = [t for t in leaves if t.requires_grad]
    ref_grads = [t for t in refs if t.requires_grad]
    got = torch.autograd.grad(y, grads, dy)
    want = torch.autograd.grad(y_ref, ref_grads, dy.float())
    out = {"y": rel_err(y, y_ref)}
    out.update({f"d{i}": rel_err(g, r) for i, (g, r) in enumerate(zip(got, want))})
    return out


def check(name: str, errs: dict, tol: float) -> bool:
    ok = all(e <= tol for e in errs.values())
    shown = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
    print(f"    parity {name}: {shown} (tolerance {tol:.0e}){'' if ok else '  FAILED'}")
    return ok


def host_us(fn, calls: int = 20) -> float:
    """Host time per call (us) with the GPU never waited for: 20 calls stay far below the
    launch queue's depth. A call that syncs (the loop's counts) waits for its kernels here."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def routing(T: int, K: int, E: int, heads: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot_N, counts_G): R = T*heads rows each pick K of their head's E experts; sorted."""
    R = T * heads
    expert_RK = torch.rand(R, E, device=device).topk(K, dim=1).indices
    expert_RK = expert_RK + (torch.arange(R, device=device) % heads).unsqueeze(1) * E
    expert_P = expert_RK.reshape(-1)
    slot_N = torch.sort(expert_P, stable=True).indices
    return slot_N, torch.bincount(expert_P, minlength=heads * E)


def bench_gemm(ops, x_ND, w_GIO, counts_G, rep_ms: int) -> dict:
    """Forward and backward of one grouped GEMM for every method: {method: (fwd, bwd)}, each
    (median ms, host us, first s) from bench(); "parity": ours against float32."""
    N, Dout = x_ND.shape[0], w_GIO.shape[2]
    dy = torch.randn(N, Dout, device=x_ND.device, dtype=x_ND.dtype)
    x = x_ND.detach().requires_grad_()
    w = w_GIO.detach().requires_grad_()
    w_dense = w_GIO[0].detach().requires_grad_()
    methods = {
        "ours": lambda: ops.grouped_mm(x, w, counts_G, "triton"),
        "torch": lambda: ops.grouped_mm(x, w, counts_G, "torch"),
        "loop": lambda: ops.grouped_mm(x, w, counts_G, "loop"),
        "dense": lambda: x @ w_dense,
    }
    out = {}
    for name, fwd in methods.items():
        try:
            with torch.no_grad():
                t_fwd = bench(fwd, rep_ms)
            y = fwd()
            params = (x, w_dense) if name == "dense" else (x, w)
            t_bwd = bench(lambda: torch.autograd.grad(y, params, dy, retain_graph=True), rep_ms)
            out[name] = (t_fwd, t_bwd)
        except Exception as e:  # one method failing (e.g. no _grouped_mm) must not hide the rest
            print(f"    {name}: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        torch.cuda.empty_cache()
    # After the timing, so that ours' "first s" is the autotuner's cold run.
    out["parity"] = parity(lambda a, b: ops.grouped_mm(a, b, counts_G, "triton"),
                           lambda a, b: ops.grouped_mm_reference(a, b, counts_G), [x_ND, w_GIO], dy)
    return out


def bench_mlp(ops, x_TD, w_in, w_out, counts_G, slot_N, K, weight_N, act, rep_ms: int) -> dict:
    """The routed MLP with dispatch and combine: fused triton vs the unfused torch path."""
    dy = torch.randn_like(x_TD)
    leaves = [t.detach().requires_grad_() for t in (x_TD, w_in, w_out, weight_N)]
    out = {}
    for name in ("triton", "torch"):

        def fwd():
            return ops.expert_mlp(leaves[0], leaves[1], leaves[2], counts_G, slot_N, K, leaves[3], act, name)

        try:
            with torch.no_grad():
                t_fwd = bench(fwd, rep_ms)
            y = fwd()
            t_bwd = bench(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True), rep_ms)
            out["ours-fused" if name == "triton" else "torch-unfused"] = (t_fwd, t_bwd)
        except Exception as e:
            print(f"    mlp {name}: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        torch.cuda.empty_cache()
    out["parity"] = parity(lambda x, a, b, wt: ops.expert_mlp(x, a, b, counts_G, slot_N, K, wt, act, "triton"),
                           lambda x, a, b, wt: ops.expert_mlp_reference(x, a, b, counts_G, slot_N, K, wt, act),
                           [x_TD, w_in, w_out, weight_N], dy)
    return out


def report(title: str, flops_fwd: float, results: dict, rows: list, tol: float, ours: str = "ours") -> bool:
    """Print and record one case; False if the parity check of `ours` failed."""
    print(f"  {title}  ({flops_fwd / 1e9:.1f} GFLOP forward)")
    errs = results.pop("parity")
    ok = check(ours, errs, tol)
    print(f"    {'method':<14} {'fwd ms':>9} {'TFLOP/s':>8} {'host us':>8} {'first s':>8} "
          f"{'bwd ms':>9} {'TFLOP/s':>8} {'host us':>8} {'first s':>8}")
    for name, ((t_fwd, h_fwd, c_fwd), (t_bwd, h_bwd, c_bwd)) in results.items():
        tf_fwd, tf_bwd = flops_fwd / max(t_fwd, 1e-6) / 1e9, 2 * flops_fwd / max(t_bwd, 1e-6) / 1e9
        print(f"    {name:<14} {t_fwd:9.3f} {tf_fwd:8.1f} {h_fwd:8.0f} {c_fwd:8.2f} "
              f"{t_bwd:9.3f} {tf_bwd:8.1f} {h_bwd:8.0f} {c_bwd:8.2f}")
        rows.append(dict(case=title, method=name, fwd_ms=t_fwd, fwd_tflops=tf_fwd, fwd_host_us=h_fwd, fwd_first_s=c_fwd,
                         bwd_ms=t_bwd, bwd_tflops=tf_bwd, bwd_host_us=h_bwd, bwd_first_s=c_bwd))
    rows.append(dict(case=title, method="parity", ok=ok, **errs))
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", action="append", choices=sorted(FAMILIES), help="repeatable; default: all")
    p.add_argument("--tokens", type=int, action="append", help="only these T (repeatable)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench measuring time per case")
    p.add_argument("--no-mlp", action="store_true", help="skip the fused-MLP comparison")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "bench_grouped_gemm: needs a CUDA GPU with compiled Triton kernels (no CUDA device found, "
            "or TRITON_INTERPRET=1 is set); nothing measured.",
            file=sys.stderr,
        )
        return 2
    import triton

    from moe_dist.kernels import grouped_gemm as kgg
    from moe_dist.ops import grouped_mm as ops

    torch.manual_seed(0)
    dtype, dev = DTYPES[args.dtype], torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    print(f"{props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}")
    print(f"dtype {args.dtype}; times are medians in ms")
    rows: list = []
    ok, tol = True, PARITY_TOL[dtype]

    def save() -> None:  # after every row: a run cut off by a time limit keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=props.name, dtype=args.dtype, rows=rows), f, indent=1)
    for family in args.family or list(FAMILIES):
        for name, T, K, E, D, F, act, heads in FAMILIES[family]:
            if args.tokens and T not in args.tokens:
                continue
            G, H_in = heads * E, F * (2 if act == "swiglu" else 1)
            slot_N, counts_G = routing(T, K, E, heads, dev)
            N = slot_N.numel()
            print(f"\n{name}: T={T} K={K} groups={G} D={D} F={F} act={act} N={N}")
            # NOTE: device-to-host sync (setup only): the min/max group size for the header.
            print(f"  rows per group: min {int(counts_G.min())}, max {int(counts_G.max())}")
            w_in = torch.randn(G, D, H_in, device=dev, dtype=dtype) * D**-0.5
            w_out = torch.randn(G, F, D, device=dev, dtype=dtype) * F**-0.5
            x_ND = torch.randn(N, D, device=dev, dtype=dtype)
            res = bench_gemm(ops, x_ND, w_in, counts_G, args.rep_ms)
            ok &= report(f"{name} T={T} in  {D}->{H_in}", 2.0 * N * D * H_in, res, rows, tol)
            save()
            print(f"    ours best config: {getattr(kgg._grouped_gemm_kernel, 'best_config', '?')}")
            del x_ND
            a_NF = torch.randn(N, F, device=dev, dtype=dtype)
            res = bench_gemm(ops, a_NF, w_out, counts_G, args.rep_ms)
            ok &= report(f"{name} T={T} out {F}->{D}", 2.0 * N * F * D, res, rows, tol)
            save()
            print(f"    ours best config: {getattr(kgg._grouped_gemm_kernel, 'best_config', '?')}")
            del a_NF
            if not args.no_mlp and heads == 1:  # SwitchHead's two projections are not one MLP
                x_TD = torch.randn(T, D, device=dev, dtype=dtype)
                weight_N = torch.rand(N, device=dev)
                res = bench_mlp(ops, x_TD, w_in, w_out, counts_G, slot_N, K, weight_N, act, args.rep_ms)
                ok &= report(f"{name} T={T} mlp (dispatch+combine)", 2.0 * N * (D * H_in + F * D), res, rows, tol,
                             "ours-fused")
                save()
            del w_in, w_out
            torch.cuda.empty_cache()
    if args.json:
        print(f"\nwrote {args.json}")
    if not ok:
        print("parity FAILED for at least one case (above): its times are of wrong results", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

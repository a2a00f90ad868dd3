"""The `loop` backend: one matmul per expert, with hand-written backwards (CPU's fast path).

    y_NF = loop_grouped_mm(x_ND, w_EDF, tokens_per_expert_E)
    y    = loop_expert_mlp(x, w_in_EDH, w_out_EFD, tokens_per_expert_E, src_N, dst_N, n_out, scale_N, act)

Legend: N routed rows sorted by expert, D input dim, F expert hidden dim, H = F * hidden
multiplier, O output dim, E experts. grouped_mm.grouped_mm_reference is the readable
autograd reference; tests/test_loop_ops.py checks both against the references in float64.

Why hand-written and not autograd through `x @ w[e]` pieces:
- `w_EDF[e]`'s backward zero-fills a whole [E, D, F] gradient per expert and the engine
  adds them up; split/cat copy every activation once more. LoopGroupedMM writes each
  expert's product into one preallocated output (torch.mm out=), forward and backward.
- LoopExpertMLP is ScatterMoE's fusion done with cache blocking instead of a kernel: per
  expert it gathers that expert's rows, runs both projections and the activation, scales
  by the routing weight and scatter-adds into the output, while the expert's rows
  (~0.5 MB here) are still in cache. The unfused path makes a full pass over memory for
  each of those steps. Measured on 2 CPU cores (top-1, 8 experts, 4096 x 256 -> 512 -> 256,
  fp32): see docs/benchmarks.md, MoE layer against DeepSpeed-MoE.
  It keeps only x and the pre-activation h for the backward (the activation is recomputed
  per expert there), where autograd would keep the gathered x, h, act(h) and the output.
"""

from __future__ import annotations

from typing import Optional

import torch

from moe_dist.ops.activations import activation


def _bounds(counts: list[int]):
    lo = 0
    for e, n in enumerate(counts):
        yield e, lo, lo + n
        lo += n


class LoopGroupedMM(torch.autograd.Function):
    """y_NF[rows of e] = x_ND[rows of e] @ w_EDF[e]."""

    @staticmethod
    def forward(ctx, x_ND, w_EDF, tokens_per_expert_E):
        # NOTE: device-to-host sync: the split sizes must be Python ints.
        counts = tokens_per_expert_E.tolist()
        y_NF = x_ND.new_empty(x_ND.shape[0], w_EDF.shape[2])
        for e, lo, hi in _bounds(counts):
            torch.mm(x_ND[lo:hi], w_EDF[e], out=y_NF[lo:hi])
        ctx.save_for_backward(x_ND, w_EDF)
        ctx.counts = counts
        return y_NF

    @staticmethod
    def backward(ctx, dy_NF):
        x_ND, w_EDF = ctx.saved_tensors
        dy_NF, dx_ND, dw_EDF = dy_NF.contiguous(), None, None
        if ctx.needs_input_grad[0]:
            dx_ND = torch.empty_like(x_ND)
            for e, lo, hi in _bounds(ctx.counts):
                torch.mm(dy_NF[lo:hi], w_EDF[e].t(), out=dx_ND[lo:hi])
        if ctx.needs_input_grad[1]:
            dw_EDF = torch.empty_like(w_EDF)
            for e, lo, hi in _bounds(ctx.counts):
                torch.mm(x_ND[lo:hi].t(), dy_NF[lo:hi], out=dw_EDF[e])  # no rows: mm writes zeros
        return dx_ND, dw_EDF, None


class LoopExpertMLP(torch.autograd.Function):
    """Row n of expert e (rows sorted by expert):
        out[dst_N[n]] += scale_N[n] * act(x[src_N[n]] @ w_in[e]) @ w_out[e]
    src_N None: row n reads x[n]; dst_N None: the output is [N, O] in row order (no sum);
    scale_N None: no scaling. Duplicate dst rows sum (a token's top-k rows)."""

    @staticmethod
    def forward(ctx, x, w_in_EDH, w_out_EFO, tokens_per_expert_E, src_N, dst_N, n_out, scale_N, act):
        # NOTE: device-to-host sync: the per-expert row counts must be Python ints.
        counts = tokens_per_expert_E.tolist()
        N, O = sum(counts), w_out_EFO.shape[2]
        h_NH = x.new_empty(N, w_in_EDH.shape[2])
        # A token's rows from different experts add in float32 (one index_add per expert
        # would round bf16 after every expert), then round once: ops/combine.py's reason.
        acc = torch.promote_types(x.dtype, torch.float32)
        out = x.new_zeros(n_out, O, dtype=acc) if dst_N is not None else x.new_empty(N, O)
        for e, lo, hi in _bounds(counts):
            if hi == lo:
                continue
            x_e = x[lo:hi] if src_N is None else x.index_select(0, src_N[lo:hi])
            h_e = torch.mm(x_e, w_in_EDH[e], out=h_NH[lo:hi])
            y_e = torch.mm(activation(h_e, act), w_out_EFO[e], out=out[lo:hi] if dst_N is None else None)
            if scale_N is not None:
                y_e.mul_(scale_N[lo:hi].to(y_e.dtype).unsqueeze(1))
            if dst_N is not None:
                # One call per expert, whose rows go to distinct tokens: no two adds race,
                # on CPU or CUDA, so the order (expert by expert) is fixed.
                out.index_add_(0, dst_N[lo:hi], y_e.to(acc))
        ctx.save_for_backward(x, w_in_EDH, w_out_EFO, src_N, dst_N, scale_N, h_NH)
        ctx.counts, ctx.act = counts, act
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        x, w_in, w_out, src_N, dst_N, scale_N, h_NH = ctx.saved_tensors
        need_x, need_in, need_out = ctx.needs_input_grad[:3]
        need_s = ctx.needs_input_grad[7]
        dout = dout.contiguous()
        dx = None
        acc = torch.promote_types(x.dtype, torch.float32)  # bf16 rows sum in float32
        if need_x:
            dx = torch.zeros_like(x, dtype=acc) if src_N is not None else torch.empty_like(x)
        dw_in = torch.empty_like(w_in) if need_in else None
        dw_out = torch.empty_like(w_out) if need_out else None
        dscale = torch.empty(h_NH.shape[0], dtype=acc, device=x.device) if need_s else None
        for e, lo, hi in _bounds(ctx.counts):
            if hi == lo:  # an expert with no rows: zero gradient
                for dw in (dw_in, dw_out):
                    if dw is not None:
                        dw[e].zero_()
                continue
            g_e = dout[lo:hi] if dst_N is None else dout.index_select(0, dst_N[lo:hi])
            with torch.enable_grad():  # recompute act(h) and get its vjp from autograd
                h_e = h_NH[lo:hi].detach().requires_grad_(ctx.act != "none")
                a_e = activation(h_e, ctx.act)
            ga_e = g_e @ w_out[e].t()  # dL/d act(h) before the scale
            if scale_N is not None:
                s_e = scale_N[lo:hi].to(g_e.dtype).unsqueeze(1)
                if need_s:
                    dscale[lo:hi] = (ga_e * a_e.detach()).sum(1, dtype=acc)
                g_e, ga_e = g_e * s_e, ga_e * s_e
            if need_out:
                torch.mm(a_e.detach().t(), g_e, out=dw_out[e])
            if not (need_x or need_in):
                continue
            dh_e = torch.autograd.grad(a_e, h_e, ga_e)[0] if ctx.act != "none" else ga_e
            if need_in:
                x_e = x[lo:hi] if src_N is None else x.index_select(0, src_N[lo:hi])
                torch.mm(x_e.t(), dh_e, out=dw_in[e])
            if need_x:
                if src_N is None:
                    torch.mm(dh_e, w_in[e].t(), out=dx[lo:hi])
                else:
                    dx.index_add_(0, src_N[lo:hi], (dh_e @ w_in[e].t()).to(acc))
        if dscale is not None:
            dscale = dscale.to(scale_N.dtype)
        if dx is not None:
            dx = dx.to(x.dtype)
        return dx, dw_in, dw_out, None, None, None, None, dscale, None


def _run(apply, *args):
    """apply(*args); under torch.compile, uncompiled. The loop reads the counts on the host,
    so dynamo would break the graph inside anyway, and tracing in would specialise one resume
    frame, shared by every projection's shapes, until its recompile limit. Not a
    @torch.compiler.disable decorator: that imports torch._dynamo (and triton) with this
    module, 1.6 s of every process's start; under compile, dynamo is loaded already."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(apply)(*args)
    return apply(*args)


def loop_grouped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    return _run(LoopGroupedMM.apply, x_ND, w_EDF, tokens_per_expert_E)


def loop_expert_mlp(
    x: torch.Tensor, w_in_EDH: torch.Tensor, w_out_EFO: torch.Tensor, tokens_per_expert_E: torch.Tensor,
    src_N: Optional[torch.Tensor] = None, dst_N: Optional[torch.Tensor] = None, n_out: int = 0,
    scale_N: Optional[torch.Tensor] = None, act: str = "none",
) -> torch.Tensor:  # fmt: skip
    return _run(LoopExpertMLP.apply, x, w_in_EDH, w_out_EFO, tokens_per_expert_E, src_N, dst_N, n_out, scale_N, act)

"""The grouped matmuls that every MoE layer's local expert compute goes through.

    y_NF = grouped_mm(x_ND, w_EDF, tokens_per_expert_E)
    y    = scatter_grouped_mm(x, w_EDF, tokens_per_expert_E, slot_N=, gather_div=, scatter_div=, ...)
    y_TD = expert_mlp(x_TD, w_in_EDH, w_out_EFD, tokens_per_expert_E, slot_N, top_k, weight_N, act)

Rows are sorted by expert: the first tokens_per_expert[0] routed rows belong to expert 0, and
so on; each group is multiplied by its expert's [D, F] matrix. Experts with no rows are fine.
grouped_mm takes the rows already permuted. scatter_grouped_mm and expert_mlp take the
un-permuted token matrix and each row's assignment slot instead, so that with the Triton
backend the permutation, the activation, the routing weight and the sum over a token's k
rows never make an extra pass over memory (ScatterMoE's design).

Legend: T tokens, K top-k, N routed rows (sum of tokens_per_expert), D input dim, F output
dim, H = F * hidden multiplier, E experts. slot_N: each row's index in the flattened [T, K]
choices (for a top-k MoE), so its token is token_N = slot_N // K.

Backends (moe.grouped_mm):
  loop   - one matmul per expert with hand-written backwards (ops/loop.py); expert_mlp and
           grouped_mlp run each expert's whole MLP while its rows are in cache.
  torch  - torch._grouped_mm (F.grouped_mm): one fused launch, no host sync, on CUDA; a
           fast CPU implementation too (torch 2.13).
  triton - moe_dist/kernels: Triton grouped GEMMs with the gather/scatter fused; no host sync.
           CUDA; on CPU only under TRITON_INTERPRET=1 (the tests).
  auto   - CUDA: torch._grouped_mm in bf16, loop otherwise. (torch's fused kernel exists for
           compute capability 9.x and 10.x, Hopper and Blackwell; on others torch loops over
           the groups and reads the offsets on the host, pytorch issue #186620, as our loop
           does.) The Triton kernels are opt-in
           (moe.grouped_mm=triton): on an H100 (docs/benchmarks.md) their fused expert MLP
           was 2.2-5.1x faster than the unfused torch path for MoEUT-like experts (387 x
           width 128) but slower for Mixtral-like ones (0.84x forward, 0.51x backward). With
           only those two families measured, where the crossover lies is not known yet.
           CPU: the loop's fused MLP for large expert blocks, torch._grouped_mm otherwise
           (CPU_LOOP_MIN_ELEMS_PER_EXPERT); loop for dtypes or strides torch cannot run.
The references (plain autograd, every dtype, what the tests compare against):
grouped_mm_reference and expert_mlp_reference.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from moe_dist.ops.activations import activation
from moe_dist.ops.combine import combine_slots, sum_slots
from moe_dist.ops.loop import loop_expert_mlp, loop_grouped_mm

_torch_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FUSED_ACTS = ("none", "relu", "swiglu")  # activations the kernels apply inside their loads


def _kernels():
    """The Triton modules, imported on first use: their import fixes compiled vs interpreted."""
    from moe_dist.kernels import grouped_gemm, schedule

    return grouped_gemm, schedule


def grouped_mm_reference(x_ND: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Per-expert loop; works for every dtype and device (float64 tests use it)."""
    # NOTE: device-to-host sync: the split sizes must be Python ints.
    counts = tokens_per_expert_E.tolist()
    outs = [x @ w_EDF[e] for e, x in enumerate(torch.split(x_ND, counts, dim=0))]
    return torch.cat(outs, dim=0) if outs else x_ND.new_zeros(0, w_EDF.shape[-1])


def expert_mlp_reference(
    x_TD: torch.Tensor, w_in_EDH: torch.Tensor, w_out_EFD: torch.Tensor, tokens_per_expert_E: torch.Tensor,
    slot_N: torch.Tensor, top_k: int, weight_N: Optional[torch.Tensor], act: str,
) -> torch.Tensor:  # fmt: skip
    """expert_mlp step by step: gather, per-expert loop, activation, weight, scatter-add."""
    token_N = torch.div(slot_N, top_k, rounding_mode="floor")
    h_NH = grouped_mm_reference(x_TD.index_select(0, token_N), w_in_EDH, tokens_per_expert_E)
    y_ND = grouped_mm_reference(activation(h_NH, act), w_out_EFD, tokens_per_expert_E)
    if weight_N is not None:
        y_ND = y_ND * weight_N.to(y_ND.dtype).unsqueeze(1)
    return y_ND.new_zeros(x_TD.shape[0], y_ND.shape[1]).index_add(0, token_N, y_ND)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    torch._grouped_mm's backward rejects expanded (stride-0) gradients, e.g. of y.sum().
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if grad.numel() == 0:  # an empty tensor counts as contiguous with its 0 strides
            return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        return grad.contiguous()


def _row_widths(x_ND: torch.Tensor, *w_EDF: torch.Tensor) -> list[int]:
    """Row widths of every operand of x @ w[e] (and, for an expert MLP, of the second
    projection w_out, whose input width is w_out.shape[1])."""
    return [x_ND.shape[1]] + [d for w in w_EDF for d in w.shape[1:]]


def _torch_ok(x_ND: torch.Tensor, *w_EDF: torch.Tensor) -> bool:
    if _torch_grouped_mm is None or x_ND.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if torch.compiler.is_compiling() and x_ND.dtype != torch.bfloat16:
        return False  # torch.compile traces _grouped_mm's meta kernel, which takes only bf16
    # torch._grouped_mm needs 16-byte aligned row strides on every operand.
    return all(d * x_ND.element_size() % 16 == 0 for d in _row_widths(x_ND, *w_EDF))


# CPU `auto`: the loop backend's fused expert MLP when each expert's block is large, else
# torch._grouped_mm. The loop costs a fixed ~0.1-0.2 ms of Python and small ops per expert
# and saves memory passes in proportion to rows x (D + H), so the measure is elements per
# expert. Measured on 2 cores (torch 2.13, fp32, fwd+bwd, loop time / torch time; rows per
# expert x (D + H) in thousands): 12-49K 1.2-2.3; 98K 1.1-1.2; 197K 0.80-1.35 (noisy);
# 393K 0.88-0.98 (layer benchmark, 512 rows, 256 + 512 GELU: 0.92); 786K 0.80-1.01. The
# loop also keeps 40-60% less memory for the backward. A plain grouped matmul is never
# faster on the loop (8 x 1024 rows, 256 -> 512: 38.5 against 38.2 ms): torch there.
CPU_LOOP_MIN_ELEMS_PER_EXPERT = 256 * 1024


def _resolve(
    backend: str, x: torch.Tensor, w_EDF: torch.Tensor, mlp_rows: int = 0, w_out: Optional[torch.Tensor] = None
) -> str:
    """'auto' -> a concrete backend; refuse a named one that cannot run these tensors.
    An expert MLP passes its routed rows and second projection w_out: one backend runs both."""
    ws = (w_EDF,) if w_out is None else (w_EDF, w_out)
    if backend == "auto":
        if x.is_cuda:
            return "torch" if x.dtype == torch.bfloat16 and _torch_ok(x, *ws) else "loop"
        E, D, H = w_EDF.shape
        if mlp_rows * (D + H) >= CPU_LOOP_MIN_ELEMS_PER_EXPERT * E or not _torch_ok(x, *ws):
            return "loop"
        return "torch"
    if backend == "triton":
        if not _HAS_TRITON or x.dtype not in _TRITON_DTYPES:
            raise ValueError(f"moe.grouped_mm=triton needs Triton and fp32/fp16/bf16, got {x.dtype}")
        if not x.is_cuda and not _kernels()[0].INTERPRET:
            raise ValueError("moe.grouped_mm=triton needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
        return backend
    if backend == "torch":
        if not _torch_ok(x, *ws):
            dims = "x".join(str(d) for d in _row_widths(x, *ws))
            raise ValueError(
                f"moe.grouped_mm=torch cannot run dtype {x.dtype} with dims "
                f"{dims} (needs fp32/bf16/fp16, 16-byte aligned rows; under torch.compile, bf16)"
            )
        return backend
    if backend == "loop":
        return backend
    raise ValueError(f"unknown grouped_mm backend {backend!r}")


# ---- torch.library custom ops over the launchers: opaque to torch.compile, with fake impls ----


def _block_schedule_impl(tokens_per_expert_E: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels()[1].block_schedule(tokens_per_expert_E, num_rows, block_m)


_block_schedule_op = torch.library.custom_op("moe_dist::block_schedule", _block_schedule_impl, mutates_args=())


@_block_schedule_op.register_fake
def _(tokens_per_expert_E, num_rows, block_m):
    E = tokens_per_expert_E.shape[0]
    B = (num_rows + block_m - 1) // block_m + E  # kernels.schedule.num_blocks_bound
    return tokens_per_expert_E.new_empty(E + 1, dtype=torch.int32), tokens_per_expert_E.new_empty(2, B, dtype=torch.int32)


def _grouped_gemm_impl(
    a: torch.Tensor, b: torch.Tensor, offs_E1: torch.Tensor, sched_2B: torch.Tensor,
    a_idx_N: Optional[torch.Tensor], c_idx_N: Optional[torch.Tensor], scale_N: Optional[torch.Tensor],
    x: Optional[torch.Tensor], x_idx_N: Optional[torch.Tensor],
    out_rows: int, act_a: str, epi_act: str, want_dscale: bool, block_m: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    c, dscale_N = _kernels()[0].grouped_gemm(
        a, b, offs_E1, sched_2B, block_m=block_m, a_idx_N=a_idx_N, c_idx_N=c_idx_N, out_rows=out_rows,
        scale_N=scale_N, act_a=act_a, epi_act=epi_act, x=x, x_idx_N=x_idx_N, want_dscale=want_dscale,
    )  # fmt: skip
    return c, dscale_N if dscale_N is not None else a.new_empty(0, dtype=torch.float32)


_grouped_gemm_op = torch.library.custom_op("moe_dist::grouped_gemm", _grouped_gemm_impl, mutates_args=())


@_grouped_gemm_op.register_fake
def _(a, b, offs_E1, sched_2B, a_idx_N, c_idx_N, scale_N, x, x_idx_N, out_rows, act_a, epi_act, want_dscale, block_m):
    N = a_idx_N.shape[0] if a_idx_N is not None else a.shape[0]
    width = b.shape[2] * (2 if epi_act == "swiglu" else 1)
    return a.new_empty(out_rows, width), a.new_empty(N if want_dscale else 0, dtype=torch.float32)


def _grouped_wgrad_impl(
    a: torch.Tensor, b: torch.Tensor, offs_E1: torch.Tensor, a_idx_N: Optional[torch.Tensor],
    b_idx_N: Optional[torch.Tensor], scale_N: Optional[torch.Tensor], act_a: str,
) -> torch.Tensor:  # fmt: skip
    return _kernels()[0].grouped_wgrad(a, b, offs_E1, a_idx_N=a_idx_N, b_idx_N=b_idx_N, scale_N=scale_N, act_a=act_a)


_grouped_wgrad_op = torch.library.custom_op("moe_dist::grouped_wgrad", _grouped_wgrad_impl, mutates_args=())


@_grouped_wgrad_op.register_fake
def _(a, b, offs_E1, a_idx_N, b_idx_N, scale_N, act_a):
    width = 2 if act_a == "swiglu" else 1
    return a.new_empty(offs_E1.shape[0] - 1, a.shape[1] // width, b.shape[1])


def _eager_or_op(impl, op):
    """The launcher itself for plain eager tensors; the custom op (a fake impl, visible to
    tracers) under torch.compile, a dispatch mode (FakeTensorMode, make_fx, activation-
    checkpoint policies) or for fake and meta tensors. Dispatch through torch.library costs
    host time, which bounds a small MoE layer on a GPU: with the kernels stubbed out, a
    triton-backend grouped_mm took 64 us forward and 103 us backward through the ops, 38
    and 60 us direct (2-core CPU; tools/bench_host_overhead.py, docs/benchmarks.md)."""

    def call(a, *args):
        traced = (
            torch.compiler.is_compiling()
            or _get_current_dispatch_mode() is not None
            or type(a) is not torch.Tensor
            or a.device.type == "meta"
        )
        return op(a, *args) if traced else impl(a, *args)

    return call


_block_schedule = _eager_or_op(_block_schedule_impl, _block_schedule_op)
_grouped_gemm = _eager_or_op(_grouped_gemm_impl, _grouped_gemm_op)
_grouped_wgrad = _eager_or_op(_grouped_wgrad_impl, _grouped_wgrad_op)


class _ScatterGroupedMM(torch.autograd.Function):
    """y = scatter(scale_N * act(gather(x)) @ w[e]) on the Triton kernels (see scatter_grouped_mm).

    Slots: row n is assignment slot_N[n] of M; it reads x[src_N[n]] (src = slot // gdiv) when
    gathering, and lands in output row dst_N[n] (dst = slot // sdiv) when scattering, written
    into an [M, F] buffer whose sdiv slots per output row are then summed (no atomics).
    Backward, with dy read in place (gathered by dst when the forward scattered):
      dx  = scatter(act'(x) * scale_N * (dy @ w^T))   one kernel; d scale_N from its epilogue
      dw  = act(gather(x))^T @ (scale_N * dy)          one kernel per expert tile
    """

    @staticmethod
    def forward(ctx, x, w_EDF, offs_E1, sched_2B, slot_N, src_N, dst_N, scale_N, act, gdiv, sdiv, n_out, block_m):
        N = slot_N.shape[0] if gdiv else x.shape[0]
        c, _ = _grouped_gemm(
            x, w_EDF, offs_E1, sched_2B, src_N if gdiv else None, slot_N if sdiv else None,
            scale_N, None, None, n_out * sdiv if sdiv else N, act, "none", False, block_m,
        )  # fmt: skip
        ctx.save_for_backward(x, w_EDF, offs_E1, sched_2B, slot_N, src_N, dst_N, scale_N)
        ctx.cfg = (N, act, gdiv, sdiv, block_m)
        return sum_slots(c, sdiv)

    @staticmethod
    @once_differentiable  # the kernels have no derivative of their own: refuse create_graph
    def backward(ctx, dy):
        x, w_EDF, offs_E1, sched_2B, slot_N, src_N, dst_N, scale_N = ctx.saved_tensors
        N, act, gdiv, sdiv, block_m = ctx.cfg
        # Autograd hands back the output's dtype, which sum_slots keeps equal to x's; the
        # kernels take one dtype, so guard it (a no-op, no copy, when the dtypes agree).
        dy = dy.to(x.dtype)
        need_x, need_w, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[7]
        dy_idx = dst_N if sdiv else None
        x_idx = src_N if gdiv else None
        dx = dw = dscale = None
        if need_x or need_s:
            use_x = act != "none" or need_s
            dpre, dscale = _grouped_gemm(
                dy, w_EDF.transpose(1, 2), offs_E1, sched_2B, dy_idx, slot_N if gdiv else None, scale_N,
                x if use_x else None, x_idx if use_x else None, x.shape[0] * gdiv if gdiv else N,
                "none", act, need_s, block_m,
            )  # fmt: skip
            dx = sum_slots(dpre, gdiv)
            dscale = dscale.to(scale_N.dtype) if need_s else None
        if need_w:
            dw = _grouped_wgrad(x, dy, offs_E1, x_idx, dy_idx, scale_N, act)
        return dx, dw, None, None, None, None, None, dscale, None, None, None, None, None


def _plan(tokens_per_expert_E: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Block schedule (on device, no sync) shared by every GEMM over the same routed rows."""
    block_m = _kernels()[0].pick_block_m(num_rows, tokens_per_expert_E.shape[0])
    offs_E1, sched_2B = _block_schedule(tokens_per_expert_E, num_rows, block_m)
    return offs_E1, sched_2B, block_m


def _sgmm(x, w_EDF, counts_E, slot_N, gdiv, sdiv, n_out, scale_N, act, backend, plan=None):
    """scatter_grouped_mm after argument checks; plan: a shared _plan for the triton backend."""
    src_N = torch.div(slot_N, gdiv, rounding_mode="floor") if gdiv else None
    if backend != "triton":  # the unfused torch path: permuted copy, activation, combine
        a = x.index_select(0, src_N) if gdiv else x  # not x[src_N]: see ops/__init__.py
        y = grouped_mm(activation(a, act), w_EDF, counts_E, backend)
        if scale_N is not None:
            y = y * scale_N.to(y.dtype).unsqueeze(1)
        return combine_slots(y, slot_N, n_out * sdiv, sdiv) if sdiv else y  # ops/combine.py: why not index_add
    if act not in _FUSED_ACTS:  # e.g. gelu: elementwise, so applying it before the gather is the same
        x, act = activation(x, act), "none"
    dst_N = torch.div(slot_N, sdiv, rounding_mode="floor") if sdiv else None
    N = slot_N.shape[0] if gdiv else x.shape[0]
    offs_E1, sched_2B, block_m = plan if plan is not None else _plan(counts_E, N)
    return _ScatterGroupedMM.apply(
        x, w_EDF, offs_E1, sched_2B, slot_N, src_N, dst_N, scale_N, act, gdiv, sdiv, n_out, block_m
    )


def scatter_grouped_mm(
    x: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert_E: torch.Tensor, *,
    slot_N: Optional[torch.Tensor] = None, gather_div: int = 0, scatter_div: int = 0,
    num_out: Optional[int] = None, scale_N: Optional[torch.Tensor] = None, act: str = "none",
    backend: str = "auto",
) -> torch.Tensor:  # fmt: skip
    """y = scatter(scale_N * act(gather(x)) @ w[e]) over the routed rows, sorted by expert.

    Row n is assignment slot_N[n] (distinct, of M slots: M = T * K for a top-k MoE).
      gather_div g > 0:  x holds M / g rows and row n reads x[slot // g] in place; g = 0: x is x_ND.
      scatter_div s > 0: y has num_out = M / s rows, row r the sum of the rows with slot // s == r
                         (dropped slots give zero); s = 0: y is y_ND, sorted like x_ND.
    A top-k MoE layer has g = s = K (token = slot // K); SwitchHead's value projection reads
    token slot // (H*K) and writes (token, head) row slot // K. num_out defaults to x.shape[0]
    * g // s when gathering. scale_N multiplies row n's output (the routing weight), in the
    kernel's epilogue; act ("relu", "swiglu": inside the kernel's load) applies to x's rows.
    sum(tokens_per_expert_E) must equal the number of rows.
    """
    if (gather_div or scatter_div) and slot_N is None:
        raise ValueError("gather/scatter need slot_N")
    if scatter_div and num_out is None:
        if not gather_div:
            raise ValueError("scatter without gather needs num_out")
        num_out = x.shape[0] * gather_div // scatter_div
    if w_EDF.dtype != x.dtype:
        w_EDF = w_EDF.to(x.dtype)
    backend = _resolve(backend, x, w_EDF)
    return _sgmm(x, w_EDF, tokens_per_expert_E, slot_N, gather_div, scatter_div, num_out, scale_N, act, backend)


def expert_mlp(
    x_TD: torch.Tensor, w_in_EDH: torch.Tensor, w_out_EFD: torch.Tensor, tokens_per_expert_E: torch.Tensor,
    slot_N: torch.Tensor, top_k: int, weight_N: Optional[torch.Tensor], act: str, backend: str = "auto",
) -> torch.Tensor:  # fmt: skip
    """The routed experts of a token-choice MoE layer, dispatch and combine included:

        h_NH = x_TD[token_N] @ w_in[e]                    gather fused into the load
        y_TD = sum over a token's rows of weight_N * act(h_NH) @ w_out[e]
                                                          act in the load, weight + scatter in the store
    slot_N: the kept assignments (indices into the flattened [T, K] choices) sorted by
    expert, token_N = slot_N // top_k; weight_N their routing weights (None: 1).
    expert_mlp_reference is the same computation step by step.
    """
    T = x_TD.shape[0]
    w_in_EDH, w_out_EFD = w_in_EDH.to(x_TD.dtype), w_out_EFD.to(x_TD.dtype)
    backend = _resolve(backend, x_TD, w_in_EDH, slot_N.shape[0], w_out_EFD)
    if backend == "loop":  # per-expert cache blocking (ops/loop.py)
        token_N = torch.div(slot_N, top_k, rounding_mode="floor")
        return loop_expert_mlp(x_TD, w_in_EDH, w_out_EFD, tokens_per_expert_E, token_N, token_N, T, weight_N, act)
    if backend == "torch":  # unfused: one token index and one offsets vector for both GEMMs
        token_N = torch.div(slot_N, top_k, rounding_mode="floor")
        offs_E = _offsets(tokens_per_expert_E)
        h_NH = _torch_mm(x_TD.index_select(0, token_N), w_in_EDH, offs_E)  # not x[token_N]: ops/__init__.py
        y_ND = _torch_mm(activation(h_NH, act), w_out_EFD, offs_E)
        if weight_N is not None:
            y_ND = y_ND * weight_N.to(y_ND.dtype).unsqueeze(1)
        return combine_slots(y_ND, slot_N, T * top_k, top_k, row_N=token_N)  # ops/combine.py: why not index_add
    plan = _plan(tokens_per_expert_E, slot_N.shape[0])
    h_NH = _sgmm(x_TD, w_in_EDH, tokens_per_expert_E, slot_N, top_k, 0, None, None, "none", backend, plan)
    return _sgmm(h_NH, w_out_EFD, tokens_per_expert_E, slot_N, 0, top_k, T, weight_N, act, backend, plan)


def grouped_mlp(
    x_ND: torch.Tensor, w_in_EDH: torch.Tensor, w_out_EFD: torch.Tensor, tokens_per_expert_E: torch.Tensor,
    act: str, backend: str = "auto", row_order_N: Optional[torch.Tensor] = None,
) -> torch.Tensor:  # fmt: skip
    """y_ND = act(x_ND @ w_in[e]) @ w_out[e] for the rows of an expert-parallel rank's
    experts. Rows sorted by expert, or, with row_order_N, sorted row n is x[row_order_N[n]]
    and y comes back in x's order: expert_mlp with top_k 1 and no weights, whose gather and
    scatter the loop and triton backends do in place."""
    if row_order_N is not None:
        return expert_mlp(x_ND, w_in_EDH, w_out_EFD, tokens_per_expert_E, row_order_N, 1, None, act, backend)
    w_in_EDH, w_out_EFD = w_in_EDH.to(x_ND.dtype), w_out_EFD.to(x_ND.dtype)
    if _resolve(backend, x_ND, w_in_EDH, x_ND.shape[0], w_out_EFD) == "loop":
        return loop_expert_mlp(x_ND, w_in_EDH, w_out_EFD, tokens_per_expert_E, act=act)
    h_NH = grouped_mm(x_ND, w_in_EDH, tokens_per_expert_E, backend)
    return grouped_mm(activation(h_NH, act), w_out_EFD, tokens_per_expert_E, backend)


def grouped_mm(
    x_ND: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert_E: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    if w_EDF.dtype != x_ND.dtype:
        w_EDF = w_EDF.to(x_ND.dtype)
    backend = _resolve(backend, x_ND, w_EDF)
    if backend == "loop":
        return loop_grouped_mm(x_ND, w_EDF, tokens_per_expert_E)
    if backend == "triton":
        return _sgmm(x_ND, w_EDF, tokens_per_expert_E, None, 0, 0, None, None, "none", backend)
    return _torch_mm(x_ND, w_EDF, _offsets(tokens_per_expert_E))


def _offsets(tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm's offs: the end row of each group, int32."""
    return torch.cumsum(tokens_per_expert_E, dim=0, dtype=torch.int32)


def _torch_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(_torch_grouped_mm(x_ND.contiguous(), w_EDF.contiguous(), offs=offs_E))

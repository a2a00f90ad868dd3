"""Grouped GEMMs over rows sorted by expert, with the token gather/scatter fused into loads/stores.

Legend: N routed rows (sorted by expert), E experts, T tokens, K top-k, M = T*K assignment
slots, Din the reduction dim, Dout the output dim, B row blocks (see kernels/schedule.py).

Two kernels, each used in several roles (ScatterMoE's design: no padded per-expert copies
of the activations, the row permutation lives in the index arrays the kernels load through):

  grouped_gemm   c[c_row(n)] = epi(act_a(a[a_row(n)]) @ b[e(n)])            rows n of blocks
                 forward      a = x_TD gathered by token, or h_NH with the activation
                              fused into the load; routing weight and scatter to the
                              assignment slot fused into the store.
                 input grad   a = dy_TD gathered by token, b = w^T (a strided view); the
                              activation's backward and the routing-weight gradient fused
                              into the epilogue (they need only the forward input's tile).
  grouped_wgrad  c[e] = act_a(a[a_row(n)])^T @ (scale[n] * b[b_row(n)])   summed over e's rows
                 weight grad  one program per (tile, expert, row split); the rows of an
                              expert are split across programs when E tiles cannot fill
                              the GPU, and the split partials summed afterwards.

a_row / b_row / c_row are the identity or an index array: token_N = slot_N // K to gather
token rows in place, slot_N to scatter each row into its own row of an [M, D] buffer whose
K rows per token the caller then sums (deterministic, no atomics). Activations: "none",
"relu", "swiglu" (a = [gate | up], act = silu(gate) * up). Accumulation is fp32; outputs
take the operands' dtype. No launcher reads device memory on the host.

Under TRITON_INTERPRET=1 (CPU tests) the variable must be set before triton is first imported
in the process (Triton's own tl.sum / tl.cumsum are @jit functions too) and still be set when
the kernels launch; autotuning then has a single config.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

# Triton fixes compiled-vs-interpreted when a @triton.jit function is defined: so do we.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

ACTS = {"none": 0, "relu": 1, "swiglu": 2}


def act_width(act: str) -> int:
    """Columns of the pre-activation per activation column (swiglu: gate and up)."""
    return 2 if act == "swiglu" else 1


# Hopper (H100/H200) tiles. grouped_gemm: (BLOCK_N, BLOCK_K, warps, stages), BLOCK_M comes
# from the schedule (64 or 128). grouped_wgrad: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
_HOPPER_MM_TILES = [
    (128, 64, 4, 4), (128, 64, 8, 3), (256, 64, 8, 3), (64, 64, 4, 4),
    (128, 128, 8, 3), (64, 128, 4, 3), (128, 32, 4, 5), (256, 32, 8, 4),
]  # fmt: skip
_HOPPER_WGRAD_TILES = [
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
]  # fmt: skip


def hopper_mm_configs() -> list:
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
        for bn, bk, warps, stages in _HOPPER_MM_TILES
    ]


def hopper_wgrad_configs() -> list:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
        for bm, bn, bk, warps, stages in _HOPPER_WGRAD_TILES
    ]


def _mm_configs():
    if INTERPRET:  # the interpreter cannot benchmark: one small config
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    return hopper_mm_configs()


def _wgrad_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    return hopper_wgrad_configs()


def prune_to_problem(configs: list, dims: dict[str, int]) -> list:
    """The configs whose tiles are no wider than the problem, per block name -> dim size.

    A BLOCK_N of 256 against Dout = 64 computes three quarters masked-out columns: it cannot
    beat the 64-wide tile, yet the autotuner would compile and time it. Compiling is most of
    a cold autotune (GPU kernel tests: 436 s on an H100, mostly compiling), so each tile
    dropped saves a compile per autotune key. Of the 8 grouped_gemm configs, a 1024 -> 64
    projection (SwitchHead's value projection at d_head 64) keeps 2, 64 -> 1024 keeps 6,
    MoEUT's 1024 -> 128 keeps 6, Mixtral's all 8. A block may always be as wide as the
    problem's next power of two, or as the smallest block any config has; where no config
    fits every dim (a problem smaller than every tile), those of the smallest tile area stay.
    """
    caps = {}
    for name, dim in dims.items():
        smallest = min(c.kwargs[name] for c in configs)
        caps[name] = max(triton.next_power_of_2(max(int(dim), 1)), smallest)
    fit = [c for c in configs if all(c.kwargs[name] <= cap for name, cap in caps.items())]
    if fit:
        return fit
    area = {id(c): math.prod(c.kwargs[name] for name in dims) for c in configs}
    return [c for c in configs if area[id(c)] == min(area.values())]


def _prune_mm(configs, named_args, **kwargs):
    return prune_to_problem(configs, {"BLOCK_N": named_args["Dout"], "BLOCK_K": named_args["Din"]})


def _prune_wgrad(configs, named_args, **kwargs):
    return prune_to_problem(configs, {"BLOCK_M": named_args["Dm"], "BLOCK_N": named_args["Dn"]})


# The d scale partials have one row per BLOCK_N tile: sized for the smallest BLOCK_N.
_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _mm_configs())


@triton.jit
def _act(g, u, ACT: tl.constexpr):
    """act of fp32 tiles: relu(g), or silu(g) * u for swiglu (u unused otherwise)."""
    if ACT == 1:
        out = tl.maximum(g, 0.0)
    elif ACT == 2:
        out = g * tl.sigmoid(g) * u
    else:
        out = g
    return out


@triton.autotune(
    configs=_mm_configs(),
    key=["Din", "Dout", "BLOCK_M", "ACT_A", "EPI_ACT", "A_IDX", "C_IDX"],
    prune_configs_by={"early_config_prune": _prune_mm},
)
@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, x_ptr, offs_ptr, sched_ptr, a_idx_ptr, c_idx_ptr, x_idx_ptr, scale_ptr, dscale_ptr,
    num_blocks, N, Din, Dout, dscale_rows,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn, stride_xm, stride_xn,
    A_IDX: tl.constexpr, C_IDX: tl.constexpr, X_IDX: tl.constexpr, SCALE: tl.constexpr,
    ACT_A: tl.constexpr, EPI_ACT: tl.constexpr, DSCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_n = tl.cdiv(Dout, BLOCK_N)
    # Grouped order: GROUP_M row blocks (mostly one expert) walk the columns together, so a
    # tile of b[e] is read from HBM once per group, not once per block.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    e = tl.load(sched_ptr + pid_m)
    if e < 0:  # past the last real block of the upper-bound grid
        return
    row0 = tl.load(sched_ptr + num_blocks + pid_m)
    row_end = tl.load(offs_ptr + e + 1)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    if A_IDX:  # gather: the rows of a are token rows, read in place
        a_rows = tl.load(a_idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Dout
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Din, BLOCK_K):
        k_ok = (k0 + ks) < Din
        a_mask = row_ok[:, None] & k_ok[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if ACT_A != 0:  # activation of the previous GEMM, applied on the fly: h never re-read
            u = a
            if ACT_A == 2:  # swiglu: the up half sits Din columns to the right of the gate
                u = tl.load(a_ptrs + Din * stride_ak, mask=a_mask, other=0.0)
            a = _act(a.to(tl.float32), u.to(tl.float32), ACT_A).to(b_ptr.dtype.element_ty)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:  # the interpreter's bf16 tl.dot multiplies raw bits: widen first
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue. In the input-grad role acc = dy @ w^T = d(act output); x is the forward input.
    mask = row_ok[:, None] & col_ok[None, :]
    if EPI_ACT != 0 or DSCALE:
        if X_IDX:
            x_rows = tl.load(x_idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            x_rows = rows.to(tl.int64)
        x_ptrs = x_ptr + x_rows[:, None] * stride_xm + cols[None, :] * stride_xn
        xg = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        xu = xg
        if EPI_ACT == 2:
            xu = tl.load(x_ptrs + Dout * stride_xn, mask=mask, other=0.0).to(tl.float32)
        if DSCALE:  # d scale[n] = <dy_n @ w^T, act(x_n)>, this tile's share of the row sum
            part = tl.sum(acc * _act(xg, xu, EPI_ACT), axis=1)
            # Offsets in int64, as the row offsets above: tiles x N passes 2^31 at 16.7M rows
            # of width 8192. n_64 carries it to p * N below, p being a Python int when
            # interpreted and an int32 when compiled.
            rows_64 = rows.to(tl.int64)
            n_64 = rows_64 * 0 + N
            tl.store(dscale_ptr + pid_n.to(tl.int64) * N + rows_64, part, mask=row_ok)
            # The buffer has a row per tile of the narrowest config; clear the rows this
            # config leaves unused (an autotuning run of another config may have written them).
            if pid_n == 0:
                for p in range(num_n, dscale_rows):
                    tl.store(dscale_ptr + n_64 * p + rows_64, tl.zeros((BLOCK_M,), tl.float32), mask=row_ok)
    if SCALE:
        acc = acc * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    if C_IDX:  # scatter: row n lands in its assignment slot
        c_rows = tl.load(c_idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        c_rows = rows.to(tl.int64)
    c_ptrs = c_ptr + c_rows[:, None] * stride_cm + cols[None, :] * stride_cn
    out_ty = c_ptr.dtype.element_ty
    if EPI_ACT == 2:  # d gate = da * up * s * (1 + g * (1 - s)), d up = da * silu(g)
        sig = tl.sigmoid(xg)
        tl.store(c_ptrs, (acc * xu * sig * (1.0 + xg * (1.0 - sig))).to(out_ty), mask=mask)
        tl.store(c_ptrs + Dout * stride_cn, (acc * xg * sig).to(out_ty), mask=mask)
    elif EPI_ACT == 1:
        tl.store(c_ptrs, tl.where(xg > 0.0, acc, 0.0).to(out_ty), mask=mask)
    else:
        tl.store(c_ptrs, acc.to(out_ty), mask=mask)


@triton.autotune(
    configs=_wgrad_configs(),
    key=["Dm", "Dn", "ACT_A", "A_IDX", "B_IDX"],
    prune_configs_by={"early_config_prune": _prune_wgrad},
)
@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, b_ptr, c_ptr, offs_ptr, a_idx_ptr, b_idx_ptr, scale_ptr,
    Dm, Dn, SPLIT,
    stride_am, stride_ak, stride_bm, stride_bn, stride_cs, stride_ce, stride_cm, stride_cn,
    A_IDX: tl.constexpr, B_IDX: tl.constexpr, SCALE: tl.constexpr, ACT_A: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    e = tl.program_id(1)
    s = tl.program_id(2)
    num_n = tl.cdiv(Dn, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    start = tl.load(offs_ptr + e)
    end = tl.load(offs_ptr + e + 1)
    # Split s of this expert's rows; chunks are BLOCK_K multiples so only the last is ragged.
    chunk = tl.cdiv(tl.cdiv(end - start, SPLIT), BLOCK_K) * BLOCK_K
    lo = start + s * chunk
    hi = tl.minimum(end, lo + chunk)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < Dm
    n_ok = ns < Dn
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        rows = r0 + ks
        r_ok = rows < hi
        if A_IDX:
            a_rows = tl.load(a_idx_ptr + rows, mask=r_ok, other=0).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        if B_IDX:
            b_rows = tl.load(b_idx_ptr + rows, mask=r_ok, other=0).to(tl.int64)
        else:
            b_rows = rows.to(tl.int64)
        # a^T tile [BLOCK_M, BLOCK_K] loaded transposed through the pointers, no copy.
        a_ptrs = a_ptr + a_rows[None, :] * stride_am + ms[:, None] * stride_ak
        a_mask = m_ok[:, None] & r_ok[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if ACT_A != 0:
            u = a
            if ACT_A == 2:
                u = tl.load(a_ptrs + Dm * stride_ak, mask=a_mask, other=0.0)
            a = _act(a.to(tl.float32), u.to(tl.float32), ACT_A).to(b_ptr.dtype.element_ty)
        b_ptrs = b_ptr + b_rows[:, None] * stride_bm + ns[None, :] * stride_bn
        b = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if SCALE:
            w = tl.load(scale_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
            b = (b.to(tl.float32) * w[:, None]).to(b_ptr.dtype.element_ty)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    c_ptrs = c_ptr + s.to(tl.int64) * stride_cs + e.to(tl.int64) * stride_ce
    c_ptrs += ms[:, None] * stride_cm + ns[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's matmul setting (tf32 only when allowed); 16-bit dtypes ignore it.
    if dtype == torch.float32 and not (torch.backends.cuda.matmul.allow_tf32 and not INTERPRET):
        return "ieee"
    return "tf32"


def _dot_fp32(dtype: torch.dtype) -> bool:
    # Interpreter only: its bf16 tl.dot is wrong, fp32 of the same values is exact enough.
    return INTERPRET and dtype == torch.bfloat16


def pick_block_m(num_rows: int, num_experts: int) -> int:
    """Rows per block: a block never straddles experts, so small groups want small blocks."""
    if INTERPRET:
        return 16
    return 64 if num_rows < 96 * max(num_experts, 1) else 128


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pick_split(num_rows: int, num_experts: int, dm: int, dn: int, device: torch.device) -> int:
    """Row splits per expert so that the weight-grad grid covers every SM about twice."""
    if device.type != "cuda":
        return 1
    tiles = num_experts * triton.cdiv(dm, 128) * triton.cdiv(dn, 128)
    want = triton.cdiv(2 * _num_sms(device.index or 0), tiles)
    # At least ~512 rows per split on average, or the partial sums cost more than they save.
    return int(max(1, min(want, num_rows // (512 * max(num_experts, 1)), 64)))


def _check_idx(idx, n: int, name: str) -> None:
    assert idx is None or (idx.dim() == 1 and idx.numel() == n and not idx.is_floating_point()), (
        f"{name} must be an integer vector of {n} rows"
    )


def grouped_gemm(
    a: torch.Tensor, b_EKN: torch.Tensor, offs_E1: torch.Tensor, sched_2B: torch.Tensor, *, block_m: int,
    a_idx_N=None, c_idx_N=None, out_rows=None, scale_N=None, act_a: str = "none", epi_act: str = "none",
    x=None, x_idx_N=None, want_dscale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """c[c_row(n)] = epi(act_a(a[a_row(n)]) @ b[e(n)]) for the N sorted rows; returns (c, dscale_N).

    a: [N or T, Din * act_width(act_a)], b: [E, Din, Dout] (any strides), offs/sched from
    kernels.schedule.block_schedule with the same block_m. c: [out_rows (default N),
    Dout * act_width(epi_act)]; with c_idx_N its rows must be distinct, and rows no index
    names are zero. scale_N multiplies row n after the GEMM. epi_act != "none" turns the
    epilogue into that activation's backward at x[x_row(n)] ([*, Dout * width]); want_dscale
    also returns <acc_n, act(x_n)> (before scaling), the gradient of scale_N.
    """
    N = a_idx_N.numel() if a_idx_N is not None else a.shape[0]
    E, Din, Dout = b_EKN.shape
    assert a.dim() == 2 and a.shape[1] == Din * act_width(act_a), f"a {tuple(a.shape)} vs b {tuple(b_EKN.shape)} ({act_a})"
    assert a.dtype == b_EKN.dtype and a.dtype in (torch.float32, torch.float16, torch.bfloat16), (
        f"a, b: same float dtype, got {a.dtype} and {b_EKN.dtype}"
    )
    assert offs_E1.numel() == E + 1 and sched_2B.shape[0] == 2
    for idx, name in ((a_idx_N, "a_idx_N"), (c_idx_N, "c_idx_N"), (x_idx_N, "x_idx_N")):
        _check_idx(idx, N, name)
    need_x = epi_act != "none" or want_dscale
    if need_x:
        assert x is not None and x.shape[1] == Dout * act_width(epi_act), "the epilogue needs the forward input x"
    assert scale_N is None or scale_N.numel() == N
    out_rows = N if out_rows is None else out_rows
    assert c_idx_N is not None or out_rows == N
    width = Dout * act_width(epi_act)
    # Slots no row writes (assignments dropped for capacity) must read as zero.
    alloc = torch.zeros if out_rows > N else torch.empty
    c = alloc(out_rows, width, dtype=a.dtype, device=a.device)
    if N == 0 or Dout == 0:
        return c, (torch.zeros(N, dtype=torch.float32, device=a.device) if want_dscale else None)
    # One row of d scale partials per BLOCK_N tile; the kernel fills or clears every row.
    dscale_PN = None
    if want_dscale:
        dscale_PN = torch.empty(triton.cdiv(Dout, _MIN_BLOCK_N), N, dtype=torch.float32, device=a.device)
    dummy = offs_E1  # stands in for absent optional pointers; the constexpr flags skip them
    B = sched_2B.shape[1]

    def grid(meta):
        return (B * triton.cdiv(Dout, meta["BLOCK_N"]),)

    _grouped_gemm_kernel[grid](
        a, b_EKN, c, x if need_x else dummy, offs_E1, sched_2B.contiguous(),
        dummy if a_idx_N is None else a_idx_N.contiguous(),
        dummy if c_idx_N is None else c_idx_N.contiguous(),
        dummy if x_idx_N is None else x_idx_N.contiguous(),
        dummy if scale_N is None else scale_N.contiguous(),
        dummy if dscale_PN is None else dscale_PN,
        B, N, Din, Dout, 0 if dscale_PN is None else dscale_PN.shape[0],
        a.stride(0), a.stride(1), b_EKN.stride(0), b_EKN.stride(1), b_EKN.stride(2), c.stride(0), c.stride(1),
        x.stride(0) if need_x else 0, x.stride(1) if need_x else 0,
        A_IDX=a_idx_N is not None, C_IDX=c_idx_N is not None, X_IDX=x_idx_N is not None,
        SCALE=scale_N is not None, ACT_A=ACTS[act_a], EPI_ACT=ACTS[epi_act], DSCALE=want_dscale,
        INPUT_PRECISION=_input_precision(a.dtype), DOT_FP32=_dot_fp32(a.dtype), BLOCK_M=block_m,
    )  # fmt: skip
    return c, (dscale_PN.sum(0) if want_dscale else None)


def grouped_wgrad(
    a: torch.Tensor, b: torch.Tensor, offs_E1: torch.Tensor, *, a_idx_N=None, b_idx_N=None, scale_N=None,
    act_a: str = "none", out_dtype=None, split=None,
) -> torch.Tensor:  # fmt: skip
    """c[e] = act_a(a[a_row(n)])^T @ (scale_N[n] * b[b_row(n)]) over expert e's rows -> [E, Dm, Dn].

    a: [N or T, Dm * act_width(act_a)], b: [N or T, Dn]; N from the index arrays if given.
    split (default: pick_split) divides each expert's rows between programs.
    """
    N = a_idx_N.numel() if a_idx_N is not None else a.shape[0]
    if b_idx_N is None:
        assert b.shape[0] == N, "b rows must match the routed rows"
    E = offs_E1.numel() - 1
    Dm, Dn = a.shape[1] // act_width(act_a), b.shape[1]
    assert a.shape[1] == Dm * act_width(act_a) and a.dtype == b.dtype
    for idx, name in ((a_idx_N, "a_idx_N"), (b_idx_N, "b_idx_N")):
        _check_idx(idx, N, name)
    assert E <= 65535, "experts ride grid axis 1"
    out_dtype = out_dtype or a.dtype
    if N == 0 or E == 0:
        return torch.zeros(E, Dm, Dn, dtype=out_dtype, device=a.device)
    split = split or pick_split(N, E, Dm, Dn, a.device)
    if split == 1:  # each program owns its tile outright: write the final dtype directly
        out = torch.empty(E, Dm, Dn, dtype=out_dtype, device=a.device)
        c, stride_cs = out, 0
    else:  # fp32 partials per split, summed below
        c = torch.empty(split, E, Dm, Dn, dtype=torch.float32, device=a.device)
        stride_cs = c.stride(0)
    dummy = offs_E1

    def grid(meta):
        return (triton.cdiv(Dm, meta["BLOCK_M"]) * triton.cdiv(Dn, meta["BLOCK_N"]), E, split)

    _grouped_wgrad_kernel[grid](
        a, b, c, offs_E1,
        dummy if a_idx_N is None else a_idx_N.contiguous(),
        dummy if b_idx_N is None else b_idx_N.contiguous(),
        dummy if scale_N is None else scale_N.contiguous(),
        Dm, Dn, split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        stride_cs, c.stride(-3), c.stride(-2), c.stride(-1),
        A_IDX=a_idx_N is not None, B_IDX=b_idx_N is not None, SCALE=scale_N is not None,
        ACT_A=ACTS[act_a], INPUT_PRECISION=_input_precision(a.dtype), DOT_FP32=_dot_fp32(a.dtype),
    )  # fmt: skip
    return c if split == 1 else c.sum(0).to(out_dtype)


# ---- pure-PyTorch references (per-expert loops; any dtype, float64 in the tests) ----------


def act_reference(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "swiglu":
        g, u = x.chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u
    return torch.relu(x) if act == "relu" else x


def _act_bwd_reference(x: torch.Tensor, da: torch.Tensor, act: str) -> torch.Tensor:
    if act == "swiglu":
        g, u = x.chunk(2, dim=-1)
        s = torch.sigmoid(g)
        return torch.cat([da * u * s * (1 + g * (1 - s)), da * g * s], dim=-1)
    return da * (x > 0) if act == "relu" else da


def _per_expert(fn, counts_E: torch.Tensor, *tensors):
    # NOTE: device-to-host sync (reference only): split sizes must be Python ints.
    counts = counts_E.tolist()
    return [fn(e, *parts) for e, parts in enumerate(zip(*(t.split(counts) for t in tensors)))]


def grouped_gemm_reference(
    a, b_EKN, tokens_per_expert_E, *, a_idx_N=None, c_idx_N=None, out_rows=None, scale_N=None,
    act_a="none", epi_act="none", x=None, x_idx_N=None, want_dscale=False,
):  # fmt: skip
    """grouped_gemm's semantics with torch ops (takes counts, not a schedule)."""
    rows = act_reference(a if a_idx_N is None else a[a_idx_N], act_a)
    parts = _per_expert(lambda e, r: r @ b_EKN[e], tokens_per_expert_E, rows)
    acc = torch.cat(parts) if parts else rows.new_zeros(0, b_EKN.shape[2])
    dscale = None
    if epi_act != "none" or want_dscale:
        xr = x if x_idx_N is None else x[x_idx_N]
        dscale = (acc * act_reference(xr, epi_act)).sum(1) if want_dscale else None
    if scale_N is not None:
        acc = acc * scale_N.to(acc.dtype)[:, None]
    if epi_act != "none":
        acc = _act_bwd_reference(xr, acc, epi_act)
    if c_idx_N is None:
        return acc, dscale
    c = acc.new_zeros(out_rows, acc.shape[1])
    c[c_idx_N] = acc
    return c, dscale


def grouped_wgrad_reference(a, b, tokens_per_expert_E, *, a_idx_N=None, b_idx_N=None, scale_N=None, act_a="none"):
    """grouped_wgrad's semantics with torch ops."""
    ar = act_reference(a if a_idx_N is None else a[a_idx_N], act_a)
    br = b if b_idx_N is None else b[b_idx_N]
    if scale_N is not None:
        br = br * scale_N.to(br.dtype)[:, None]
    parts = _per_expert(lambda e, x, y: x.T @ y, tokens_per_expert_E, ar, br)
    return torch.stack(parts) if parts else ar.new_zeros(0, ar.shape[1], br.shape[1])

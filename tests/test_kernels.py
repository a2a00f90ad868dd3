"""Triton grouped-GEMM kernels (moe_dist/kernels) and their ops against float64 references.

Three tiers, cheapest first:
  1. launchers vs their pure-PyTorch references (schedule, grouped_gemm, grouped_wgrad);
  2. the autograd ops (scatter_grouped_mm, expert_mlp, grouped_mm backend "triton"): outputs
     and every gradient against a per-row float64 loop, on awkward routings: sizes that are
     not block multiples, experts with no rows, one row, k > 1 with dropped slots, one
     expert; plus opcheck of the custom ops and a torch.compile trace;
  3. GPU-marked: bf16 and Hopper-sized shapes on the compiled kernels (skipped without CUDA).

Without CUDA the kernels run on CPU under Triton's interpreter, which must be switched on
before triton and the kernel module are imported: this file sets TRITON_INTERPRET at its
top (moe_dist.ops imports the kernels lazily, so earlier test files do not). If triton was
already imported compiled in this process, the whole file reruns in a fresh process instead.
On a GPU machine tiers 1-2 run compiled on the GPU; `TRITON_INTERPRET=1 pytest tests/test_kernels.py`
forces the interpreter there (and skips tier 3). The interpreter's bf16 tl.dot is wrong,
so under it the kernels widen bf16 tiles to fp32 before tl.dot: interpreter bf16 cases
check the bf16 loads, stores and epilogues, and only tier 3 checks Triton's bf16 tl.dot.
"""

import importlib
import os
import subprocess
import sys

import torch

_ENV_BEFORE = os.environ.get("TRITON_INTERPRET")
INTERPRET = _ENV_BEFORE == "1" or not torch.cuda.is_available()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import triton.language  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import moe_dist.kernels.grouped_gemm as kgg  # noqa: E402
import moe_dist.kernels.schedule as ksched  # noqa: E402
from moe_dist.ops import grouped_mm as ops  # noqa: E402

# Interpreted kernels call Triton's own @jit library (tl.sum, tl.cumsum, tl.sigmoid), which
# is interpreted only if triton itself was first imported under TRITON_INTERPRET=1. If some
# earlier import in this process loaded triton compiled, run this file in a fresh process.
STALE_TRITON = INTERPRET and isinstance(triton.language.sum, JITFunction)
if INTERPRET and not STALE_TRITON and not kgg.INTERPRET:  # our module imported in the other mode
    kgg, ksched = importlib.reload(kgg), importlib.reload(ksched)
assert STALE_TRITON or kgg.INTERPRET == INTERPRET


def _restore_env():
    if _ENV_BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _ENV_BEFORE


# Imported: hand the variable back until this module's tests run (interpreter_env), so the
# files collected with this one do not run, or start processes, under it.
_restore_env()

DEV = "cpu" if INTERPRET else "cuda"
gpu = pytest.mark.skipif(INTERPRET, reason="needs CUDA (compiled kernels)")
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


@pytest.fixture(scope="module", autouse=True)
def interpreter_env():
    """Interpreted kernels also read TRITON_INTERPRET when they launch: keep it set for this
    module's tests, then restore it so later tests (and their subprocesses) do not inherit it."""
    if INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore_env()


@pytest.fixture(autouse=True)
def in_process_only_if_interpretable(request):
    if STALE_TRITON and request.node.originalname != "test_whole_file_in_a_fresh_process":
        pytest.skip("triton was imported before TRITON_INTERPRET was set: covered by the fresh-process run")


def test_whole_file_in_a_fresh_process():
    """The fallback when this process cannot interpret: the same tests, in a new process."""
    if not STALE_TRITON:
        pytest.skip("the tests run in this process")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)]
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


def routing(T, K, E, seed, drop=0.0, empty=()):
    """Token-choice routing as moe.dispatch.sort_by_expert sorts it: (slot_N, counts_E), slots sorted by expert."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    expert_TK = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(T)])
    kept_P = (torch.rand(T, K, generator=g) >= drop).reshape(-1).nonzero().squeeze(1)
    expert_P = expert_TK.reshape(-1)[kept_P]
    slot_N = kept_P[torch.sort(expert_P, stable=True).indices]
    return slot_N.to(DEV), torch.bincount(expert_P, minlength=E).to(DEV)


def act_ref(h, act):
    if act == "swiglu":
        g, u = h.chunk(2, dim=-1)
        return g * torch.sigmoid(g) * u
    if act == "relu":
        return torch.relu(h)
    if act == "gelu":
        return torch.nn.functional.gelu(h)
    return h


def per_row_reference(x, w_EDF, slot_N, counts_E, gdiv, sdiv, n_out, scale_N, act):
    """One row at a time, straight from the definition (float64, differentiable)."""
    expert_N = torch.repeat_interleave(torch.arange(len(counts_E), device=x.device), counts_E)
    rows = []
    for n in range(len(expert_N)):
        src = x[slot_N[n] // gdiv] if gdiv else x[n]
        r = act_ref(src, act) @ w_EDF[expert_N[n]]
        rows.append(r * scale_N[n] if scale_N is not None else r)
    y_N = torch.stack(rows) if rows else x.new_zeros(0, w_EDF.shape[2])
    if not sdiv:
        return y_N
    return x.new_zeros(n_out, w_EDF.shape[2]).index_add(0, slot_N // sdiv, y_N)


def rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEV, dtype=dtype)


# ---- 1. launchers vs references -----------------------------------------------------------


@pytest.mark.parametrize("counts", [[3, 0, 17, 1, 0, 40], [0, 0, 0], [1], [16, 16, 0, 32], [5] * 40])
@pytest.mark.parametrize("block_m", [16, 32])
def test_block_schedule_matches_reference(counts, block_m):
    counts_E = torch.tensor(counts, device=DEV)
    got = ksched.block_schedule(counts_E, sum(counts), block_m)
    want = ksched.block_schedule_reference(counts_E, sum(counts), block_m)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w.cpu())
    # the active blocks cover every row exactly once, each inside its own expert's range
    offs, (expert_B, first_B) = want[0].tolist(), want[1].cpu()
    covered = []
    for e, first in zip(expert_B.tolist(), first_B.tolist()):
        if e >= 0:
            assert offs[e] <= first < offs[e + 1]
            covered += range(first, min(first + block_m, offs[e + 1]))
    assert covered == list(range(sum(counts)))
    assert (expert_B >= 0).sum() == sum(-(-c // block_m) for c in counts)


def _tiles(configs, *names):
    return sorted(tuple(c.kwargs[n] for n in names) + (c.num_warps, c.num_stages) for c in configs)


@pytest.mark.parametrize("din, dout, kept", [
    (1024, 64, [(64, 64, 4, 4), (64, 128, 4, 3)]),   # SwitchHead value projection, d_head 64
    (64, 1024, 6),                                    # and its output projection: no BLOCK_K 128
    (1024, 128, 6),                                   # MoEUT in: no BLOCK_N 256
    (4096, 28672, 8), (14336, 4096, 8),               # Mixtral: every tile fits
    (8, 8, [(64, 64, 4, 4), (128, 32, 4, 5)]),        # tinier than every tile: the smallest area
])  # fmt: skip
def test_autotune_prunes_tiles_wider_than_the_problem(din, dout, kept):
    """The Hopper configs the autotuner compiles and times for one grouped_gemm shape; the
    interpreter's single config never reaches the pruning, so it is called as the autotuner does."""
    assert kgg._grouped_gemm_kernel.early_config_prune is kgg._prune_mm
    configs = kgg.hopper_mm_configs()
    got = kgg._prune_mm(configs, {"Din": din, "Dout": dout, "N": 12345})
    assert all(c in configs for c in got)
    if isinstance(kept, int):
        assert len(got) == kept
        bn_cap, bk_cap = triton.next_power_of_2(dout), triton.next_power_of_2(din)
        assert got == [c for c in configs if c.kwargs["BLOCK_N"] <= bn_cap and c.kwargs["BLOCK_K"] <= bk_cap]
    else:
        assert _tiles(got, "BLOCK_N", "BLOCK_K") == sorted(kept)


def test_autotune_prunes_wgrad_tiles_wider_than_the_problem():
    assert kgg._grouped_wgrad_kernel.early_config_prune is kgg._prune_wgrad
    configs = kgg.hopper_wgrad_configs()
    assert kgg._prune_wgrad(configs, {"Dm": 4096, "Dn": 28672}) == configs
    # MoEUT's w_in gradient: [1024, 128] per expert, so no 256-wide N tile
    assert _tiles(kgg._prune_wgrad(configs, {"Dm": 1024, "Dn": 128}), "BLOCK_M", "BLOCK_N") == sorted(
        [(128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4), (256, 128, 8, 3)]
    )
    # d_head 64 both ways: only the 64 x 64 tile
    assert _tiles(kgg._prune_wgrad(configs, {"Dm": 64, "Dn": 64}), "BLOCK_M", "BLOCK_N") == [(64, 64, 4, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["none", "relu", "swiglu"])
def test_grouped_gemm_launcher_forward_and_input_grad_roles(dtype, act):
    torch.manual_seed(0)
    T, K, E, Din, Dout = 21, 2, 6, 20, 37
    slot_N, counts_E = routing(T, K, E, seed=1, drop=0.2, empty=(1, 4))
    token_N, N = slot_N // K, len(slot_N)
    offs_E1, sched_2B = ksched.block_schedule(counts_E, N, 16)
    w = rand(E, Din, Dout, dtype=dtype, scale=Din**-0.5)
    scale_N = torch.rand(N, device=DEV)
    # forward role: gather token rows, act in the load, weight and scatter in the store
    x = rand(T, Din * kgg.act_width(act), dtype=dtype)
    kw = dict(a_idx_N=token_N, c_idx_N=slot_N, out_rows=T * K, scale_N=scale_N, act_a=act)
    c, _ = kgg.grouped_gemm(x, w, offs_E1, sched_2B, block_m=16, **kw)
    kw["scale_N"] = scale_N.double()
    c_ref, _ = kgg.grouped_gemm_reference(x.double(), w.double(), counts_E, **kw)
    torch.testing.assert_close(c.double(), c_ref, **TOL[dtype])
    # input-grad role: dy gathered by token, w^T as a view, act backward + d scale in the epilogue
    dy = rand(T, Dout, dtype=dtype)
    kw = dict(a_idx_N=token_N, c_idx_N=slot_N, out_rows=T * K, scale_N=scale_N, epi_act=act)
    kw.update(x=x, x_idx_N=token_N, want_dscale=True)
    c, ds = kgg.grouped_gemm(dy, w.transpose(1, 2), offs_E1, sched_2B, block_m=16, **kw)
    kw.update(scale_N=scale_N.double(), x=x.double())
    c_ref, ds_ref = kgg.grouped_gemm_reference(dy.double(), w.double().transpose(1, 2), counts_E, **kw)
    torch.testing.assert_close(c.double(), c_ref, **TOL[dtype])
    torch.testing.assert_close(ds.double(), ds_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype, act, split", [
    (torch.float32, "none", 1), (torch.float32, "relu", 3), (torch.float32, "swiglu", 1),
    (torch.float16, "none", 2), (torch.float16, "swiglu", 3),
])  # fmt: skip
def test_grouped_wgrad_launcher(dtype, act, split):
    torch.manual_seed(0)
    # ~30 rows per expert: with BLOCK_K 16 the splits each get rows, the last a ragged share
    T, K, E, Dm, Dn = 47, 2, 4, 19, 33
    slot_N, counts_E = routing(T, K, E, seed=2, drop=0.1, empty=(2,))
    token_N, N = slot_N // K, len(slot_N)
    offs_E1, _ = ksched.block_schedule(counts_E, N, 16)
    a = rand(T, Dm * kgg.act_width(act), dtype=dtype)
    b = rand(T, Dn, dtype=dtype)
    scale_N = torch.rand(N, device=DEV)
    kw = dict(a_idx_N=token_N, b_idx_N=token_N, scale_N=scale_N, act_a=act)
    got = kgg.grouped_wgrad(a, b, offs_E1, split=split, **kw)
    kw["scale_N"] = scale_N.double()
    want = kgg.grouped_wgrad_reference(a.double(), b.double(), counts_E, **kw)
    assert got.dtype == dtype and got.shape == (E, Dm, Dn)
    assert got[2].abs().sum() == 0  # an expert without rows gets an exact zero gradient
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


# ---- 2. autograd ops vs a per-row float64 loop --------------------------------------------

# (T, K, E, Din, Dout, drop, empty experts): odd sizes, zero-row experts, one row, one expert
ROUTINGS = {
    "odd-k2-drops": (19, 2, 6, 20, 37, 0.15, (1, 4)),
    "one-row": (1, 1, 3, 16, 16, 0.0, ()),
    "one-expert": (33, 1, 1, 24, 40, 0.0, ()),
    "k3-many-experts": (13, 3, 9, 17, 48, 0.3, (0, 8)),
    # SwitchHead: 7 tokens x 3 heads = 21 (token, head) rows, K = 2 of 8 experts each
    "switchhead": (21, 2, 8, 16, 24, 0.0, ()),
}


# gdiv / sdiv: a row reads x[slot // gdiv] and adds into y[slot // sdiv] (0: sorted rows)
@pytest.mark.parametrize("name, dtype, act, gdiv, sdiv, scaled", [
    ("odd-k2-drops", torch.float32, "swiglu", 2, 2, True),  # top-k MoE: token = slot // K
    ("odd-k2-drops", torch.float16, "relu", 2, 2, True),
    ("odd-k2-drops", torch.float32, "none", 0, 0, False),  # plain grouped GEMM
    ("one-row", torch.float32, "relu", 1, 1, True),
    ("one-expert", torch.float16, "swiglu", 0, 1, True),  # scatter only
    ("k3-many-experts", torch.float32, "gelu", 3, 0, True),  # gather only, unfused activation
    ("k3-many-experts", torch.float16, "none", 3, 3, False),
    ("switchhead", torch.float32, "none", 6, 2, True),  # value side: token -> (token, head)
    ("switchhead", torch.float16, "none", 2, 6, True),  # output side: (token, head) -> token
    ("odd-k2-drops", torch.bfloat16, "swiglu", 2, 2, True),
])  # fmt: skip
def test_scatter_grouped_mm_outputs_and_grads(name, dtype, act, gdiv, sdiv, scaled):
    torch.manual_seed(0)
    T, K, E, Din, Dout, drop, empty = ROUTINGS[name]
    slot_N, counts_E = routing(T, K, E, seed=3, drop=drop, empty=empty)
    N, M = len(slot_N), T * K
    n_out = M // sdiv if sdiv else None
    x = rand(M // gdiv if gdiv else N, Din * kgg.act_width(act), dtype=dtype).requires_grad_()
    w = rand(E, Din, Dout, dtype=dtype, scale=Din**-0.5).requires_grad_()
    scale_N = torch.rand(N, device=DEV, requires_grad=True) if scaled else None
    leaves = [t for t in (x, w, scale_N) if t is not None]
    kw = dict(slot_N=slot_N, gather_div=gdiv, scatter_div=sdiv, num_out=n_out, act=act)
    y = ops.scatter_grouped_mm(x, w, counts_E, scale_N=scale_N, backend="triton", **kw)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    x64, w64 = ref_leaves[:2]
    s64 = ref_leaves[2] if scaled else None
    y_ref = per_row_reference(x64, w64, slot_N, counts_E, gdiv, sdiv, n_out, s64, act)
    assert y.dtype == dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
    dy = rand(*y.shape, dtype=dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, **TOL[dtype])


@pytest.mark.parametrize("name, dtype, act", [
    ("odd-k2-drops", torch.float32, "swiglu"),
    ("k3-many-experts", torch.float16, "swiglu"),
    ("one-expert", torch.float32, "relu"),
    ("odd-k2-drops", torch.bfloat16, "relu"),
])  # fmt: skip
def test_expert_mlp_matches_dispatch_experts_combine(name, dtype, act):
    """The fused path against the unfused one the MoE layer runs today, in float64."""
    torch.manual_seed(0)
    T, K, E, D, F, drop, empty = ROUTINGS[name]
    slot_N, counts_E = routing(T, K, E, seed=4, drop=drop, empty=empty)
    x = rand(T, D, dtype=dtype).requires_grad_()
    w_in = rand(E, D, F * kgg.act_width(act), dtype=dtype, scale=D**-0.5).requires_grad_()
    w_out = rand(E, F, D, dtype=dtype, scale=F**-0.5).requires_grad_()
    weight_N = torch.rand(len(slot_N), device=DEV, requires_grad=True)
    leaves = [x, w_in, w_out, weight_N]
    y = ops.expert_mlp(x, w_in, w_out, counts_E, slot_N, K, weight_N, act, backend="triton")
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = ops.expert_mlp_reference(*ref_leaves[:3], counts_E, slot_N, K, ref_leaves[3], act)
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
    dy = rand(T, D, dtype=dtype)
    for g, g_ref in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(y_ref, ref_leaves, dy.double())):
        torch.testing.assert_close(g.double(), g_ref, **TOL[dtype])


def test_grouped_mlp_row_order_fuses_the_expert_parallel_regroup():
    """An ep rank's received rows (grouped by source rank) read and written through their
    expert order: expert_mlp with k = 1, no weights, a permutation as slots."""
    torch.manual_seed(0)
    counts_E = torch.tensor([5, 0, 19, 1, 8], device=DEV)
    order_N = torch.randperm(33, device=DEV)
    f32 = torch.float32
    leaves = [rand(33, 24, dtype=f32).requires_grad_(), rand(5, 24, 40, dtype=f32, scale=24**-0.5).requires_grad_(),
              rand(5, 20, 24, dtype=f32, scale=20**-0.5).requires_grad_()]  # fmt: skip
    y = ops.grouped_mlp(*leaves, counts_E, "swiglu", backend="triton", row_order_N=order_N)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    h = ops.grouped_mm_reference(ref[0][order_N], ref[1], counts_E)
    y_sorted = ops.grouped_mm_reference(ops.activation(h, "swiglu"), ref[2], counts_E)
    y_ref = torch.empty_like(y_sorted).index_copy(0, order_N, y_sorted)
    torch.testing.assert_close(y.double(), y_ref, **TOL[torch.float32])
    dy = rand(33, 24, dtype=f32)
    for g, g_ref in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(y_ref, ref, dy.double())):
        torch.testing.assert_close(g.double(), g_ref, **TOL[torch.float32])


def test_expert_mlp_all_rows_dropped():
    """N = 0 (every assignment over capacity): zero output and zero gradients, no launch errors."""
    T, K, E, D, F = 5, 2, 3, 16, 16
    slot_N, counts_E = torch.zeros(0, dtype=torch.long, device=DEV), torch.zeros(E, dtype=torch.long, device=DEV)
    leaves = [rand(*shape, dtype=torch.float32).requires_grad_() for shape in ((T, D), (E, D, 2 * F), (E, F, D))]
    weight_N = torch.zeros(0, device=DEV, requires_grad=True)
    y = ops.expert_mlp(*leaves, counts_E, slot_N, K, weight_N, "swiglu", backend="triton")
    assert y.shape == (T, D) and y.abs().sum() == 0
    for g in torch.autograd.grad(y.sum(), leaves):
        assert g.abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_mm_triton_backend(dtype):
    """The public grouped_mm keeps its semantics on the new backend, stride-0 gradient included."""
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 7], device=DEV)
    x = rand(16, 20, dtype=dtype).requires_grad_()
    w = rand(6, 20, 24, dtype=dtype, scale=0.3).requires_grad_()
    y = ops.grouped_mm(x, w, counts, "triton")
    torch.testing.assert_close(y.double(), ops.grouped_mm_reference(x.double(), w.double(), counts), **TOL[dtype])
    y.sum().backward()  # expanded (stride-0) incoming gradient, read in place by the kernels
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ops.grouped_mm_reference(x64, w64, counts).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL[dtype])
    torch.testing.assert_close(w.grad.double(), w64.grad, **TOL[dtype])
    assert w.grad[1].abs().sum() == 0


def test_auto_backend_choice():
    """CPU: torch._grouped_mm, except the fused MLP on large expert groups and what torch
    cannot run. CUDA: torch._grouped_mm in bf16 (the kernels are opt-in, see ops/grouped_mm.py)."""
    x, w = torch.randn(4, 16), torch.randn(2, 16, 16)
    assert ops._resolve("auto", x, w) == "torch"
    rows = 2 * ops.CPU_LOOP_MIN_ELEMS_PER_EXPERT // (16 + 16)  # 2 experts, D + H = 32
    assert ops._resolve("auto", x, w, mlp_rows=rows - 1) == "torch"
    assert ops._resolve("auto", x, w, mlp_rows=rows) == "loop"
    assert ops._resolve("auto", x.double(), w.double()) == "loop"  # no float64 grouped_mm
    assert ops._resolve("auto", torch.randn(4, 6), torch.randn(2, 6, 5)) == "loop"  # 24-byte rows
    if not INTERPRET:
        assert ops._resolve("auto", x.cuda().bfloat16(), w.cuda().bfloat16()) == "torch"
        assert ops._resolve("auto", x.cuda(), w.cuda()) == "loop"


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and AOT dispatch of the three custom ops."""
    T, K, E, D, F = 9, 2, 3, 16, 24
    slot_N, counts_E = routing(T, K, E, seed=5)
    token_N, N = slot_N // K, len(slot_N)
    offs_E1, sched_2B = torch.ops.moe_dist.block_schedule(counts_E, N, 16)
    x = rand(T, 2 * D, dtype=torch.float32)
    w = rand(E, D, F, dtype=torch.float32)
    scale_N = torch.rand(N, device=DEV)
    dy = rand(T, F, dtype=torch.float32)
    torch.library.opcheck(torch.ops.moe_dist.block_schedule.default, (counts_E, N, 16))
    torch.library.opcheck(
        torch.ops.moe_dist.grouped_gemm.default,
        (x, w, offs_E1, sched_2B, token_N, slot_N, scale_N, None, None, T * K, "swiglu", "none", False, 16),
    )
    torch.library.opcheck(
        torch.ops.moe_dist.grouped_gemm.default,
        (dy, w.transpose(1, 2), offs_E1, sched_2B, token_N, slot_N, scale_N, x, token_N, T * K, "none", "swiglu", True, 16),
    )
    torch.library.opcheck(torch.ops.moe_dist.grouped_wgrad.default, (x, dy, offs_E1, token_N, token_N, scale_N, "swiglu"))


def test_expert_mlp_traces_under_torch_compile():
    """fullgraph: dynamo + AOTAutograd see only custom ops with fake impls, no graph breaks."""
    torch.manual_seed(0)
    T, K, E, D, F = 10, 2, 4, 16, 16
    slot_N, counts_E = routing(T, K, E, seed=6, drop=0.1)
    weight_N = torch.rand(len(slot_N), device=DEV)
    params = [rand(T, D, dtype=torch.float32)] + [rand(*s, dtype=torch.float32, scale=0.25) for s in ((E, D, 2 * F), (E, F, D))]

    def f(x, w_in, w_out):
        return ops.expert_mlp(x, w_in, w_out, counts_E, slot_N, K, weight_N, "swiglu", backend="triton")

    torch._dynamo.reset()
    outs = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        leaves = [p.clone().requires_grad_() for p in params]
        y = fn(*leaves)
        outs.append([y, *torch.autograd.grad(y.square().sum(), leaves)])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fake_tensors_and_dispatch_modes_reach_the_custom_ops():
    """Eager calls skip the custom ops' dispatch (host time), but tracing tools must still
    see the ops and their fake impls: shapes out, no kernel launched on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    T, K, E, D, F = 9, 2, 3, 16, 24
    slot_N, counts_E = routing(T, K, E, seed=5)
    real = [rand(T, D, dtype=torch.float32), rand(E, D, 2 * F, dtype=torch.float32), rand(E, F, D, dtype=torch.float32)]

    def f(x, w_in, w_out, slot, counts):
        return ops.expert_mlp(x, w_in, w_out, counts, slot, K, None, "swiglu", backend="triton")

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (*real, slot_N, counts_E)]
        assert f(*fake).shape == (T, D)
    graph = make_fx(f)(*real, slot_N, counts_E)
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert {"moe_dist.block_schedule.default", "moe_dist.grouped_gemm.default"} <= targets, targets


def test_double_backward_through_the_kernels_is_refused():
    """The kernels' backward has no derivative of its own: create_graph must fail loudly,
    not return second-order gradients with the grouped matmul's term missing."""
    slot_N, counts_E = routing(8, 1, 3, seed=2)
    x = rand(8, 16, dtype=torch.float32).requires_grad_()
    w = rand(3, 16, 8, dtype=torch.float32).requires_grad_()
    y = ops.grouped_mm(x.index_select(0, slot_N), w, counts_E, "triton")
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.sum().backward()


def test_expert_mlp_under_autocast_matches_loop_backend():
    """Training runs the experts under autocast. CUDA autocast computes `sum` in fp32, so the
    K-slot combine once returned fp32, and autograd handed the backward an fp32 gradient
    against bf16 weights (the quickstart with moe.grouped_mm=triton failed on an H100). Output
    dtype and every gradient must match the loop backend under autocast on this device."""
    torch.manual_seed(0)
    T, K, E, D, F = (512, 2, 8, 128, 64) if DEV == "cuda" else (48, 2, 4, 32, 16)
    slot_N, counts_E = routing(T, K, E, seed=9)
    leaves = [rand(T, D, dtype=torch.float32)]
    leaves += [rand(*s, dtype=torch.float32, scale=0.1) for s in ((E, D, 2 * F), (E, F, D))]
    leaves.append(torch.rand(len(slot_N), device=DEV))
    got = {}
    for backend in ("triton", "loop"):
        ls = [t.detach().clone().requires_grad_() for t in leaves]
        with torch.autocast(DEV, dtype=torch.bfloat16):
            x = ls[0].to(torch.bfloat16)  # what GroupedExperts' autocast_input does
            y = ops.expert_mlp(x, ls[1], ls[2], counts_E, slot_N, K, ls[3], "swiglu", backend)
            loss = y.float().square().sum()
        loss.backward()
        got[backend] = [y] + [t.grad for t in ls]
    assert got["triton"][0].dtype == torch.bfloat16
    for a, b in zip(got["triton"], got["loop"]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2 * b.float().abs().max().item())


# ---- 3. GPU: bf16 and realistic shapes on the compiled kernels ----------------------------


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("act", ["swiglu", "relu"])
def test_gpu_expert_mlp_realistic(dtype, act):
    torch.manual_seed(0)
    T, K, E, D, F = 2048, 4, 37, 256, 96  # not block multiples, uneven experts
    slot_N, counts_E = routing(T, K, E, seed=7, drop=0.05, empty=(3,))
    x = rand(T, D, dtype=dtype).requires_grad_()
    w_in = rand(E, D, F * kgg.act_width(act), dtype=dtype, scale=D**-0.5).requires_grad_()
    w_out = rand(E, F, D, dtype=dtype, scale=F**-0.5).requires_grad_()
    weight_N = torch.rand(len(slot_N), device=DEV, requires_grad=True)
    leaves = [x, w_in, w_out, weight_N]
    y = ops.expert_mlp(x, w_in, w_out, counts_E, slot_N, K, weight_N, act, "triton")  # auto picks torch/loop
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = ops.expert_mlp_reference(*ref_leaves[:3], counts_E, slot_N, K, ref_leaves[3], act)
    dy = rand(T, D, dtype=dtype)
    got = [y, *torch.autograd.grad(y, leaves, dy)]
    want = [y_ref, *torch.autograd.grad(y_ref, ref_leaves, dy.double())]
    for g, r in zip(got, want):
        # relative to the tensor's scale: bf16 keeps ~3 significant digits
        err = (g.double() - r).abs().max() / r.abs().max().clamp_min(1e-6)
        assert err < {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}[dtype], err


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_grouped_mm_matches_torch_grouped_mm(dtype):
    torch.manual_seed(0)
    counts = torch.tensor([0, 700, 1, 129, 0, 2000, 64, 3], device=DEV)
    x = rand(int(counts.sum()), 512, dtype=dtype).requires_grad_()
    w = rand(8, 512, 384, dtype=dtype, scale=512**-0.5).requires_grad_()
    y = ops.grouped_mm(x, w, counts, "triton")
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = ops.grouped_mm(x2, w2, counts, "torch" if dtype == torch.bfloat16 else "loop")
    dy = torch.randn_like(y)
    y.backward(dy)
    y2.backward(dy)
    for a, b in ((y, y2), (x.grad, x2.grad), (w.grad, w2.grad)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item())


@gpu
def test_gpu_expert_mlp_compiles_with_inductor():
    torch.manual_seed(0)
    T, K, E, D, F = 512, 2, 8, 128, 64
    slot_N, counts_E = routing(T, K, E, seed=8)
    weight_N = torch.rand(len(slot_N), device=DEV)
    params = [rand(T, D, dtype=torch.bfloat16)] + [rand(*s, dtype=torch.bfloat16, scale=0.1) for s in ((E, D, 2 * F), (E, F, D))]

    def f(x, w_in, w_out):
        return ops.expert_mlp(x, w_in, w_out, counts_E, slot_N, K, weight_N, "swiglu", "triton").float().square().sum()

    eager = f(*params)
    compiled = torch.compile(f, fullgraph=True)(*params)
    torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-2)

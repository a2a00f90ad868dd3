"""The CPU `loop` backend's hand-written autograd (moe_dist/ops/loop.py) against the plain
autograd references, outputs and every gradient, on awkward shapes: experts with no rows,
one row, one expert, top-k > 1 with dropped slots, every slot dropped."""

import pytest
import torch

from moe_dist.ops import grouped_mm as ops
from moe_dist.ops.loop import LoopGroupedMM


def routed(T, K, E, keep_every=1, seed=0, empty=(1,)):
    """Kept slots of a random top-K routing sorted by expert (as sort_by_expert does), with
    the experts in `empty` given no rows, every keep_every-th slot kept."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    expert_P = allowed[torch.randint(len(allowed), (T * K,), generator=g)]
    slot_P = torch.arange(T * K)[::keep_every]
    order = torch.sort(expert_P[slot_P], stable=True).indices
    return slot_P[order], torch.bincount(expert_P[slot_P], minlength=E)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def check_grads(ours, ref, tol):
    for a, b in zip(ours, ref):
        if b.grad is None:
            assert a.grad is None
        else:
            torch.testing.assert_close(a.grad.to(b.grad.dtype), b.grad, **tol)


F64 = dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["relu", "gelu", "swiglu"])
@pytest.mark.parametrize("T, K, E, keep_every", [(7, 2, 5, 1), (9, 3, 4, 2), (1, 1, 1, 1), (13, 1, 6, 1)])
def test_expert_mlp_loop_matches_reference(act, T, K, E, keep_every):
    D, F = 6, 5
    H = 2 * F if act == "swiglu" else F
    slot_N, counts_E = routed(T, K, E, keep_every, empty=(1,) if E > 2 else ())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    w_in, w_out = torch.randn(E, D, H, generator=g, dtype=torch.float64), torch.randn(E, F, D, generator=g, dtype=torch.float64)
    weight = torch.rand(slot_N.shape[0], generator=g, dtype=torch.float64)
    ours, ref = leaves(x, w_in, w_out, weight), leaves(x, w_in, w_out, weight)
    y = ops.expert_mlp(*ours[:3], counts_E, slot_N, K, ours[3], act, backend="loop")
    y_ref = ops.expert_mlp_reference(*ref[:3], counts_E, slot_N, K, ref[3], act)
    torch.testing.assert_close(y, y_ref, **F64)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    check_grads(ours, ref, F64)
    if E > 2:
        assert ours[1].grad[1].abs().sum() == 0 and ours[2].grad[1].abs().sum() == 0  # the expert with no rows


def test_expert_mlp_loop_every_slot_dropped():
    E, T, K, D, F = 3, 4, 2, 6, 5
    x, w_in, w_out = leaves(torch.randn(T, D), torch.randn(E, D, F), torch.randn(E, F, D))
    weight = torch.zeros(0, requires_grad=True)
    y = ops.expert_mlp(x, w_in, w_out, torch.zeros(E, dtype=torch.long), torch.zeros(0, dtype=torch.long), K, weight,
                       "relu", backend="loop")  # fmt: skip
    assert y.shape == (T, D) and y.abs().sum() == 0
    y.sum().backward()
    for p in (x, w_in, w_out):
        assert p.grad.abs().sum() == 0
    assert weight.grad.shape == (0,)


def test_expert_mlp_loop_without_weights_and_partial_grads():
    """weight_N None (a plain sum of the k experts); weights that need no gradient; a frozen
    input (only the needed gradients are computed, the others stay None)."""
    slot_N, counts_E = routed(8, 2, 4)
    x = torch.randn(8, 6, dtype=torch.float64)
    w_in, w_out = torch.randn(4, 6, 5, dtype=torch.float64), torch.randn(4, 5, 6, dtype=torch.float64)
    ours, ref = leaves(w_in, w_out), leaves(w_in, w_out)
    y = ops.expert_mlp(x, *ours, counts_E, slot_N, 2, None, "gelu", backend="loop")
    y_ref = ops.expert_mlp_reference(x, *ref, counts_E, slot_N, 2, None, "gelu")
    torch.testing.assert_close(y, y_ref, **F64)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    check_grads(ours, ref, F64)
    # only the input needs a gradient
    xs = leaves(x, x)
    y = ops.expert_mlp(xs[0], w_in, w_out, counts_E, slot_N, 2, None, "relu", backend="loop")
    ops.expert_mlp_reference(xs[1], w_in, w_out, counts_E, slot_N, 2, None, "relu").sum().backward()
    y.sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, **F64)


@pytest.mark.parametrize("act", ["relu", "swiglu"])
def test_grouped_mlp_loop_matches_reference(act):
    """Rows already sorted by expert (an expert-parallel rank's received rows)."""
    counts = torch.tensor([3, 0, 5, 1])
    H = 10 if act == "swiglu" else 5
    x, w_in, w_out = torch.randn(9, 6, dtype=torch.float64), torch.randn(4, 6, H, dtype=torch.float64), torch.randn(4, 5, 7, dtype=torch.float64)
    ours, ref = leaves(x, w_in, w_out), leaves(x, w_in, w_out)
    y = ops.grouped_mlp(*ours, counts, act, backend="loop")
    h = ops.grouped_mm_reference(ref[0], ref[1], counts)
    y_ref = ops.grouped_mm_reference(ops.activation(h, act), ref[2], counts)
    torch.testing.assert_close(y, y_ref, **F64)
    dy = torch.randn_like(y_ref)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    check_grads(ours, ref, F64)


def test_loop_grouped_mm_matches_reference_and_needs_only_what_is_asked():
    counts = torch.tensor([0, 4, 1, 0, 6])
    x, w = torch.randn(11, 7, dtype=torch.float64), torch.randn(5, 7, 3, dtype=torch.float64)
    ours, ref = leaves(x, w), leaves(x, w)
    y = LoopGroupedMM.apply(*ours, counts)
    y_ref = ops.grouped_mm_reference(*ref, counts)
    torch.testing.assert_close(y, y_ref, **F64)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    check_grads(ours, ref, F64)
    w_ours, w_ref = leaves(w, w)  # x needs no gradient: only dw is computed
    (LoopGroupedMM.apply(x, w_ours, counts) * dy).sum().backward()
    (ops.grouped_mm_reference(x, w_ref, counts) * dy).sum().backward()
    torch.testing.assert_close(w_ours.grad, w_ref.grad, **F64)


def test_expert_mlp_loop_float32_and_bfloat16_against_float64():
    slot_N, counts_E = routed(64, 2, 8, seed=3)
    g = torch.Generator().manual_seed(2)
    x, w_in, w_out = torch.randn(64, 32, generator=g), torch.randn(8, 32, 48, generator=g) / 6, torch.randn(8, 24, 32, generator=g) / 5
    weight = torch.rand(slot_N.shape[0], generator=g)
    ref = leaves(x.double(), w_in.double(), w_out.double(), weight.double())
    y_ref = ops.expert_mlp_reference(*ref[:3], counts_E, slot_N, 2, ref[3], "swiglu")
    y_ref.square().sum().backward()
    for dtype, tol in ((torch.float32, dict(rtol=1e-5, atol=1e-5)), (torch.bfloat16, dict(rtol=5e-2, atol=5e-2))):
        ours = leaves(x.to(dtype), w_in.to(dtype), w_out.to(dtype), weight)  # routing weights stay float32
        y = ops.expert_mlp(*ours[:3], counts_E, slot_N, 2, ours[3], "swiglu", backend="loop")
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), y_ref, **tol)
        y.float().square().sum().backward()
        for a, b in zip(ours, ref):
            scale = b.grad.abs().max()
            torch.testing.assert_close(a.grad.double() / scale, b.grad / scale, **tol)
        assert ours[3].grad.dtype == torch.float32


def test_loop_sums_a_tokens_bf16_rows_in_float32_like_the_torch_path():
    """The loop adds one expert's rows per index_add: into a bf16 output, a token's k rows
    rounded after every expert (relative error 5.9e-3 against float64 at k = 8, the torch
    path's 4.8e-3). Summed in float32 and rounded once, output and input gradient are
    within 1% of the torch path's error."""
    T, K, E = 512, 8, 8
    g = torch.Generator().manual_seed(0)
    x, w_in, w_out = torch.randn(T, 64, generator=g), torch.randn(E, 64, 128, generator=g) / 8, torch.randn(E, 128, 64, generator=g) / 11
    slot_N, counts_E = routed(T, K, E, empty=())
    weight = torch.rand(T * K, generator=g).index_select(0, slot_N)
    dy = torch.randn(T, 64, generator=g)
    ref = leaves(x.double())[0]
    y_ref = ops.expert_mlp_reference(ref, w_in.double(), w_out.double(), counts_E, slot_N, K, weight.double(), "relu")
    (y_ref * dy.double()).sum().backward()
    err = {}
    for backend in ("loop", "torch"):
        xb = leaves(x.bfloat16())[0]
        y = ops.expert_mlp(xb, w_in.bfloat16(), w_out.bfloat16(), counts_E, slot_N, K, weight, "relu", backend=backend)
        (y.float() * dy).sum().backward()
        err[backend] = [((a.double() - b).norm() / b.norm()).item() for a, b in ((y, y_ref), (xb.grad, ref.grad))]
    assert all(lo <= 1.01 * to for lo, to in zip(err["loop"], err["torch"])), err


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_grouped_mlp_reads_and_writes_through_row_order(backend):
    """Rows as an expert-parallel rank receives them (grouped by source rank): the experts
    read sorted row n from x[order[n]] and return outputs in x's order."""
    counts = torch.tensor([4, 0, 3, 2])
    order = torch.randperm(9, generator=torch.Generator().manual_seed(5))
    dtype = torch.float64 if backend == "loop" else torch.float32  # torch._grouped_mm: no float64
    x, w_in, w_out = torch.randn(9, 8, dtype=dtype), torch.randn(4, 8, 8, dtype=dtype), torch.randn(4, 8, 8, dtype=dtype)
    ours, ref = leaves(x, w_in, w_out), leaves(x, w_in, w_out)
    y = ops.grouped_mlp(*ours, counts, "relu", backend=backend, row_order_N=order)
    h = ops.grouped_mm_reference(ref[0][order], ref[1], counts)
    y_sorted = ops.grouped_mm_reference(torch.relu(h), ref[2], counts)
    y_ref = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)
    tol = F64 if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, **tol)
    dy = torch.randn_like(y_ref)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    check_grads(ours, ref, tol)

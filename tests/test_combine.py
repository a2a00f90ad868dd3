"""ops/combine.py: routed rows summed back into their tokens. Exact against float64, the
same bits whatever order the rows come in (the order CUDA's atomics would vary), and one
rounding in bf16."""

import pytest
import torch

from moe_dist.ops.combine import combine_slots


def _case(T, K, F, dtype, dropped, weighted, seed=0):
    """Rows sorted in a random order (as by expert), each in a distinct slot of T * K;
    dropped: a third of the slots get no row."""
    g = torch.Generator().manual_seed(seed)
    slot_N = torch.randperm(T * K, generator=g)
    if dropped:
        slot_N = slot_N[: 2 * T * K // 3]
    y_NF = torch.randn(slot_N.shape[0], F, generator=g).to(dtype)
    w_M = torch.rand(T * K, generator=g) if weighted else None
    return y_NF, slot_N, w_M


def _reference(y_NF, slot_N, T, K, w_M):
    """The textbook combine in float64: weight each row, index_add it into its token."""
    y = y_NF.double()
    if w_M is not None:
        y = y * w_M.double().index_select(0, slot_N).unsqueeze(1)
    return y.new_zeros(T, y.shape[1]).index_add(0, torch.div(slot_N, K, rounding_mode="floor"), y)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dropped", [False, True])
@pytest.mark.parametrize("K", [1, 2, 3, 16])
def test_combine_matches_float64_reference_with_gradients(K, dropped, weighted):
    T, F = 37, 24
    y_NF, slot_N, w_M = _case(T, K, F, torch.float32, dropped, weighted)
    leaves = [y_NF.requires_grad_()] + ([w_M.requires_grad_()] if weighted else [])
    refs = [t.detach().double().requires_grad_() for t in leaves]
    out = combine_slots(y_NF, slot_N, T * K, K, w_M)
    ref = _reference(refs[0], slot_N, T, K, refs[1] if weighted else None)
    assert out.dtype == torch.float32 and out.shape == (T, F)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    dout = torch.randn(T, F, dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, dout.float())
    want = torch.autograd.grad(ref, refs, dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-6)
    if weighted and dropped:  # a slot with no row has no say in the output
        empty = torch.ones(T * K, dtype=torch.bool).index_fill(0, slot_N, False)
        assert empty.any() and torch.equal(got[1][empty], torch.zeros(int(empty.sum())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,weighted", [(2, False), (2, True), (4, False), (16, False), (16, True)])
def test_row_order_changes_no_bit(K, weighted, dtype):
    """Rows in four other orders give the same output to the last bit: what an atomic
    add cannot promise a GPU, whose order changes from run to run."""
    T, F = 64, 32
    y_NF, slot_N, w_M = _case(T, K, F, dtype, dropped=False, weighted=weighted)
    first = combine_slots(y_NF, slot_N, T * K, K, w_M)
    for seed in range(1, 5):
        p = torch.randperm(slot_N.shape[0], generator=torch.Generator().manual_seed(seed))
        assert torch.equal(combine_slots(y_NF[p], slot_N[p], T * K, K, w_M), first)


def test_index_add_changes_bits_with_row_order():
    """Why combine_slots exists: index_add sums a token's 16 rows in the rows' order, so
    another order gives other last bits (CPU adds serially: this is the order CUDA's
    atomics would shuffle)."""
    T, K, F = 64, 16, 32
    y_NF, slot_N, _ = _case(T, K, F, torch.float32, dropped=False, weighted=False)
    token_N = torch.div(slot_N, K, rounding_mode="floor")
    first = y_NF.new_zeros(T, F).index_add(0, token_N, y_NF)
    p = torch.randperm(slot_N.shape[0], generator=torch.Generator().manual_seed(1))
    assert not torch.equal(y_NF.new_zeros(T, F).index_add(0, token_N[p], y_NF[p]), first)


@pytest.mark.parametrize("K", [2, 3, 16])
def test_bf16_rows_are_summed_in_fp32_and_rounded_once(K):
    """A token's K bf16 rows: their fp32 sum, rounded to bf16 once (the two-slot index_add
    path included: 0 + a + b rounds once in any order)."""
    T, F = 512, 64
    y_NF, slot_N, _ = _case(T, K, F, torch.bfloat16, dropped=False, weighted=False)
    slots_TKF = y_NF.new_zeros(T * K, F).index_copy(0, slot_N, y_NF).view(T, K, F)
    out = combine_slots(y_NF, slot_N, T * K, K)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, slots_TKF.float().sum(1).bfloat16())
    # Against float64, within the rounding of the float64 sum itself.
    ref = slots_TKF.double().sum(1)
    err = lambda a: ((a.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(out) <= 1.01 * err(ref.bfloat16())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CPU's index_add adds in one order anyway")
@pytest.mark.parametrize("K", [2, 16])
def test_torch_path_expert_mlp_repeats_bit_for_bit_on_cuda(K):
    """The routed MLP on the GPU's default path (torch._grouped_mm in bf16), MoEUT's k = 16
    included: five calls, one output to the last bit."""
    from moe_dist.ops.grouped_mm import expert_mlp

    torch.manual_seed(0)
    T, D, F, E = 4096, 256, 128, 32
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    w_in, w_out = (torch.randn(E, D, F, device="cuda") / 16).bfloat16(), (torch.randn(E, F, D, device="cuda") / 11).bfloat16()
    expert_TK = torch.rand(T, E, device="cuda").topk(K, dim=1).indices
    slot_N = expert_TK.reshape(-1).argsort(stable=True)
    counts_E = torch.bincount(expert_TK.reshape(-1), minlength=E)
    w_N = torch.rand(T * K, device="cuda").index_select(0, slot_N)
    outs = [expert_mlp(x, w_in, w_out, counts_E, slot_N, K, w_N, "relu", backend="torch") for _ in range(5)]
    assert outs[0].dtype == torch.bfloat16
    assert all(torch.equal(outs[0], o) for o in outs[1:])

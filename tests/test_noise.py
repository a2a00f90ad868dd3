"""Routing noise (moe/noise.py): uniform draws as a function of (key, global row, column),
so expert and cross-slice dropout mask the same rows alike however the batch is split.
The trainer-level check (ep=2 on two processes against one process, losses equal with the
dropouts on) is in tests/test_expert_parallel.py."""

import pytest
import torch

from moe_dist.config import MoEConfig
from moe_dist.moe.layer import MoEFFN
from moe_dist.moe.noise import _mix32, dropout_mask, noise_for, routing_uniform, step_keys
from moe_dist.moe.slice_layer import SliceMoEFFN

CPU = torch.device("cpu")


def test_uniform_draws_are_uniform_and_independent():
    keys = step_keys(7, 0, 2)
    u = routing_uniform(torch.tensor([keys[0], 0]), 100_000, 16)
    assert u.dtype == torch.float32 and u.shape == (100_000, 16)
    assert 0.0 <= u.min() and u.max() < 1.0
    assert u.mean().item() == pytest.approx(0.5, abs=2e-3)
    buckets = torch.histc(u, bins=32, min=0, max=1) / (u.numel() / 32)
    assert buckets.min() > 0.97 and buckets.max() < 1.03
    # neighbouring rows, neighbouring columns, another depth's key: uncorrelated
    other = routing_uniform(torch.tensor([keys[1], 0]), 100_000, 16)
    # expert dropout and slice dropout (salts) of one row draw apart
    salted = routing_uniform(torch.tensor([keys[0], 0]), 100_000, 16, salt=1)
    for a, b in ((u[:-1, 0], u[1:, 0]), (u[:, 0], u[:, 1]), (u.flatten(), other.flatten()),
                 (u.flatten(), salted.flatten())):
        # independent samples: the correlation's standard error is 1 / sqrt(n); allow 5 of them
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / a.numel() ** 0.5


def test_the_hash_stays_in_32_bits():
    """int64 products of a 32-bit value and a multiplier below 2^31 never overflow."""
    x = torch.tensor([0, 1, 2**31, 2**32 - 1], dtype=torch.int64)
    h = _mix32(x)
    assert (h >= 0).all() and (h < 2**32).all() and h.unique().numel() == 4
    assert max(0x21F0AAAD, 0x735A2D97) < 2**31


def test_a_row_draws_the_same_however_the_rows_are_split():
    key = step_keys(0, 5, 1)[0]
    whole = routing_uniform(torch.tensor([key, 0]), 60, 8)
    parts = [routing_uniform(torch.tensor([key, r0]), n, 8) for r0, n in ((0, 25), (25, 5), (30, 30))]
    assert torch.equal(torch.cat(parts), whole)
    # SliceMoE: token t's S pairs are rows t*S .. t*S+S-1; row0 counts tokens.
    pairs = routing_uniform(torch.tensor([key, 0]), 60 * 4, 3, rows_per_token=4)
    tail = routing_uniform(torch.tensor([key, 40]), 20 * 4, 3, rows_per_token=4)
    assert torch.equal(pairs[160:], tail)


def test_dropout_mask_rate_and_its_torch_rand_fallback():
    like = torch.zeros(20_000, 8, dtype=torch.float64)
    noise_2 = noise_for(step_keys(1, 2, 1), 0, CPU)[0]
    mask = dropout_mask(noise_2, like, 0.2)
    assert mask.dtype == torch.bool and mask.float().mean().item() == pytest.approx(0.2, abs=5e-3)
    assert torch.equal(mask, dropout_mask(noise_2, like, 0.2))  # a function, not a stream
    torch.manual_seed(0)
    fallback = dropout_mask(None, like, 0.2)
    torch.manual_seed(0)
    assert torch.equal(fallback, torch.rand_like(like) < 0.2)


def test_step_keys_differ_by_step_and_depth_and_repeat_by_seed():
    assert step_keys(0, 3, 4) == step_keys(0, 3, 4)
    keys = step_keys(0, 3, 4) + step_keys(0, 4, 4) + step_keys(1, 3, 4)
    assert len(set(keys)) == 12 and all(0 <= k < 2**32 for k in keys)
    assert noise_for([5, 6], 17, CPU).tolist() == [[5, 17], [6, 17]]


def _split_equals_whole(layer, D, T=24):
    """The layer on T tokens at row0 0 against the same tokens as two micro-batches at their
    own row0: equal outputs mean equal masks (dropless, so tokens do not interact)."""
    torch.manual_seed(0)
    x = torch.randn(1, T, D, dtype=torch.float64)
    noise_for_rows = lambda row0: noise_for(step_keys(0, 1, 1), row0, CPU)[0]  # noqa: E731
    y, aux = layer(x, noise_2=noise_for_rows(0))
    y1, a1 = layer(x[:, :10], noise_2=noise_for_rows(0))
    y2, a2 = layer(x[:, 10:], noise_2=noise_for_rows(10))
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, rtol=0, atol=1e-12)
    return y, aux, (a1, a2)


def test_expert_dropout_masks_rows_alike_in_any_split():
    cfg = MoEConfig(num_experts=8, top_k=2, d_expert=4, expert_dropout=0.4, capacity_factor=0.0)
    layer = MoEFFN(16, cfg, "relu", score="sigmoid").double().train()
    layer.reset_parameters(0.5, 0.5)
    y, _, _ = _split_equals_whole(layer, 16)
    layer.eval()  # no dropout: other outputs, so the masks above did something
    torch.manual_seed(0)
    assert not torch.allclose(layer(torch.randn(1, 24, 16, dtype=torch.float64))[0], y)


def test_slice_and_expert_dropout_mask_pairs_alike_in_any_split():
    cfg = MoEConfig(num_experts=8, top_k=2, d_expert=4, num_slices=4, slice_router_hidden=8, expert_dropout=0.2,
                    slice_dropout=0.5, capacity_factor=0.0)
    layer = SliceMoEFFN(16, cfg, "relu").double().train()
    layer.reset_parameters(0.5, 0.5)
    _, aux, (a1, a2) = _split_equals_whole(layer, 16)
    assert aux.skipped.item() == a1.skipped.item() + a2.skipped.item() > 0  # slice dropout acted

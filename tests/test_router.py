"""Router, capacity and drop math against hand-computed cases."""

import math

import torch

from moe_dist.moe.router import (
    capacity_mask,
    expert_capacity,
    position_in_expert,
    route_topk,
    router_z_loss,
    switch_load_balancing_loss,
    topk_softmax,
)


def test_capacity_formula():
    assert expert_capacity(10, 2, 4, 1.25) == 7  # ceil(6.25)
    assert expert_capacity(8, 1, 4, 1.0) == 2
    assert expert_capacity(100, 1, 2, 1.1) == 55  # 55.00000000000001 in floating point
    assert expert_capacity(50, 1, 3, 0.9) == 15
    assert expert_capacity(7, 1, 4, 2.0) == 4  # ceil(3.5)
    assert expert_capacity(8, 1, 4, None) is None
    assert expert_capacity(8, 1, 4, 0) is None


def test_ties_go_to_lower_expert():
    logits = torch.zeros(3, 4)
    e, w, p = topk_softmax(logits, 2)
    assert e.tolist() == [[0, 1]] * 3
    assert torch.equal(w, torch.full((3, 2), 0.5))  # renormalised over the 2 selected
    e1, w1, _ = topk_softmax(logits, 1)
    assert e1.tolist() == [[0]] * 3 and torch.equal(w1, torch.full((3, 1), 0.25))  # top-1: raw p
    # A tie between the 2nd and 3rd best: the lower index wins the second slot.
    e, _, _ = topk_softmax(torch.tensor([[0.0, 1.0, 1.0, 2.0]]), 2)
    assert e.tolist() == [[3, 1]]
    # top-1 takes argmax, top-k a stable sort: the same rule on many ties (vectorised CPU
    # argmax on a long tensor included).
    logits = torch.randint(0, 3, (5000, 16)).float()
    e1, _, _ = topk_softmax(logits, 1)
    first_max = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :1]
    assert torch.equal(e1, first_max) and torch.equal(topk_softmax(logits, 2)[0][:, :1], first_max)


def test_topk_weights_hand_computed():
    logits = torch.tensor([[math.log(1.0), math.log(2.0), math.log(3.0), math.log(4.0)]])
    e, w, p = topk_softmax(logits, 2)
    assert e.tolist() == [[3, 2]]
    torch.testing.assert_close(p, torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    torch.testing.assert_close(w, torch.tensor([[4 / 7, 3 / 7]]))
    _, w1, _ = topk_softmax(logits, 1)
    torch.testing.assert_close(w1, torch.tensor([[0.4]]))


def test_topk_weights_survive_underflowed_probabilities():
    """Expert 0 is excluded (expert dropout) but holds all the softmax mass: the selected
    probabilities underflow to 0 in float32, and p / sum(p) would be 0/0. The weights are
    the softmax of the selected logits, which stays exact."""
    logits = torch.tensor([[120.0, 0.0, 0.5, -50.0]])
    e, w, p = route_topk(logits, 2, exclude_TE=torch.tensor([[True, False, False, False]]))
    assert p[0, 1:3].tolist() == [0.0, 0.0] and e.tolist() == [[1, 2]]  # a tie at 0: lower index first
    torch.testing.assert_close(w, torch.softmax(torch.tensor([[0.0, 0.5]]), dim=-1))


def test_every_token_to_one_expert():
    T, E = 8, 4
    logits = torch.zeros(T, E)
    logits[:, 2] = 5.0
    e, _, _ = topk_softmax(logits, 1)
    cap = expert_capacity(T, 1, E, 1.0)
    assert cap == 2
    keep = capacity_mask(e, E, cap)
    assert keep.squeeze(1).tolist() == [True, True] + [False] * 6  # position priority
    assert torch.bincount(e.reshape(-1), minlength=E).tolist() == [0, 0, 8, 0]
    assert (~keep).sum().item() == 6


def test_capacity_exactly_full_drops_nothing():
    T, E = 8, 4
    e = torch.tensor([[0], [1], [2], [3], [3], [2], [1], [0]])
    keep = capacity_mask(e, E, expert_capacity(T, 1, E, 1.0))
    assert keep.all()
    # One more token to expert 0 than capacity: exactly the last one is dropped.
    e = torch.tensor([[0], [1], [0], [3], [0], [2], [1], [3]])
    keep = capacity_mask(e, E, 2)
    assert keep.squeeze(1).tolist() == [True, True, True, True, False, True, True, True]


def test_first_choices_beat_earlier_second_choices():
    # T=4, E=4, K=2, cf=1 -> capacity 2. Experts 0 and 1 get two 1st and two 2nd choices each.
    e = torch.tensor([[0, 1], [0, 1], [1, 0], [1, 0]])
    assert expert_capacity(4, 2, 4, 1.0) == 2
    pos = position_in_expert(e, 4)
    assert pos.tolist() == [[0, 2], [1, 3], [0, 2], [1, 3]]
    keep = capacity_mask(e, 4, 2)
    assert keep.tolist() == [[True, False]] * 4  # every 2nd choice dropped, no 1st choice


def test_experts_with_no_tokens_and_dropless():
    e = torch.tensor([[1], [1], [1]])
    assert position_in_expert(e, 5).squeeze(1).tolist() == [0, 1, 2]
    assert capacity_mask(e, 5, None).all()


def test_switch_loss_uniform_equals_one_and_grows_with_imbalance():
    T, E = 8, 4
    logits = torch.zeros(T, E)
    logits[torch.arange(T), torch.arange(T) % E] = 3.0  # each expert favoured by 2 tokens
    e, _, p = topk_softmax(logits, 1)
    assert torch.bincount(e.reshape(-1), minlength=E).tolist() == [2, 2, 2, 2]
    alpha = 0.01
    torch.testing.assert_close(alpha * switch_load_balancing_loss(p, e), torch.tensor(alpha))
    e2, _, p2 = topk_softmax(logits, 2)  # also 1 at uniform for top-2
    torch.testing.assert_close(switch_load_balancing_loss(p2, e2), torch.tensor(1.0))
    # All tokens to expert 0 with p_0 = 0.7: E * 1 * 0.7 = 2.8.
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(T, 1)
    torch.testing.assert_close(
        switch_load_balancing_loss(probs, torch.zeros(T, 1, dtype=torch.long)), torch.tensor(2.8)
    )


def test_lb_loss_gradient_flows_through_probabilities_only():
    """d/dlogits of E * sum_i f_i P_i with the fraction f_i held constant (a count)."""
    torch.manual_seed(0)
    logits = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    e, _, p = topk_softmax(logits, 1)
    switch_load_balancing_loss(p, e).backward()
    ref_logits = logits.detach().clone().requires_grad_()
    f = torch.bincount(e.reshape(-1), minlength=3).double() / 6  # no gradient
    (3 * (f * torch.softmax(ref_logits, -1).mean(0)).sum()).backward()
    assert ref_logits.grad.abs().sum() > 0
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-12, atol=1e-12)


def test_z_loss_hand_computed():
    torch.testing.assert_close(router_z_loss(torch.zeros(5, 4)), torch.tensor(math.log(4.0) ** 2))
    logits = torch.tensor([[0.0, math.log(3.0)]])  # logsumexp = log 4
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(math.log(4.0) ** 2))

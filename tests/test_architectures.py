"""sigma-MoE, SwitchHead, MoEUT, SliceMoE and aux-loss-free balancing against float64
per-token loop references and their degenerate equivalences."""

import math

import pytest
import torch

from moe_dist.config import AttentionConfig, MoEConfig, load_config
from moe_dist.errors import ConfigError
from moe_dist.models.attention import (
    CausalSelfAttention,
    apply_rope,
    apply_rope_reference,
    rope_pair_tables,
    rope_tables,
)
from moe_dist.models.switchhead import SwitchHeadAttention
from moe_dist.models.transformer import LM
from moe_dist.moe.aux import MoEAux, total_aux_loss
from moe_dist.moe.balance import BalanceBias
from moe_dist.moe.layer import MoEFFN
from moe_dist.moe.router import cv_squared, entropy_regularizer, expert_capacity, route_topk, straight_through_load
from moe_dist.moe.slice_layer import SliceMoEFFN, cross_slice_dropout
from moe_dist.ops.activations import activation
from test_moe_layer import reference_moe

F64 = dict(rtol=1e-10, atol=1e-12)


def grads_match(out, ref_out, params, ref_params, inputs=(), ref_inputs=()):
    g = torch.randn_like(ref_out)
    (out.reshape(ref_out.shape) * g).sum().backward()
    (ref_out * g).sum().backward()
    for a, b in list(zip(params, ref_params)) + list(zip(inputs, ref_inputs)):
        torch.testing.assert_close(a.grad, b.grad, **F64)


def clones(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


# ----------------------------------------------------------------------------- sigma-MoE


@pytest.mark.parametrize("k, cf", [(3, None), (2, 0.8)])
def test_sigma_moe_matches_reference(k, cf):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=6, top_k=k, d_expert=8, capacity_factor=cf, grouped_mm="loop")
    layer = MoEFFN(12, cfg, "relu", score="sigmoid").double()
    layer.reset_parameters(0.5, 0.5)
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    params = [layer.router.weight, layer.experts.w_in_EDH, layer.experts.w_out_EFD]
    ref_params, (x_ref,) = clones(params), clones([x])
    y_ref, dropped = reference_moe(x_ref.view(14, 12), *ref_params, "relu", k, cf, score="sigmoid")
    torch.testing.assert_close(y.view(14, 12), y_ref, **F64)
    assert aux.dropped.item() == dropped
    grads_match(y, y_ref, params, ref_params, [x], [x_ref])


def test_sigmoid_weights_are_not_renormalised():
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0]])
    e, w, p = route_topk(logits, 2, "sigmoid")
    assert e.tolist() == [[3, 1]]
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[2.0, 1.0]])))
    torch.testing.assert_close(p, torch.softmax(logits, -1))  # balancing uses the softmax


def test_expert_dropout_excludes_from_selection_only():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    exclude = torch.tensor([[True, False, True, False]])
    e, w, _ = route_topk(logits, 2, "sigmoid", exclude_TE=exclude)
    assert e.tolist() == [[1, 3]]
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[2.0, 0.0]])))
    # In the layer: with dropout 0.5 the selections change in training, never in eval.
    torch.manual_seed(0)
    layer = MoEFFN(8, MoEConfig(num_experts=8, top_k=2, d_expert=4, expert_dropout=0.5), "relu", score="sigmoid")
    layer.reset_parameters(0.5, 0.5)
    x = torch.randn(1, 32, 8)
    layer.eval()
    e_eval = layer.route(x.view(32, 8))[0]
    assert torch.equal(e_eval, layer.route(x.view(32, 8))[0])
    layer.train()
    assert not torch.equal(e_eval, layer.route(x.view(32, 8))[0])


def test_entropy_regulariser_hand_computed_and_pooled_over_repeats():
    E = 4
    torch.testing.assert_close(entropy_regularizer(torch.full((E,), 10.0), 40), torch.tensor(-math.log(E)))
    torch.testing.assert_close(entropy_regularizer(torch.tensor([5.0, 0.0, 0.0, 0.0]), 5), torch.tensor(0.0))
    # Two repeats of one shared router, each all-in on a different expert: pooled, the mean
    # distribution is [0.5, 0.5, 0, 0] (entropy term -log 2), not 0 + 0 per repeat.
    zero = torch.zeros(())
    auxes = [
        MoEAux("ffn", zero, torch.zeros(E), zero, 1, torch.tensor([3.0, 0, 0, 0]), 3, 0.1, block=7),
        MoEAux("ffn", zero, torch.zeros(E), zero, 1, torch.tensor([0, 3.0, 0, 0]), 3, 0.1, block=7),
    ]
    torch.testing.assert_close(total_aux_loss(auxes), torch.tensor(-0.1 * math.log(2)))
    auxes[1].block = 8  # two different routers: each pooled alone
    torch.testing.assert_close(total_aux_loss(auxes), torch.tensor(0.0))
    auxes[0].block = auxes[1].block = -1  # a layer called outside a model: alone
    torch.testing.assert_close(total_aux_loss(auxes), torch.tensor(0.0))
    # entropy_scope=sequence: two sequences, each all-in on its own expert. One batch-level
    # p calls this balanced (-log 2); per sequence each p is collapsed (0).
    seq = MoEAux("ffn", zero, torch.zeros(E), zero, 1, torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0]]), 3, 0.1,
                 num_sequences=torch.tensor(2.0), sum_over_ranks=lambda ts: ts, block=7)
    torch.testing.assert_close(total_aux_loss([seq]), torch.tensor(0.0))


@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_entropy_regulariser_matches_the_moeut_reference(scope):
    """The MoEUT authors' regulariser (scope=sequence): per sequence and head, p = mean
    softmax over the sequence's tokens and every repeat of the shared layer; sum p log p;
    mean over sequences and heads. scope=batch: one p per head over the whole batch and
    every repeat; mean over heads (the heads were summed, a weight H times stronger). From
    the router logits captured by hooks, for the FFN routers and both SwitchHead gates."""
    cfg = moeut_cfg([f"moe.entropy_scope={scope}", f"attention.entropy_scope={scope}",
                     "attention.entropy_loss_weight=0.001"])
    torch.manual_seed(0)
    lm = LM(cfg, 50).double()
    B, S, H, E_att = 3, 8, 2, 3
    logits = {}
    for j, block in enumerate(lm.blocks):
        for name, mod in (("ffn", block.ffn.router), ("src", block.attn.gate_src), ("dst", block.attn.gate_dst)):
            mod.register_forward_hook(lambda m, i, o, key=(j, name): logits.setdefault(key, []).append(o))
    out = lm(torch.randint(0, 50, (B, S)))

    def reference(calls, heads, E, weight):
        probs = torch.stack([torch.softmax(c.view(B, S, heads, E), -1) for c in calls])  # [repeat, B, S, heads, E]
        p = probs.mean((0, 2)) if scope == "sequence" else probs.mean((0, 1, 2))  # [B, heads, E] or [heads, E]
        return weight * (p * p.log()).sum(-1).mean()  # mean over sequences and heads

    expected = sum(
        reference(logits[(j, "ffn")], 1, 6, 0.01) + reference(logits[(j, "src")], H, E_att, 0.001)
        + reference(logits[(j, "dst")], H, E_att, 0.001)
        for j in (0, 1)
    )
    assert all(len(v) == 2 for v in logits.values())  # two repeats of each shared block
    torch.testing.assert_close(out.aux_loss, expected.float())  # the aux loss is float32


# ----------------------------------------------------------------------------- SwitchHead


def reference_switchhead(x_TD, q_w, k_w, gs_w, gd_w, w_v, w_o, H, E, K, Dh, cos, sin):
    """Per-token, per-head loop from the SwitchHead equations (one sequence, causal)."""
    from moe_dist.models.attention import apply_rope_reference

    T = x_TD.shape[0]
    q = apply_rope_reference((x_TD @ q_w.T).view(T, H, Dh).transpose(0, 1).unsqueeze(0), cos, sin)[0]
    k = apply_rope_reference((x_TD @ k_w.T).view(T, H, Dh).transpose(0, 1).unsqueeze(0), cos, sin)[0]
    s_src = torch.sigmoid(x_TD @ gs_w.T).view(T, H, E)
    s_dst = torch.sigmoid(x_TD @ gd_w.T).view(T, H, E)

    def top(scores):
        return sorted(range(E), key=lambda e: (-scores[e].item(), e))[:K]

    y = torch.zeros_like(x_TD)
    for h in range(H):
        v = torch.stack([sum(s_src[t, h, e] * (x_TD[t] @ w_v[h * E + e]) for e in top(s_src[t, h])) for t in range(T)])
        for t in range(T):
            a = torch.softmax((q[h, t] @ k[h, : t + 1].T) / math.sqrt(Dh), dim=-1)
            o = a @ v[: t + 1]
            for e in top(s_dst[t, h]):
                y[t] = y[t] + s_dst[t, h, e] * (o @ w_o[h * E + e])
    return y


def make_switchhead(D=12, H=2, Dh=6, E=3, K=2, S=9, fixed=False):
    torch.manual_seed(0)
    att = SwitchHeadAttention(D, H, Dh, S, True, 10000.0, 0.0, AttentionConfig(num_experts=E, top_k=K), "loop", fixed)
    att = att.double()
    att.reset_parameters(0.4, 0.4)
    return att


def test_switchhead_matches_reference():
    H, E, K, Dh, S, D = 2, 3, 2, 6, 9, 12
    att = make_switchhead(D, H, Dh, E, K, S)
    x = torch.randn(1, S, D, dtype=torch.float64, requires_grad=True)
    y, (a_src, a_dst) = att(x)
    qk = att.qk.qk.weight
    params = [qk, att.gate_src.weight, att.gate_dst.weight, att.experts_v.w_GIO, att.experts_o.w_GIO]
    ref = clones(params)
    (x_ref,) = clones([x])
    cos, sin = rope_tables(S, Dh, 10000.0)  # RoFormer's [S, Dh/2] tables, not the module's
    y_ref = reference_switchhead(x_ref[0], ref[0][: H * Dh], ref[0][H * Dh :], *ref[1:], H, E, K, Dh, cos, sin)
    torch.testing.assert_close(y[0], y_ref, **F64)
    assert a_src.tokens_per_expert.sum().item() == S * H * K and a_src.tokens_per_expert.numel() == H * E
    grads_match(y[0], y_ref, params, ref, [x], [x_ref])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rope_equals_the_pairwise_reference_bit_for_bit(dtype):
    torch.manual_seed(0)
    B, H, S, Dh = 2, 3, 11, 8
    cos, sin = rope_tables(16, Dh, 10000.0)
    x = torch.randn(B, H, S, Dh, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = apply_rope(x, *rope_pair_tables(cos, sin)), apply_rope_reference(x_ref, cos, sin)
    assert y.dtype == dtype and torch.equal(y, y_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert torch.equal(x.grad, x_ref.grad)
    # Position 0 does not turn (cos 1, sin 0); rope computes in float32.
    assert torch.equal(y[:, :, 0], x[:, :, 0].float().to(dtype))


def test_switchhead_one_expert_fixed_gates_is_mha():
    H, Dh, S, D = 3, 4, 7, 12
    att = make_switchhead(D, H, Dh, E=1, K=1, S=S, fixed=True)
    mha = CausalSelfAttention(D, H, Dh, S, True, 10000.0, 0.0).double()
    with torch.no_grad():
        mha.qk.qk.weight.copy_(att.qk.qk.weight)
        for h in range(H):
            mha.v.weight[h * Dh : (h + 1) * Dh].copy_(att.experts_v.w_GIO[h].T)
            mha.out.weight[:, h * Dh : (h + 1) * Dh].copy_(att.experts_o.w_GIO[h].T)
    x = torch.randn(2, S, D, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, _ = att(x)
    y_mha = mha(x2)
    torch.testing.assert_close(y, y_mha, **F64)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_mha * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **F64)
    torch.testing.assert_close(att.qk.qk.weight.grad, mha.qk.qk.weight.grad, **F64)
    for h in range(H):
        torch.testing.assert_close(att.experts_v.w_GIO.grad[h], mha.v.weight.grad[h * Dh : (h + 1) * Dh].T, **F64)


# ----------------------------------------------------------------------------- MoEUT


def moeut_cfg(extra=()):
    return load_config(None, [
        "model.d_model=16", "model.n_layers=4", "model.group_size=2", "model.n_heads=2", "model.head_dim=8",
        "model.norm=peri", "model.attention=switchhead", "model.ffn=sigma_moe", "moe.num_experts=6",
        "moe.top_k=2", "moe.d_expert=4", "moe.capacity_factor=0", "moe.entropy_loss_weight=0.01",
        "moe.lb_loss_weight=0", "moe.z_loss_weight=0", "attention.num_experts=3", "data.seq_len=8", *extra,
    ])


def test_moeut_layer_grouping_shares_parameters_in_order():
    cfg = moeut_cfg()
    torch.manual_seed(0)
    lm = LM(cfg, 50)
    assert len(lm.blocks) == 2 and lm.layer_order == [0, 1, 0, 1]  # A B A B
    calls = []
    for i, block in enumerate(lm.blocks):
        block.register_forward_hook(lambda m, inp, out, i=i: calls.append(i))
    out = lm(torch.randint(0, 50, (2, 8)))
    assert calls == [0, 1, 0, 1]
    ffn = [a for a in out.moe if a.name == "ffn"]
    assert [a.layer for a in ffn] == [0, 1, 2, 3]
    assert ffn[0].block == ffn[2].block != ffn[1].block
    # Entropy pooled over both repeats of each distinct layer, 2 groups (plus zero LB/z terms).
    expected = sum(
        0.01 * entropy_regularizer(ffn[j].probs_sum + ffn[j + 2].probs_sum, ffn[j].num_rows * 2) for j in (0, 1)
    )
    torch.testing.assert_close(out.aux_loss, expected)
    # Gradients of a shared block collect over both of its applications: block 0's router
    # gradient is the sum of what each application's routing contributes.
    w = lm.blocks[0].ffn.router.weight
    rows = ffn[0].num_rows * 2

    def term(p0, p2):
        return 0.01 * entropy_regularizer(p0 + p2, rows)

    (g_all,) = torch.autograd.grad(out.aux_loss, w, retain_graph=True)
    (g_first,) = torch.autograd.grad(term(ffn[0].probs_sum, ffn[2].probs_sum.detach()), w, retain_graph=True)
    (g_second,) = torch.autograd.grad(term(ffn[0].probs_sum.detach(), ffn[2].probs_sum), w)
    assert g_first.abs().sum() > 0 and g_second.abs().sum() > 0
    torch.testing.assert_close(g_all, g_first + g_second)


def test_peri_layernorm_normalises_only_router_and_qk_inputs():
    cfg = moeut_cfg()
    torch.manual_seed(0)
    lm = LM(cfg, 50)
    seen = {}

    def keep_first(name, value):  # hooks must return None, or they replace the arguments
        seen.setdefault(name, value)

    block = lm.blocks[1]
    block.attn.register_forward_pre_hook(lambda m, args: keep_first("attn", args))
    block.ffn.register_forward_pre_hook(lambda m, args: keep_first("ffn", args))
    block.ln_ffn.register_forward_hook(lambda m, args, out: keep_first("ln_ffn_in", args[0]))
    lm(torch.randint(0, 50, (1, 8)))
    x_attn, route_attn = seen["attn"]
    x_ffn, route_ffn = seen["ffn"]
    assert torch.equal(x_ffn, seen["ln_ffn_in"])  # experts read the residual stream itself
    torch.testing.assert_close(route_ffn, torch.nn.functional.layer_norm(x_ffn, (16,), block.ln_ffn.weight, block.ln_ffn.bias))
    assert x_attn.std().item() != pytest.approx(1.0, abs=0.05) and route_attn.std().item() == pytest.approx(1.0, abs=0.05)
    # Pre-LN: both inputs are the normalised one.
    seen.clear()
    lm_pre = LM(moeut_cfg(["model.norm=pre"]), 50)
    lm_pre.blocks[1].ffn.register_forward_pre_hook(lambda m, args: keep_first("ffn", args))
    lm_pre(torch.randint(0, 50, (1, 8)))
    assert seen["ffn"][0] is seen["ffn"][1]


def test_init_is_fan_in_under_peri_layernorm_and_scaled_normal_under_pre():
    wide = ["model.d_model=64", "model.head_dim=32", "moe.num_experts=16", "moe.d_expert=32"]
    gain = math.sqrt(2 / 4)  # sqrt(2 / applied depth)
    torch.manual_seed(0)
    block = LM(moeut_cfg(wide), 50).blocks[0]
    expected = {  # std = gain / sqrt(fan_in)
        "router": (block.ffn.router.weight, gain / 8),
        "expert in": (block.ffn.experts.w_in_EDH, gain / 8),
        "expert out": (block.ffn.experts.w_out_EFD, gain / math.sqrt(16 * 32)),  # all experts' width
        "qk": (block.attn.qk.qk.weight, gain / 8),
        "gate": (block.attn.gate_src.weight, gain / 8),
        "value experts": (block.attn.experts_v.w_GIO, gain / 8),
        "output experts": (block.attn.experts_o.w_GIO, gain / math.sqrt(2 * 32)),  # H heads x Dh
    }
    for name, (w, std) in expected.items():
        assert w.std().item() == pytest.approx(std, rel=0.1), name
    for extra in (["model.norm=pre"], ["model.init=scaled_normal"]):
        lm = LM(moeut_cfg(wide + extra), 50)
        assert lm.cfg.model.init_scheme == "scaled_normal"
        assert lm.blocks[0].ffn.experts.w_in_EDH.std().item() == pytest.approx(0.02, rel=0.1)
        assert lm.blocks[0].ffn.experts.w_out_EFD.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    assert LM(moeut_cfg(wide), 50).embed.weight.std().item() == pytest.approx(0.02, rel=0.1)  # tied: see models/init.py
    # Softmax experts (weights summing to 1) count one expert's width on the output side;
    # sigma-MoE's all-experts rule gave them sqrt(E) = 4x smaller outputs.
    for ffn in (["model.ffn=moe"], ["model.ffn=slice_moe", "moe.num_slices=2"]):
        w_out = LM(moeut_cfg(wide + ffn), 50).blocks[0].ffn.experts.w_out_EFD
        assert w_out.std().item() == pytest.approx(gain / math.sqrt(32), rel=0.1), ffn


# ----------------------------------------------------------------------------- SliceMoE


def reference_slice_moe(x_TD, fc1_w, fc1_b, fc2_w, fc2_b, w_in, b_in, w_out, b_out, S, K, cf, act):
    """Per-(token, slice) loop from the SliceMoE equations."""
    T, D = x_TD.shape
    Ds, E = D // S, w_in.shape[0]
    pairs = x_TD.reshape(T * S, Ds)
    probs = torch.softmax(torch.relu(pairs @ fc1_w.T + fc1_b) @ fc2_w.T + fc2_b, dim=-1)
    cap = expert_capacity(T * S, K, E, cf)
    choices = []
    for p in range(T * S):
        ranked = sorted(range(E), key=lambda e: (-probs[p, e].item(), e))[:K]
        total = sum(probs[p, e] for e in ranked) if K > 1 else 1.0
        choices.append([(e, probs[p, e] / total) for e in ranked])
    used, keep = [0] * E, {}
    for j in range(K):
        for p in range(T * S):
            e = choices[p][j][0]
            keep[p, j] = cap is None or used[e] < cap
            used[e] += keep[p, j]
    out = torch.zeros_like(pairs)
    for p in range(T * S):
        for j, (e, w) in enumerate(choices[p]):
            if keep[p, j]:
                h = w * pairs[p]  # the slice is weighted BEFORE its expert
                out[p] = out[p] + activation(h @ w_in[e] + b_in[e], act) @ w_out[e] + b_out[e]
    return out.view(T, D)


def make_slice(D=12, S=3, E=4, K=2, cf=None, act="relu", hidden=7):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, top_k=K, d_expert=5, capacity_factor=cf, num_slices=S, slice_router_hidden=hidden, grouped_mm="loop")
    layer = SliceMoEFFN(D, cfg, act).double()
    layer.reset_parameters(0.5, 0.5)
    with torch.no_grad():  # non-zero biases, so that they are tested too
        for b in (layer.router.fc1.bias, layer.router.fc2.bias, layer.experts.b_in_EH, layer.experts.b_out_ED):
            b.normal_(std=0.3)
    return layer


@pytest.mark.parametrize("S, K, cf, act", [(3, 2, None, "relu"), (4, 1, 0.6, "gelu"), (2, 3, 1.0, "swiglu")])
def test_slice_moe_matches_reference(S, K, cf, act):
    layer = make_slice(D=12, S=S, E=4, K=K, cf=cf, act=act)
    x = torch.randn(1, 5, 12, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    r, ex = layer.router, layer.experts
    params = [r.fc1.weight, r.fc1.bias, r.fc2.weight, r.fc2.bias, ex.w_in_EDH, ex.b_in_EH, ex.w_out_EFD, ex.b_out_ED]
    ref, (x_ref,) = clones(params), clones([x])
    y_ref = reference_slice_moe(x_ref[0], *ref, S, K, cf, act)
    torch.testing.assert_close(y[0], y_ref, **F64)
    assert aux.assignments == 5 * S * K and aux.tokens_per_expert.sum().item() == 5 * S * K
    grads_match(y[0], y_ref, params, ref, [x], [x_ref])


def test_slice_moe_with_one_slice_is_token_moe():
    # S=1 with the same router: token-level MoE. Weighting the expert input instead of its
    # output is the same for experts with ReLU and no biases (positively homogeneous).
    slice_layer = make_slice(D=12, S=1, E=4, K=2, cf=1.0, act="relu")
    with torch.no_grad():
        slice_layer.experts.b_in_EH.zero_()
        slice_layer.experts.b_out_ED.zero_()
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=5, capacity_factor=1.0, lb_loss_weight=0, z_loss_weight=0, grouped_mm="loop")
    token_layer = MoEFFN(12, cfg, "relu").double()
    token_layer.router = slice_layer.router  # the same router module
    with torch.no_grad():
        token_layer.experts.w_in_EDH.copy_(slice_layer.experts.w_in_EDH)
        token_layer.experts.w_out_EFD.copy_(slice_layer.experts.w_out_EFD)
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    y_slice, a_slice = slice_layer(x)
    y_token, a_token = token_layer(x)
    torch.testing.assert_close(y_slice, y_token, **F64)
    assert torch.equal(a_slice.tokens_per_expert, a_token.tokens_per_expert)
    assert a_slice.dropped.item() == a_token.dropped.item()


def test_slice_capacity_loss_and_cross_slice_dropout():
    torch.testing.assert_close(cv_squared(torch.tensor([2.0, 2.0, 2.0])), torch.tensor(0.0))
    torch.testing.assert_close(cv_squared(torch.tensor([3.0, 1.0])), torch.tensor(0.25))  # std 1, mean 2
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(4000, 3), -1)
    out, dropped = cross_slice_dropout(w, 0.5)
    assert (out > 0).any(dim=1).all() and not dropped.all(dim=1).any()  # never all k
    torch.testing.assert_close(out.sum(1), torch.ones(4000))
    assert torch.equal(out == 0, dropped)
    frac = dropped.float().mean().item()
    assert 0.40 < frac < 0.5  # 0.5 minus the rows (1/8) where everything was drawn
    # A second weight that underflowed to 0: dropping the first would leave 0/0. Such rows
    # drop nothing; rows that dropped only the zero weight keep [1, 0] too.
    w = torch.tensor([[1.0, 0.0]]).repeat(1000, 1)
    out, dropped = cross_slice_dropout(w, 0.5)
    assert torch.equal(out, w) and not dropped[:, 0].any() and dropped[:, 1].any()


def test_a_slice_weight_dropped_by_dropout_takes_no_capacity_slot():
    """Capacity 2 per expert (4 slices x top-2 / 2 experts x cf 0.5). Slice 0's choice of
    expert 0 is dropped by cross-slice dropout, so slices 1 and 2 fill expert 0, not 0 and 1
    with slice 0's slot wasted."""
    from moe_dist.parallel.expert_parallel import ExpertParallel

    expert = torch.tensor([[0, 1]] * 4)
    active = torch.tensor([[False, True], [True, True], [True, True], [True, True]])
    keep = ExpertParallel().capacity_mask(expert, 2, 0.5, active)
    assert keep.tolist() == [[False, True], [True, True], [True, False], [False, False]]
    assert ExpertParallel().capacity_mask(expert, 2, None, active).tolist() == active.tolist()  # dropless


def test_slice_capacity_loss_value_is_hard_counts_and_gradient_reaches_every_expert():
    """The paper's CV^2 of hard counts is the value; its straight-through gradient (through
    K x the full softmax mass) reaches an expert that no pair selected, which the top-k
    weights (a softmax over the selected logits only) cannot."""
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits[:, 7] -= 5.0  # a starved expert
    logits.requires_grad_()
    expert, _, probs = route_topk(logits, 2, "softmax")
    counts = torch.bincount(expert.reshape(-1), minlength=8).double()
    assert counts[7] == 0
    cv2 = cv_squared(straight_through_load(counts, probs.sum(0), 2))
    assert cv2.item() == cv_squared(counts).item()
    cv2.backward()
    # d cv2 / d load_7 < 0 (below the mean), so gradient descent raises expert 7's logits.
    grad_7 = logits.grad[:, 7].sum().item()
    assert grad_7 < -1e-6, grad_7
    # Exactly the chain rule through K * importance.
    load = counts.clone().requires_grad_()
    cv_squared(load).backward()
    imp = logits.detach().clone().requires_grad_()
    (2 * torch.softmax(imp, -1).sum(0) * load.grad).sum().backward()
    torch.testing.assert_close(logits.grad, imp.grad, **F64)


def test_expert_dropout_never_leaves_fewer_than_k_selectable():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    e, w, _ = route_topk(logits, 2, exclude_TE=torch.tensor([[False, True, False]]))
    assert e.tolist() == [[0, 2]]
    # Two of three excluded at K=2: the row excludes none (not a -inf expert at full weight).
    e, w, _ = route_topk(logits, 2, exclude_TE=torch.tensor([[False, True, True]]))
    assert e.tolist() == [[0, 1]]
    e, _, _ = route_topk(logits, 1, exclude_TE=torch.tensor([[True, True, True]]))
    assert e.tolist() == [[0]]


@pytest.mark.parametrize("ffn", ["moe", "slice"])
def test_a_call_with_no_rows_has_zero_losses(ffn):
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=4, num_slices=2, slice_router_hidden=4, entropy_loss_weight=0.1)
    layer = SliceMoEFFN(8, cfg, "relu") if ffn == "slice" else MoEFFN(8, cfg, "relu")
    y, aux = layer(torch.zeros(0, 5, 8))
    assert y.shape == (0, 5, 8)
    assert total_aux_loss([aux]).item() == 0.0 and all(torch.isfinite(t) for t in aux.terms.values())


# ----------------------------------------------------------------------------- loss-free bias


def test_balance_bias_update_hand_computed():
    bb = BalanceBias(4, rate=0.1)
    bb.train()
    bb.observe(torch.tensor([3, 1, 0, 0]))  # the counts of selections [[0, 0], [0, 1]]; mean 1
    bb.update()
    torch.testing.assert_close(bb.bias, torch.tensor([[-0.1, 0.0, 0.1, 0.1]]))
    assert bb.load.sum() == 0
    assert "bias" in bb.state_dict() and "load" not in bb.state_dict()  # saved in checkpoints
    bb.eval()
    bb.observe(torch.tensor([1, 0, 0, 0]))  # evaluation does not count
    assert bb.load.sum() == 0


def test_bias_changes_selection_not_weights():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    e, w, _ = route_topk(logits, 1, "sigmoid", select_bias_E=torch.tensor([0.0, 0.5, 0.0]))
    assert e.tolist() == [[1]]
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[1.9]])))


@pytest.mark.parametrize("ffn, attention", [("moe", "mha"), ("sigma_moe", "mha"), ("slice_moe", "mha"), ("dense", "switchhead")])
def test_loss_free_bias_in_every_router(ffn, attention, tmp_path):
    from conftest import TINY
    from moe_dist.trainer.trainer import Trainer

    cfg = load_config(None, TINY + [
        f"run.dir={tmp_path}", f"model.ffn={ffn}", f"model.attention={attention}", "moe.num_slices=4",
        "moe.bias_update_rate=0.01", "attention.bias_update_rate=0.01", "train.max_steps=3",
        "train.eval_every=0", "checkpoint.every=3",
    ])
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.fit()
    trainer.close()
    biases = {k: v for k, v in trainer.model.state_dict().items() if k.endswith("bias") and "balance" in k}
    assert biases and all(v.abs().sum() > 0 for v in biases.values())
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(tmp_path / "checkpoints" / "step_00000003", tmp_path / "flat.pt")
    saved = torch.load(tmp_path / "flat.pt", weights_only=False)
    for k, v in biases.items():
        assert torch.equal(saved[f"model.{k}"], v)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.ffn=slice_moe", "moe.num_slices=5"], "moe.num_slices: S=5 does not divide model.d_model=128"),
        (["attention.top_k=5", "attention.num_experts=4"], "attention.top_k: top_k=5 exceeds attention.num_experts=4"),
        (["model.group_size=3"], "model.group_size: G=3 must be >= 1 and divide model.n_layers=4"),
        (["moe.expert_dropout=1.0"], "moe.expert_dropout: must be in [0, 1)"),
        (["moe.slice_dropout=-0.1"], "moe.slice_dropout: must be in [0, 1)"),
        (["model.norm=post"], "model.norm: expected one of ['pre', 'peri'], got 'post'"),
        (["model.n_heads=3"], "model.d_model: d_model=128 is not divisible by model.n_heads=3 (or set model.head_dim)"),
    ],
)
def test_new_options_are_validated(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


# ----------------------------------------------------------------------------- training


TINY_CONFIGS = ["tiny_dense", "tiny_switch", "tiny_top2_shared", "tiny_sigma_moe", "tiny_switchhead", "tiny_moeut", "tiny_slicemoe"]


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_tiny_config_trains(name, tmp_path):
    """Each shipped tiny config, on a small slice of the corpus: the loss falls in 40 steps."""
    import json

    from conftest import REPO
    from moe_dist.trainer.trainer import Trainer

    data = ["data.max_docs=12", "data.vocab_size=512", "data.seq_len=32", "data.samples_per_shard=256"]
    cfg = load_config(f"{REPO}/configs/{name}.yaml", data + [
        f"run.dir={tmp_path}", "train.max_steps=40", "train.micro_batch_size=8", "train.eval_every=0",
        "checkpoint.every=0", "checkpoint.save_final=false", "logging.progress=false", "optim.warmup_steps=4",
        "optim.lr=3e-3", "train.resume=none",
    ])
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.fit()
    trainer.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    first = sum(r["lm_loss"] for r in rows[:5]) / 5
    last = sum(r["lm_loss"] for r in rows[-5:]) / 5
    assert len(rows) == 40 and last < first - 0.5, (first, last)


@pytest.mark.parametrize("name", [c for c in TINY_CONFIGS if c != "tiny_dense"])
def test_gradients_repeat_bit_for_bit(name):
    """Two forward+backward passes on the same batch give identical gradients with 2 threads.
    The batch is big enough (1024 tokens x d 64) for CPU's parallel-atomic index_put, which
    made every top-k > 1 gather nondeterministic before gathers used index_select
    (ops/__init__.py)."""
    from conftest import REPO

    cfg = load_config(f"{REPO}/configs/{name}.yaml", [
        "model.d_model=64", "model.n_layers=2", "model.group_size=null", "model.head_dim=16", "model.vocab_size=97",
        "data.seq_len=64", "moe.expert_dropout=0", "moe.slice_dropout=0", "moe.num_experts=8", "moe.d_expert=32",
    ])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        lm = LM(cfg, 97)
        idx = torch.randint(0, 97, (16, 64))

        def grads():
            lm.zero_grad()
            out = lm(idx)
            (torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), idx.flatten()) + out.aux_loss).backward()
            return [p.grad.clone() for p in lm.parameters()]

        first = grads()
        for _ in range(3):
            assert all(torch.equal(a, b) for a, b in zip(first, grads()))
    finally:
        torch.set_num_threads(threads)

"""The token-choice MoE layer against a naive per-token loop in float64, and degenerate cases."""

import dataclasses

import pytest
import torch

from moe_dist.config import MoEConfig
from moe_dist.models.ffn import FFN
from moe_dist.moe.layer import MoEFFN
from moe_dist.moe.router import expert_capacity
from moe_dist.ops.activations import activation
from moe_dist.ops import grouped_mm as grouped_mm_module
from moe_dist.ops.grouped_mm import grouped_mm, grouped_mm_reference


def reference_moe(x_TD, router_w, w_in, w_out, act, k, cf, score="softmax"):
    """Per-token loop, written from the papers' equations, independent of the layer's code.
    softmax: Switch/GShard (k >= 2 renormalised); sigmoid: sigma-MoE (raw scores)."""
    T, D = x_TD.shape
    E = router_w.shape[0]
    logits = x_TD @ router_w.T
    probs = torch.softmax(logits, dim=-1) if score == "softmax" else torch.sigmoid(logits)
    choices = []  # per token: list of (expert, weight)
    for t in range(T):
        ranked = sorted(range(E), key=lambda e: (-probs[t, e].item(), e))[:k]
        ws = [probs[t, e] for e in ranked]
        if k > 1 and score == "softmax":
            total = sum(ws)
            ws = [w / total for w in ws]
        choices.append(list(zip(ranked, ws)))
    cap = expert_capacity(T, k, E, cf)
    used = [0] * E
    keep = [[False] * k for _ in range(T)]
    for j in range(k):  # first choices of all tokens before any second choice
        for t in range(T):
            e = choices[t][j][0]
            if cap is None or used[e] < cap:
                used[e] += 1
                keep[t][j] = True
    y = torch.zeros_like(x_TD)
    dropped = 0
    for t in range(T):
        for j, (e, w) in enumerate(choices[t]):
            if not keep[t][j]:
                dropped += 1
                continue
            y[t] = y[t] + w * (activation(x_TD[t] @ w_in[e], act) @ w_out[e])
    return y, dropped


def make_layer(E, k, cf, act="swiglu", D=12, F=10, shared=0, seed=0):
    cfg = MoEConfig(num_experts=E, top_k=k, d_expert=F, capacity_factor=cf, num_shared_experts=shared, grouped_mm="loop")
    torch.manual_seed(seed)
    layer = MoEFFN(D, cfg, act).double()
    layer.reset_parameters(0.5, 0.5)
    return layer


@pytest.mark.parametrize(
    "E, k, cf, act",
    [(4, 1, 1.0, "swiglu"), (4, 2, 1.25, "relu"), (5, 2, None, "swiglu"), (3, 3, 0.5, "gelu"), (7, 2, 0.75, "swiglu")],
)
def test_layer_matches_per_token_reference(E, k, cf, act):
    layer = make_layer(E, k, cf, act)
    x = torch.randn(2, 9, 12, dtype=torch.float64, requires_grad=True)  # T = 18, odd sizes
    y, aux = layer(x)
    x_ref = x.detach().clone().requires_grad_()
    params = [layer.router.weight, layer.experts.w_in_EDH, layer.experts.w_out_EFD]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    y_ref, dropped = reference_moe(x_ref.view(18, 12), *ref_params, act, k, cf)
    torch.testing.assert_close(y.view(18, 12), y_ref, rtol=1e-10, atol=1e-12)
    assert aux.dropped.item() == dropped
    assert aux.tokens_per_expert.sum().item() == 18 * k
    g = torch.randn_like(y_ref)
    (y.view(18, 12) * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-10, atol=1e-12)


def test_capacity_drops_counted_and_residual_zero():
    layer = make_layer(4, 1, 0.25)
    assert expert_capacity(18, 1, 4, 0.25) == 2  # ceil(1.125)
    x = torch.randn(1, 18, 12, dtype=torch.float64)
    y, aux = layer(x)
    expected = sum(max(0, c - 2) for c in aux.tokens_per_expert.tolist())
    assert expected > 0 and aux.dropped.item() == expected
    zero_rows = (y.view(18, 12).abs().sum(dim=1) == 0).sum().item()
    assert zero_rows == expected  # a dropped token gets exactly zero from the layer


def _both_drop_forms(monkeypatch, build, x, tol):
    """Runs build()(x) forward+backward with the dropped assignments left out of the dispatch
    and computed with no output (moe/dispatch.py computes_dropped forced each way), asserts
    equal outputs and gradients within tol, and returns each routed call's (dropped, kept per
    expert, skipped) of both runs."""
    import moe_dist.moe.dispatch as dispatch

    results = []
    for computed in (False, True):
        monkeypatch.setattr(dispatch, "computes_dropped", lambda ep_size, device, c=computed: c)
        module = build()
        xi = x.clone().requires_grad_()
        y, auxes = module(xi)
        auxes = auxes if isinstance(auxes, list) else [auxes]
        (y.square().sum() + sum(a.loss for a in auxes)).backward()
        stats = [(a.dropped.item(), a.kept_per_expert.tolist(), None if a.skipped is None else a.skipped.item())
                 for a in auxes]  # fmt: skip
        results.append((y.detach(), xi.grad, [p.grad for p in module.parameters()], stats))
    (y0, gx0, g0, s0), (y1, gx1, g1, s1) = results
    torch.testing.assert_close(y1, y0, **tol)
    torch.testing.assert_close(gx1, gx0, **tol)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, **tol)
    return s0, s1


@pytest.mark.parametrize("backend, dtype", [("loop", torch.float64), ("torch", torch.float32)])
def test_computed_drops_equal_left_out_drops(monkeypatch, backend, dtype):
    """The two ways of dropping (moe/dispatch.py): left out of the dispatch (CPU eager, a
    host sync) and computed with weight 0 (a GPU, torch.compile) give the same outputs,
    gradients, drop count and kept-per-expert counts."""

    def build():
        layer = make_layer(4, 2, 0.5, D=16, F=8)  # torch._grouped_mm: 16-byte rows
        layer.experts.backend = backend
        return layer.to(dtype)

    x = torch.randn(2, 20, 16, dtype=dtype, generator=torch.Generator().manual_seed(3))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    [(d0, k0, _)], [(d1, k1, _)] = _both_drop_forms(monkeypatch, build, x, tol)
    assert d0 == d1 > 0 and k0 == k1 and sum(k0) + d0 == 2 * 20 * 2


@pytest.mark.parametrize("config, extra", [
    ("tiny_slicemoe", ["moe.capacity_factor=0.5"]),  # with cross-slice dropout (0.2)
    ("tiny_sigma_moe", ["moe.capacity_factor=0.7"]),  # with expert dropout
])  # fmt: skip
def test_computed_drops_equal_left_out_drops_in_blocks(monkeypatch, config, extra):
    """As above for a SliceMoE block (whose experts' biases need the output zeroed, not only
    the weight) and a sigma-MoE block, in training mode with their dropouts, float64."""
    from moe_dist.config import load_config
    from moe_dist.models.transformer import LM

    cfg = load_config(f"configs/{config}.yaml", ["model.d_model=64", "data.seq_len=16", "model.dropout=0"] + extra)

    def build():
        torch.manual_seed(0)  # the same weights, and the same dropout draws, in both runs
        return LM(cfg, 64).double().blocks[-1]

    x = torch.randn(2, 16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s0, s1 = _both_drop_forms(monkeypatch, build, x, dict(rtol=1e-12, atol=1e-12))
    assert s0 == s1 and s0[0][0] > 0


def test_eval_capacity_factor_applies_in_eval_only():
    """moe.eval_capacity_factor (Switch: train 1.25, eval 2.0): model.eval() routes with it,
    training keeps capacity_factor; 0 is dropless."""
    layer = make_layer(4, 1, 0.25)
    x = torch.randn(1, 18, 12, dtype=torch.float64)
    train_dropped = layer(x)[1].dropped.item()
    assert train_dropped > 0
    for eval_cf, capacity in ((2.0, 9), (0.0, None)):  # ceil(18 / 4 * 2) = 9
        layer.cfg = dataclasses.replace(layer.cfg, eval_capacity_factor=eval_cf)
        layer.eval()
        _, aux = layer(x)
        want = 0 if capacity is None else sum(max(0, c - capacity) for c in aux.tokens_per_expert.tolist())
        assert aux.dropped.item() == want and aux.capacity == capacity
        layer.train()
        assert layer(x)[1].dropped.item() == train_dropped


def test_one_expert_top1_equals_dense_ffn():
    torch.manual_seed(1)
    D, F = 16, 24
    dense = FFN(D, F, "swiglu").double()
    dense.reset_parameters(0.3, 0.3)
    layer = make_layer(1, 1, None, "swiglu", D=D, F=F)
    with torch.no_grad():
        layer.experts.w_in_EDH[0].copy_(dense.w_in.weight.T)
        layer.experts.w_out_EFD[0].copy_(dense.w_out.weight.T)
    x = torch.randn(3, 5, D, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, aux = layer(x)
    y_dense = dense(x2)
    torch.testing.assert_close(y, y_dense, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_dense * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.experts.w_in_EDH.grad[0], dense.w_in.weight.grad.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.experts.w_out_EFD.grad[0], dense.w_out.weight.grad.T, rtol=1e-12, atol=1e-12)
    assert aux.dropped.item() == 0 and aux.tokens_per_expert.tolist() == [15]
    # One expert: LB loss is exactly 1 (alpha = 0.01); z-loss is the mean squared logit.
    logits = layer.router(x.detach().view(15, D))
    torch.testing.assert_close(aux.loss, (0.01 + 0.001 * logits.square().mean()).float())


def test_shared_experts_add_a_dense_ffn():
    layer = make_layer(4, 2, None, shared=2)
    x = torch.randn(1, 6, 12, dtype=torch.float64)
    y, _ = layer(x)
    layer_no_shared = make_layer(4, 2, None, shared=0)
    layer_no_shared.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared")})
    y_routed, _ = layer_no_shared(x)
    torch.testing.assert_close(y, y_routed + layer.shared(x))
    assert layer.shared.w_out.in_features == 2 * 10


def test_all_tokens_dropped_gives_zero_output_and_grads():
    layer = make_layer(4, 1, 1e-9)  # capacity ceil(tiny) = 1: force with a skewed router
    with torch.no_grad():
        layer.router.weight.zero_()
    x = torch.randn(1, 5, 12, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)  # all ties -> expert 0, capacity 1 -> 4 of 5 dropped
    assert aux.dropped.item() == 4 and aux.tokens_per_expert.tolist() == [5, 0, 0, 0]
    y.sum().backward()
    # The kept token (the first: position priority) has an output; the dropped ones are
    # exactly zero, and so are their input gradients.
    assert y[0, 0].abs().sum() > 0 and torch.equal(y[0, 1:], torch.zeros_like(y[0, 1:]))
    assert x.grad[0, 0].abs().sum() > 0 and torch.equal(x.grad[0, 1:], torch.zeros_like(x.grad[0, 1:]))
    assert layer.experts.w_in_EDH.grad[1:].abs().sum().item() == 0  # experts without tokens
    # Expert 0's gradient is the kept token's alone: the same layer, dropless, on that token.
    alone = make_layer(4, 1, None)
    alone.load_state_dict(layer.state_dict())
    alone(x.detach()[:, :1])[0].sum().backward()
    torch.testing.assert_close(layer.experts.w_in_EDH.grad, alone.experts.w_in_EDH.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_mm_backends_agree(dtype):
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 7])
    x = torch.randn(int(counts.sum()), 16, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 16, 24, dtype=dtype, requires_grad=True)
    ref = grouped_mm_reference(x.double(), w.double(), counts)
    for backend in ("loop", "torch"):
        xb, wb = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        y = grouped_mm(xb, wb, counts, backend)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
        torch.testing.assert_close(y.double(), ref, **tol)
        y.sum().backward()  # stride-0 incoming gradient: the case torch._grouped_mm rejects
        dx_ref, dw_ref = torch.autograd.grad(grouped_mm_reference(x.double(), w.double(), counts).sum(), [x, w])
        torch.testing.assert_close(xb.grad.double(), dx_ref.double(), **tol)
        torch.testing.assert_close(wb.grad.double(), dw_ref.double(), **tol)
        assert wb.grad[1].abs().sum().item() == 0


def test_grouped_mm_torch_backend_refuses_unaligned():
    with pytest.raises(ValueError, match="16-byte aligned"):
        grouped_mm(torch.randn(3, 6), torch.randn(2, 6, 5), torch.tensor([1, 2]), "torch")


@pytest.mark.parametrize("act, D, F, tokens, picks", [
    ("relu", 16, 8, 18, "torch"),  # small expert blocks: torch._grouped_mm
    ("swiglu", 16, 6, 18, "loop"),  # the second projection's 24-byte rows: torch cannot run it
    # 10000 rows x (64 + 64) over 3 experts: the fused loop. GELU: at 640K ReLU units some
    # pre-activation is within float32 rounding of 0, and its gradient flips there.
    ("gelu", 64, 64, 5000, "loop"),
])  # fmt: skip
def test_float32_auto_backend_layer_matches_float64(act, D, F, tokens, picks):
    """The layer in float32 on CPU `auto` (whichever backend it picks) against the same
    weights in float64 on the loop backend: outputs and every gradient."""
    cfg = MoEConfig(num_experts=3, top_k=2, d_expert=F, capacity_factor=None)
    torch.manual_seed(0)
    layer = MoEFFN(D, cfg, act)
    layer.reset_parameters(0.3, 0.3)
    w_in, w_out = layer.experts.w_in_EDH, layer.experts.w_out_EFD
    assert grouped_mm_module._resolve("auto", torch.zeros(1, D), w_in, 2 * tokens, w_out) == picks
    ref = MoEFFN(D, dataclasses.replace(cfg, grouped_mm="loop"), act).double()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(1, tokens, D, requires_grad=True)
    x_ref = x.detach().double().requires_grad_()
    y, _ = layer(x)
    y_ref, _ = ref(x_ref)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn(y.shape, dtype=torch.float64)
    (y.double() * dy).sum().backward()
    (y_ref * dy).sum().backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
        scale = q.grad.abs().max()  # sums over 10000 rows: compare relative to the largest
        torch.testing.assert_close(p.grad.double() / scale, q.grad / scale, rtol=1e-5, atol=1e-5, msg=name)


def test_grouped_mm_torch_backend_with_no_rows_and_an_expanded_gradient():
    """y.sum() of an empty output gives a [0, F] gradient with zero strides."""
    x = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(2, 16, 8, requires_grad=True)
    grouped_mm(x, w, torch.zeros(2, dtype=torch.long), "torch").sum().backward()
    assert x.grad.shape == (0, 16) and w.grad.abs().sum().item() == 0


def test_torch_backend_checks_both_projections_of_an_expert_mlp():
    x, w_in, w_out = torch.randn(4, 16), torch.randn(2, 16, 12), torch.randn(2, 6, 16)  # swiglu: 12 -> 6
    with pytest.raises(ValueError, match="16x12x6x16 .*16-byte aligned"):
        grouped_mm_module.grouped_mlp(x, w_in, w_out, torch.tensor([1, 3]), "swiglu", backend="torch")


def test_expert_counts_off_the_cpu_read_no_value_on_the_host():
    """Meta tensors have no values, so any count that reads one (bincount sizes its output
    by max(ids): two device-to-host syncs per call on CUDA) fails here."""
    from moe_dist.moe.dispatch import expert_counts

    from moe_dist.moe.dispatch import _scatter_counts

    counts = expert_counts(torch.empty(10, dtype=torch.long, device="meta"), 7)
    assert (counts.shape, counts.dtype, counts.device.type) == ((7,), torch.long, "meta")
    # The values of that (off-CPU) path, on CPU; experts 1, 2, 4 and 6 get none.
    assert _scatter_counts(torch.tensor([3, 0, 3, 3, 0, 5]), 7).tolist() == [2, 0, 0, 3, 0, 1, 0]
    ids = torch.randint(0, 7, (300,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_scatter_counts(ids, 7), torch.bincount(ids, minlength=7))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: host syncs exist only there")
@pytest.mark.parametrize("backend, cf", [("torch", 0), ("torch", 0.5), ("triton", 0.5)])
def test_layer_at_ep1_never_syncs_the_host_on_cuda(backend, cf):
    """A routed layer at ep=1, forward and backward, waits for the GPU nowhere, capacity
    drops included (computed with weight 0 there: moe/dispatch.py): set_sync_debug_mode
    ("error") raises at any device-to-host sync. Each sync drains the launch queue, which
    a small layer's host time then no longer overlaps."""
    k = 2
    cfg = MoEConfig(num_experts=8, top_k=k, d_expert=128, capacity_factor=cf, lb_loss_weight=0.01,
                    z_loss_weight=0.001, grouped_mm=backend)  # fmt: skip
    torch.manual_seed(0)
    layer = MoEFFN(64, cfg, "swiglu")
    layer.reset_parameters(0.02, 0.02)
    layer = layer.cuda().to(torch.bfloat16)
    x = torch.randn(2, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y, aux = layer(x)  # the first call: the kernels' autotuning and caches
    (y.float().square().mean() + aux.loss).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, aux = layer(x)
        (y.float().square().mean() + aux.loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    dropped, kept = aux.dropped.item(), aux.kept_per_expert.sum().item()
    assert (dropped > 0) == (cf > 0) and kept + dropped == 2 * 256 * k

"""train.activation_checkpoint=full (moe/recompute.py): every architecture gives the same
loss, bit-identical gradients and the same balancing counts as without it; the activations
held between forward and backward shrink; at ep=2 with capacity drops the training run is
bit-identical; nothing ahead of a block's FFN router adds floats in a run-dependent order
on a GPU, so its recompute routes as the forward did."""

import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moe_dist.moe.balance as balance
from conftest import TINY, load_tool
from dist_utils import run_train
from moe_dist.config import AttentionConfig, load_config
from moe_dist.models.attention import CausalSelfAttention
from moe_dist.models.switchhead import SwitchHeadAttention
from moe_dist.models.transformer import LM, lm_loss
from moe_dist.moe.balance import BalanceBias
from moe_dist.moe.noise import noise_for, step_keys

ARCHS = ["tiny_dense", "tiny_switch", "tiny_sigma_moe", "tiny_switchhead", "tiny_moeut", "tiny_slicemoe"]
# Small widths; every random draw on: model.dropout (torch's stream, restored for the
# recompute), expert and slice dropout (hashed), and the aux-loss-free balancing counts.
SMALL = [
    "model.d_model=32", "model.d_ff=64", "moe.d_expert=16", "moe.slice_router_hidden=32", "model.dropout=0.1",
    "moe.bias_update_rate=0.01", "attention.bias_update_rate=0.01", "moe.expert_dropout=0.1",
]  # fmt: skip


def train_step(arch, ac, vocab=300, batch=4, seq=32):
    slice_dropout = ["moe.slice_dropout=0.2"] if arch == "tiny_slicemoe" else []
    cfg = load_config(f"configs/{arch}.yaml", [*SMALL, *slice_dropout, f"data.seq_len={seq}",
                                               f"train.activation_checkpoint={ac}"])  # fmt: skip
    torch.manual_seed(0)
    model = LM(cfg, vocab)
    calls = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    idx = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    noise = noise_for(step_keys(0, 3, cfg.model.n_layers), 64, torch.device("cpu"))
    torch.manual_seed(2)  # model.dropout's stream
    out = model(idx[:, :-1], noise_L2=noise)
    loss = lm_loss(out.logits, idx[:, 1:]) + out.aux_loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    loads = [m.load.clone() for m in model.modules() if isinstance(m, BalanceBias)]
    return cfg, loss.detach(), grads, loads, len(calls)


@pytest.mark.parametrize("arch", ARCHS)
def test_recomputed_blocks_give_identical_gradients(arch):
    cfg, loss, grads, loads, calls = train_step(arch, "none")
    _, loss_ac, grads_ac, loads_ac, calls_ac = train_step(arch, "full")
    L = cfg.model.n_layers
    assert (calls, calls_ac) == (L, 2 * L)  # every block application ran again in the backward
    assert torch.equal(loss, loss_ac)
    assert grads.keys() == grads_ac.keys() and all(g is not None for g in grads.values())
    for name in grads:
        assert torch.equal(grads[name], grads_ac[name]), name
    # The balancing counts see each forward once, not again in the recompute.
    assert len(loads) == len(loads_ac) and (len(loads) > 0) == (arch != "tiny_dense")
    for a, b in zip(loads, loads_ac):
        assert torch.equal(a, b) and a.sum() > 0


def test_recompute_without_its_guard_counts_balance_twice(monkeypatch):
    """The counterfactual of the test above: the guard is what keeps the counts."""
    *_, loads, _ = train_step("tiny_switch", "none")
    monkeypatch.setattr(balance, "recomputing", lambda: False)
    *_, loads_ac, _ = train_step("tiny_switch", "full")
    assert loads and all(torch.equal(2 * a, b) for a, b in zip(loads, loads_ac))


def test_eval_and_no_grad_forwards_are_not_checkpointed():
    cfg = load_config("configs/tiny_switch.yaml", [*SMALL, "train.activation_checkpoint=full"])
    model = LM(cfg, 300)
    idx = torch.randint(0, 300, (2, 16))
    ran = []
    model.blocks[0].register_forward_pre_hook(lambda *_: ran.append(torch.is_grad_enabled()))
    with torch.no_grad():
        model(idx)
    model.eval()
    model(idx).logits.sum().backward()
    assert ran == [False, True]  # once each: no recompute in either


def peak_memory_mib(ac):
    """MiB at the peak of one forward and backward, by kind (MemTracker, through
    tools/bench_activation_checkpoint.py), of a 4-layer MoE LM whose blocks, not the
    readout, hold most of the activations (vocab 256)."""
    bench = load_tool("bench_activation_checkpoint")
    overrides = ["model.d_model=64", "model.n_layers=4", "moe.d_expert=128", "moe.capacity_factor=0", "data.seq_len=64"]
    cfg, model = bench.build("configs/tiny_switch.yaml", ac, overrides, torch.device("cpu"), 256)
    idx = torch.randint(0, 256, (8, 65), generator=torch.Generator().manual_seed(0))
    return bench.peak_memory(bench.step_fn(model, idx, None), model, torch.device("cpu"))


def test_checkpointing_lowers_peak_activation_memory():
    none, full = peak_memory_mib("none"), peak_memory_mib("full")
    # Measured: activations at the peak 8.01 -> 2.82 MiB, total 11.36 -> 7.06 MiB. Left with
    # checkpointing: each block's input, the logits and loss, one block recomputed at a time.
    assert none["param"] == full["param"]
    assert full["act"] < 0.5 * none["act"], (none, full)
    assert full["total"] < none["total"]


EP2 = {
    # Capacity drops (split sizes read in the forward and again in the recompute), expert
    # dropout and aux-loss-free balancing.
    "sigma_moe_capacity": TINY + [
        "model.ffn=sigma_moe", "moe.capacity_factor=1.0", "moe.bias_update_rate=0.01", "moe.expert_dropout=0.1",
        "train.micro_batch_size=4",
    ],
    # MoEUT (2 shared blocks applied 4 times) with SwitchHead's experts sharded over the ep
    # group: all-to-alls inside the attention too; two micro-batches per step.
    "moeut_sharded_attention": TINY + [
        "model.ffn=sigma_moe", "model.attention=switchhead", "model.group_size=2", "model.n_layers=4",
        "model.norm=peri", "moe.capacity_factor=0", "parallel.attention_experts=sharded",
        "attention.bias_update_rate=0.01", "moe.bias_update_rate=0.01", "train.micro_batch_size=2",
        "train.grad_accum_steps=2",
    ],
}  # fmt: skip


@pytest.mark.parametrize("case", list(EP2))
def test_ep2_training_is_bit_identical(case, tmp_path):
    """2 processes, ep=2, 4 steps with and without checkpointing: the same losses, gradient
    norms, validation loss and traffic windows to the last bit."""
    base = EP2[case] + [
        "train.max_steps=4", "train.eval_every=2", "checkpoint.every=0", "parallel.ep=2", "logging.moe_stats_every=2",
    ]  # fmt: skip
    runs = {}
    for ac in ("none", "full"):
        run_dir = tmp_path / ac
        p = run_train(2, [*base, f"run.dir={run_dir}", f"train.activation_checkpoint={ac}"])
        assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
        layers = 4 if case.startswith("moeut") else 2
        assert (f"train.activation_checkpoint=full: {layers} block application(s)" in p.stdout) == (ac == "full")
        # The recomputes happened: layers x micro-batches x 4 steps (1 or 2 micro-batches).
        reruns = layers * (2 if case.startswith("moeut") else 1) * 4
        assert (f"full: {reruns} block forward(s) ran again in the backward" in p.stdout) == (ac == "full")
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            runs[ac] = [json.loads(line) for line in f]
    keep = ("step", "loss", "lm_loss", "aux_loss", "grad_norm", "val_loss")
    strip = [[{k: r[k] for k in keep if k in r} for r in runs[ac]] for ac in ("none", "full")]
    assert strip[0] == strip[1] and len(strip[0]) >= 4
    # The traffic windows: the same drops and loads (the recompute's statistics are discarded).
    stats = ("dropped_frac", "max_imbalance", "dead_experts", "load_entropy_ffn", "load_entropy_attn")
    windows = [[{k: r[k] for k in stats if k in r} for r in runs[ac] if "dropped_frac" in r] for ac in ("none", "full")]
    assert windows[0] == windows[1] and len(windows[0]) == 2
    assert all((w["dropped_frac"] > 0) == (case == "sigma_moe_capacity") for w in windows[0])


class FloatScatterAdds(TorchDispatchMode):
    """Records the ops that add floats into a tensor through indices: on CUDA they use
    atomics, whose order, and so whose rounding, changes from run to run."""

    ACCUMULATING = {"index_add", "index_add_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_",
                    "index_reduce", "index_reduce_", "put_"}  # fmt: skip
    PUT = {"index_put", "index_put_", "_index_put_impl_"}  # accumulate=True adds

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        accumulate = name in self.ACCUMULATING or (
            name in self.PUT and (kwargs or {}).get("accumulate", args[3] if len(args) > 3 else False)
        )
        if accumulate and isinstance(out, torch.Tensor) and out.is_floating_point():
            self.found.append(name)
        return out


@pytest.mark.parametrize("attention", ["switchhead", "mha"])
def test_attention_output_adds_no_floats_through_indices(attention):
    """In a block, the FFN router reads x + attention(x). The block's input is kept exactly,
    so the recompute routes as the forward did if the attention's output repeats bit for
    bit. On a GPU it does only without float atomics: SwitchHead used index_add to combine
    its experts' rows (this test's check then read ['index_add', 'index_add'])."""
    torch.manual_seed(0)
    args = (32, 4, 8, 16, True, 10000.0, 0.0)
    if attention == "switchhead":
        module = SwitchHeadAttention(*args, AttentionConfig(num_experts=3, top_k=2), backend="torch")
        module.reset_parameters(0.1, 0.1)
    else:
        module = CausalSelfAttention(*args)
    x = torch.randn(2, 16, 32, requires_grad=True)
    with FloatScatterAdds() as mode:
        out = module(x, x)
    y = out[0] if isinstance(out, tuple) else out
    assert mode.found == [] and y.shape == (2, 16, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CPU adds in one order anyway")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_switchhead_output_repeats_bit_for_bit_on_cuda(backend):
    """What the recompute's routing relies on, where atomics exist: under bf16 autocast on
    a GPU, as training runs it, the SwitchHead attention's output is the same to the last
    bit call after call, and bf16 (CUDA autocast sums in fp32: sum_slots casts back)."""
    torch.manual_seed(0)
    args = (256, 4, 64, 512, True, 10000.0, 0.0)
    module = SwitchHeadAttention(*args, AttentionConfig(num_experts=4, top_k=2), backend=backend)
    module.reset_parameters(0.02, 0.02)
    module = module.cuda()
    x = torch.randn(4, 512, 256, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        outs = [module(x, x)[0] for _ in range(5)]
    assert outs[0].dtype == torch.bfloat16
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_activation_checkpointing_is_not_a_must_match_key():
    """It changes what is kept for the backward, not the model: a checkpoint written with
    one value resumes with the other (no train.* key must match, this guards that)."""
    from moe_dist.trainer.trainer import _backend_diff, _config_diff

    old = load_config("configs/tiny_switch.yaml").to_dict()
    new = load_config("configs/tiny_switch.yaml", ["train.activation_checkpoint=full"]).to_dict()
    assert old != new and _config_diff(old, new) == [] and _backend_diff(old, new) == []

"""torch.compile: routed blocks trace without graph breaks where nothing syncs the host
(dropless, one process, bf16 torch._grouped_mm), give the eager numbers compiled, share one
graph per block structure, and train.compile trains as eager does. The tests compile with
the aot_eager backend (AOTAutograd without inductor's code generation: the same graphs, in
seconds) or a backend that counts the graphs."""

import json

import pytest
import torch

from conftest import TINY
from moe_dist.config import load_config
from moe_dist.errors import ConfigError
from moe_dist.models.transformer import LM, lm_loss
from moe_dist.moe.dispatch import expert_counts

# No torch._dynamo or trainer import at module level: both load triton compiled, and at
# collection, before tests/test_kernels.py sets TRITON_INTERPRET, that would send all of its
# interpreter tests to their fresh-process fallback. torch._dynamo loads on first use.


def test_importing_moe_dist_loads_neither_dynamo_nor_triton():
    """torch._dynamo (and with it triton) costs 1.6 s of every process's start, and once
    triton is loaded compiled, tests/test_kernels.py can no longer interpret its kernels in
    this process. Only compiling (train.compile) or the Triton backend may load them."""
    import subprocess
    import sys

    code = ("import sys, moe_dist.train, moe_dist.trainer.trainer, moe_dist.models.transformer, "
            "moe_dist.ops.grouped_mm; print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts and ends with an empty compile cache: no test's graphs count toward
    another's recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_expert_counts_under_compile_equal_bincount():
    # torch.compile's default mode (train.compile's) breaks the graph at bincount.
    explained = torch._dynamo.explain(expert_counts)(torch.tensor([3, 0]), 7)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    counted = torch.compile(expert_counts, backend="eager", dynamic=False)
    ids = torch.tensor([[3, 0], [3, 3], [0, 5]])  # experts 1, 2, 4, 6 get none
    assert counted(ids, 7).tolist() == [2, 0, 0, 3, 0, 1, 0]
    ids = torch.randint(0, 11, (300, 2), generator=torch.Generator().manual_seed(0))
    assert torch.equal(counted(ids, 11), torch.bincount(ids.reshape(-1), minlength=11))
    assert torch.equal(expert_counts(ids, 11), torch.bincount(ids.reshape(-1), minlength=11))


# Dropless, no slice dropout: nothing in these blocks needs a host sync. No random draws
# either (expert dropout), so compiled and eager see the same numbers.
DROPLESS = {
    "tiny_switch": ["moe.capacity_factor=0"],
    "tiny_sigma_moe": ["moe.expert_dropout=0"],  # its random draws differ compiled
    "tiny_switchhead": [],
    "tiny_moeut": [],
    "tiny_slicemoe": ["moe.slice_dropout=0"],
}


def _block_and_input(config, extra, dtype):
    cfg = load_config(f"configs/{config}.yaml", ["model.d_model=64", "data.seq_len=16", "model.dropout=0"] + extra)
    torch.manual_seed(0)
    model = LM(cfg, 64).to(dtype)
    block = model.blocks[-1]  # a routed FFN block in every config here
    x = torch.randn(2, 16, 64, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return block, x


def _run(block, x, *noise):
    xi = x.clone().requires_grad_()
    y, auxes = block(xi, *noise)
    loss = y.float().square().mean() + sum(a.loss for a in auxes)
    loss.backward()
    grads = [p.grad.clone() for p in block.parameters() if p.grad is not None]
    block.zero_grad(set_to_none=True)
    counts = [a.tokens_per_expert for a in auxes]
    return y.detach(), xi.grad, grads, counts, [a.terms for a in auxes]


@pytest.mark.parametrize("config", list(DROPLESS))
def test_dropless_routed_block_compiles_to_one_graph_with_eager_numbers(config):
    # bf16: the dtype whose torch._grouped_mm torch.compile can trace (its meta kernel).
    block, x = _block_and_input(config, DROPLESS[config], torch.bfloat16)
    eager = _run(block, x)
    # Routing, top-k, the balancing statistics (expert_counts), dispatch and the grouped
    # matmuls in one graph. explain() reports the breaks of torch.compile's default mode,
    # train.compile's; fullgraph=True would hide some (it captures data-dependent shapes).
    explained = torch._dynamo.explain(block)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager")
    got = _run(compiled, x)
    torch.testing.assert_close(got[0], eager[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], eager[1], rtol=0, atol=0)
    assert len(got[2]) == len(eager[2]) > 0
    for g, e in zip(got[2], eager[2]):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    for g, e in zip(got[3], eager[3]):
        assert torch.equal(g, e)
    for g, e in zip(got[4], eager[4]):
        assert g.keys() == e.keys()
        for key in g:
            torch.testing.assert_close(g[key], e[key], rtol=0, atol=0)


# Expert dropout (sigma-MoE), and expert plus cross-slice dropout (SliceMoE), dropless.
ROUTING_NOISE = {
    "tiny_sigma_moe": ["moe.expert_dropout=0.3"],
    "tiny_slicemoe": ["moe.capacity_factor=0", "moe.expert_dropout=0.1", "moe.slice_dropout=0.3"],
}


@pytest.mark.parametrize("config", list(ROUTING_NOISE))
def test_routing_noise_gives_eager_masks_compiled_in_one_graph(config):
    """torch.rand draws other numbers in a compiled graph than in eager; the routing noise
    (moe/noise.py) is a hash of the global row, so compiled blocks drop exactly the eager
    ones. The key and first row are tensors: other depths, steps and rows reuse the graph."""
    from moe_dist.moe.noise import noise_for, step_keys

    block, x = _block_and_input(config, ROUTING_NOISE[config], torch.bfloat16)
    noise_L2 = noise_for(step_keys(0, 3, 4), 64, torch.device("cpu"))
    eager = _run(block, x, noise_L2[0])
    assert not torch.equal(eager[0], _run(block, x, noise_L2[1])[0])  # another depth's masks
    explained = torch._dynamo.explain(block)(x, noise_L2[0])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(block, backend=counting)
    got = _run(compiled, x, noise_L2[0])
    for g, e in zip(got[:2] + tuple(got[2]), eager[:2] + tuple(eager[2]), strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for noise_2 in (noise_L2[1], noise_for(step_keys(0, 4, 1), 96, torch.device("cpu"))[0]):
            torch.testing.assert_close(_run(compiled, x, noise_2)[0], _run(block, x, noise_2)[0], rtol=0, atol=0)
    assert len(graphs) == 1  # captured once, for every key and row


# Half the assignments over capacity; SliceMoE's experts have biases, so its dropped rows
# must be zeroed after the experts, not only weighted by 0.
CAPACITY = {
    "tiny_switch": ["moe.capacity_factor=0.5"],
    "tiny_slicemoe": ["moe.capacity_factor=0.5", "moe.slice_dropout=0"],
}


@pytest.mark.parametrize("config", list(CAPACITY))
def test_capacity_drops_compile_to_one_graph_with_eager_numbers(config, monkeypatch):
    """On CPU, eager leaves dropped assignments out, sizing the dispatch by the kept count
    (nonzero, a host sync, a graph break). Compiled at ep=1 the layer computes them with no
    output (moe/dispatch.py): one graph; the same drop and kept-per-expert counts; and the
    numbers of the same computation in eager, bit for bit. That computation equals leaving
    them out: tests/test_moe_layer.py test_computed_drops_equal_left_out_drops*."""
    import moe_dist.moe.dispatch as dispatch

    block, x = _block_and_input(config, CAPACITY[config], torch.bfloat16)

    def run(b):
        xi = x.clone().requires_grad_()
        y, auxes = b(xi)
        (y.float().square().mean() + sum(a.loss for a in auxes)).backward()
        grads = [p.grad.clone() for p in block.parameters() if p.grad is not None]
        block.zero_grad(set_to_none=True)
        return y.detach(), xi.grad, grads, [(a.dropped.item(), a.kept_per_expert.tolist(), a.assignments) for a in auxes]

    left_out = run(block)
    ((dropped, kept, assignments),) = left_out[3]
    assert dropped > 0 and sum(kept) + dropped == assignments
    with monkeypatch.context() as m:
        m.setattr(dispatch, "computes_dropped", lambda ep_size, device: True)
        eager = run(block)
    explained = torch._dynamo.explain(block)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    got = run(torch.compile(block, backend="aot_eager"))
    assert got[3] == eager[3] == left_out[3]
    torch.testing.assert_close(got[0], eager[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], eager[1], rtol=0, atol=0)
    assert len(got[2]) == len(eager[2]) > 0
    for g, e in zip(got[2], eager[2]):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    if config == "tiny_slicemoe":  # cross-slice dropout's skipped slices stay in the graph too
        block, x = _block_and_input(config, ["moe.capacity_factor=0.5", "moe.slice_dropout=0.2"], torch.bfloat16)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(block)(x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


# MoEUT: SwitchHead attention and a sigma-MoE FFN, in 2 shared blocks; SliceMoE: the loop
# backend's experts in fp32, which once hit the limit through its own frames.
@pytest.mark.parametrize("config", ["tiny_moeut", "tiny_slicemoe"])
def test_blocks_of_one_structure_share_their_compiled_graphs(config):
    """Ten routed blocks compile like one: nothing in a block guards on the module's
    identity (an id(self) in the layer did, and past dynamo's limit of 8 graphs per code
    object the other blocks ran uncompiled, with only a warning)."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def steps(dtype, extra):
        # d_model 64: SliceMoE's slices of 8 bf16 values are 16-byte rows, as _grouped_mm needs.
        cfg = load_config(f"configs/{config}.yaml", ["model.d_model=64", "data.seq_len=8", "model.n_layers=10",
                                                     "moe.every=1", "model.dropout=0"] + extra)
        torch.manual_seed(0)
        lm = LM(cfg, 32).to(dtype)
        for block in lm.blocks:
            block.compile(backend=counting)
        for _ in range(3):
            idx = torch.randint(0, 32, (2, 8))
            out = lm(idx)
            (lm_loss(out.logits, idx) + out.aux_loss).backward()
        lm.eval()
        with torch.no_grad():
            lm(idx)
        return lm

    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        # Dropless bf16 (the CUDA path): one graph for training, one for evaluation.
        steps(torch.bfloat16, ["moe.capacity_factor=0", "moe.slice_dropout=0", "moe.expert_dropout=0"])
        assert len(graphs) == 2
        # The configs as they are, fp32 on CPU: graph breaks (the loop backend runs
        # uncompiled, and syncs) and recompiles when its counts change, never the limit.
        torch._dynamo.reset()
        graphs.clear()
        steps(torch.float32, [])
        assert 0 < len(graphs) < 40


def test_train_compile_trains_like_eager_and_resumes_either_way(tmp_path):
    from torch._dynamo.utils import counters

    from moe_dist.trainer.trainer import Trainer

    losses, keys = {}, {}
    for mode in ("eager", "compiled"):
        run = tmp_path / mode
        args = TINY + [f"run.dir={run}", "train.max_steps=4", "train.eval_every=2", "checkpoint.every=4"]
        if mode == "compiled":
            args += ["train.compile=true", "train.compile_backend=aot_eager"]
        log = []
        trainer = Trainer(load_config(None, args), log=log.append)
        # Phase timing (on by default) is off under compile: its laps would time the trace.
        assert [b.ffn.ep.timing for b in trainer.model.blocks] == [mode == "eager"] * 2
        counters.clear()
        trainer.fit()
        # The blocks really ran compiled: dynamo captured graphs (none in eager).
        assert (counters["stats"]["unique_graphs"] > 0) == (mode == "compiled")
        keys[mode] = sorted(trainer.model.state_dict())
        trainer.close()
        rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
        losses[mode] = [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]
        if mode == "compiled":
            assert any("train.compile: 2 block(s) compiled with aot_eager" in line for line in log), log
        assert "dropped_frac" in rows[-2]  # the traffic window (step 4) still counts under compile
    assert keys["compiled"] == keys["eager"]
    assert not any("_orig_mod" in k for k in keys["compiled"])
    assert len(losses["compiled"]) == len(losses["eager"]) == 6
    for (s1, l1, v1), (s2, l2, v2) in zip(losses["eager"], losses["compiled"]):
        assert s1 == s2
        assert (l1 is None) == (l2 is None) and (v1 is None) == (v2 is None)
        if l1 is not None:
            assert l2 == pytest.approx(l1, rel=1e-5)
        if v1 is not None:
            assert v2 == pytest.approx(v1, rel=1e-5)
    # A compiled run's checkpoint resumes eagerly, and the other way round.
    resumed = []
    for saved, resume_compiled in (("compiled", False), ("eager", True)):
        args = TINY + [f"run.dir={tmp_path / saved}", "train.max_steps=5", "train.eval_every=0",
                       "checkpoint.every=0", "train.resume=auto", f"train.compile={str(resume_compiled).lower()}",
                       "train.compile_backend=aot_eager"]
        trainer = Trainer(load_config(None, args), log=lambda *_: None)
        assert trainer.step == 4
        trainer.fit()
        trainer.close()
        rows = [json.loads(line) for line in open(tmp_path / saved / "metrics.jsonl")]
        assert [r["step"] for r in rows if "loss" in r][-1] == 5
        resumed.append(rows[-1]["loss"])
    assert resumed[0] == pytest.approx(resumed[1], rel=1e-5)


def test_train_compile_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"train.compile: is a torch-backend option"):
        load_config(None, TINY + ["train.compile=true", "train.backend=deepspeed"])
    with pytest.raises(ConfigError, match=r"train.compile_backend: 'inductr' is not a torch.compile backend"):
        load_config(None, TINY + ["train.compile=true", "train.compile_backend=inductr"])


@pytest.mark.parametrize("balance", [False, True])
def test_compiled_block_under_activation_checkpointing_gives_eager_numbers(balance):
    """A compiled block run through checkpoint_block (train.activation_checkpoint=full, as
    LM.forward calls it): outputs, gradients and balancing counts bit for bit those of the
    eager block without checkpointing, expert dropout's masks included. The recompute
    re-enters the compiled graph; with aux-loss-free balancing on, the graph reads whether
    it is a recompute (BalanceBias.observe), and dynamo captures one more graph for it."""
    from moe_dist.moe.balance import BalanceBias
    from moe_dist.moe.noise import noise_for, step_keys
    from moe_dist.moe.recompute import checkpoint_block

    extra = ["moe.expert_dropout=0.3"] + (["moe.bias_update_rate=0.01"] if balance else [])
    block, x = _block_and_input("tiny_sigma_moe", extra, torch.bfloat16)
    noise_2 = noise_for(step_keys(0, 3, 1), 64, torch.device("cpu"))[0]
    (bias,) = [m for m in block.modules() if isinstance(m, BalanceBias)]

    def run(fn):
        bias.load.zero_()
        return *_run(fn, x, noise_2), bias.load.clone()

    eager = run(block)
    from torch._dynamo.utils import counters

    counters.clear()

    class Checkpointed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return checkpoint_block(self.inner, *args)

    got = run(Checkpointed(torch.compile(block, backend="aot_eager")))
    for g, e in zip(got[:2] + tuple(got[2]), eager[:2] + tuple(eager[2]), strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert torch.equal(got[-1], eager[-1]) and (eager[-1].sum() > 0) == balance
    assert counters["stats"]["unique_graphs"] == (2 if balance else 1)

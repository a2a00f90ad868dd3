"""Expert parallelism on CPU with gloo: every routed layer at ep=2 and ep=4 equals one
process on the same global batch (outputs, losses, statistics, every gradient)."""

import json
import os

import pytest
import torch

from conftest import TINY, HostReads
from dist_utils import run_distributed, run_train
from moe_dist.config import AttentionConfig, MoEConfig
from moe_dist.models.switchhead import SwitchHeadAttention
from moe_dist.moe.aux import total_aux_loss
from moe_dist.moe.experts import is_expert_param
from moe_dist.moe.layer import MoEFFN
from moe_dist.moe.recompute import checkpoint_block
from moe_dist.moe.slice_layer import SliceMoEFFN
from moe_dist.parallel.expert_parallel import ExpertParallel
from moe_dist.parallel.grads import reduce_gradients
from moe_dist.parallel.layout import ParallelLayout, expert_placement

D, B, S = 12, 2, 5
TOL = dict(rtol=1e-9, atol=1e-12)


def make_layer(kind, ep, E, cf):
    """kind: softmax, top1, top1_shared, sigmoid, slice, switchhead; a _seq suffix turns on
    the entropy regulariser per sequence (entropy_scope=sequence)."""
    torch.manual_seed(1)
    scope = "sequence" if kind.endswith("_seq") else "batch"
    kind = kind.removesuffix("_seq")
    if kind == "switchhead":
        att = AttentionConfig(num_experts=E, top_k=2, entropy_loss_weight=0.01, entropy_scope=scope)
        layer = SwitchHeadAttention(D, 2, 6, S, True, 1e4, 0.0, att, "loop", ep=ep)
    else:
        entropy = 0.01 if kind == "sigmoid" or scope == "sequence" else 0.0
        cfg = MoEConfig(
            num_experts=E, top_k=1 if kind.startswith("top1") else 2, d_expert=6, capacity_factor=cf, lb_loss_weight=0.01,
            z_loss_weight=0.001, entropy_loss_weight=entropy, entropy_scope=scope, grouped_mm="loop",
            num_slices=3, slice_router_hidden=8, slice_cap_loss_weight=0.05, num_shared_experts=1 if kind == "top1_shared" else 0,
        )
        if kind == "slice":
            layer = SliceMoEFFN(D, cfg, "relu", ep=ep)
        else:
            layer = MoEFFN(D, cfg, "swiglu", score="sigmoid" if kind == "sigmoid" else "softmax", ep=ep)
    layer = layer.double()
    layer.reset_parameters(0.5, 0.5)
    layer.shard_experts()
    return layer


def num_global_experts(kind, E):
    return 2 * E if kind.startswith("switchhead") else E


def forward(layer, x, setup):
    if setup is not None:
        setup(layer)
    y, aux = layer(x)
    return y, aux if isinstance(aux, list) else [aux]


def _parity_worker(rank, world, ep_size, kind, E, cf, scenario):
    layout = ParallelLayout.build(rank, world, 0, ep_size)
    ep = ExpertParallel(layout)
    ref, layer = make_layer(kind, ExpertParallel(), E, cf), make_layer(kind, ep, E, cf)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(world * B, S, D, generator=g, dtype=torch.float64)
    Gy = torch.randn(world * B, S, D, generator=g, dtype=torch.float64)
    setup = None
    if scenario in ("empty_expert", "empty_rank", "rank_all_dropped"):
        X = X.abs()  # positive inputs: a negative router row means "never chosen"

        def setup(m):
            with torch.no_grad():
                if scenario == "empty_expert":
                    m.router.weight[E - 1] = -5.0  # the last expert gets no token
                elif scenario == "empty_rank":
                    lo = expert_placement(E, 2)[1]
                    m.router.weight[lo:] = -5.0  # experts of ep rank 1 get nothing
                else:
                    m.router.weight.zero_()
                    m.router.weight[0] = 5.0  # everything to expert 0: rank 0's tokens fill it

    rows = slice(rank * B, (rank + 1) * B)
    x_ref = X.clone().requires_grad_()
    y_ref, aux_ref = forward(ref, x_ref, setup)
    ((y_ref * Gy).mean() + total_aux_loss(aux_ref)).backward()
    x = X[rows].clone().requires_grad_()
    y, aux = forward(layer, x, setup)
    ((y * Gy[rows]).mean() + total_aux_loss(aux)).backward()
    reduce_gradients(layer, layout)

    torch.testing.assert_close(y, y_ref[rows], **TOL)
    torch.testing.assert_close(total_aux_loss(aux), total_aux_loss(aux_ref), **TOL)
    for a, r in zip(aux, aux_ref):
        assert torch.equal(a.tokens_per_expert, r.tokens_per_expert)
        assert a.dropped.item() == r.dropped.item() and a.assignments == r.assignments
    if scenario == "empty_expert":
        assert aux[0].tokens_per_expert[E - 1].item() == 0
    if scenario == "empty_rank":  # the case is real: no assignment reaches ep rank 1's experts
        lo = expert_placement(E, 2)[1]
        assert aux[0].tokens_per_expert[lo:].sum().item() == 0 and aux[0].tokens_per_expert[:lo].sum().item() > 0
    if scenario == "rank_all_dropped" and ep.rank == 1:
        assert (y.abs().sum(dim=-1) == 0).all()  # every token of this rank was dropped
    if isinstance(layer, MoEFFN):
        # Communication accounting: bytes to rank j = rows routed to j's experts (D in) +
        # rows j routed to ours, returned (D out), float64; from the one-process routing.
        with torch.no_grad():
            expert_TK, _, keep_TK, _, _ = ref.route(X.view(-1, D))
        starts = expert_placement(E, ep.size)
        owner_TK = torch.bucketize(expert_TK, torch.tensor(starts[1:-1]), right=True)
        src_TK = (torch.arange(expert_TK.shape[0]) // (B * S) % ep.size).unsqueeze(1).expand_as(expert_TK)
        group = torch.arange(expert_TK.shape[0]) // (B * S) // ep.size == rank // ep.size
        mine = group.unsqueeze(1) & keep_TK
        want = [
            int(((src_TK == ep.rank) & (owner_TK == j) & mine).sum() + ((src_TK == j) & (owner_TK == ep.rank) & mine).sum()) * D * 8
            for j in range(ep.size)
        ]
        assert aux[0].sent_bytes == want, (aux[0].sent_bytes, want)
    # The local input gradient is world x the global one (each rank's loss is its mean).
    torch.testing.assert_close(x.grad / world, x_ref.grad[rows], **TOL)
    ref_params = dict(ref.named_parameters())
    lo, hi = ep.local_range(num_global_experts(kind, E))
    for name, p in layer.named_parameters():
        want = ref_params[name].grad
        if is_expert_param(p):
            want = want[lo:hi]
        torch.testing.assert_close(p.grad, want, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "kind, E, cf",
    [("softmax", 6, 1.0), ("softmax", 5, None), ("top1_shared", 7, 1.25), ("sigmoid", 6, None), ("slice", 5, 0.9), ("switchhead", 3, None)],
)
@pytest.mark.parametrize("world", [2, 4])
def test_layer_parity_with_one_process(kind, E, cf, world):
    run_distributed(_parity_worker, world, world, kind, E, cf, None)


@pytest.mark.parametrize("kind, E", [("sigmoid_seq", 6), ("slice_seq", 5), ("switchhead_seq", 3)])
def test_per_sequence_entropy_parity_with_one_process(kind, E):
    """entropy_scope=sequence: each rank's sequences, averaged over the global batch through
    one all-reduce with autograd; loss and every gradient equal one process's."""
    run_distributed(_parity_worker, 2, 2, kind, E, None, None)


@pytest.mark.parametrize("scenario", ["empty_expert", "empty_rank", "rank_all_dropped"])
def test_edge_cases(scenario):
    cf = 1.0 if scenario == "rank_all_dropped" else None
    run_distributed(_parity_worker, 2, 2, "top1" if scenario == "rank_all_dropped" else "softmax", 6, cf, scenario)


def test_dp_times_ep_layout():
    """world 4 = dp 2 x ep 2: expert grads reduced over the expert-data-parallel group."""
    run_distributed(_parity_worker, 4, 2, "softmax", 5, None, None)


def test_uneven_placement():
    assert expert_placement(387, 4) == [0, 97, 194, 291, 387]  # 97/97/97/96
    assert expert_placement(6, 4) == [0, 2, 4, 5, 6]
    from moe_dist.errors import LaunchError

    with pytest.raises(LaunchError, match="3 experts cannot be sharded over parallel.ep=4 ranks"):
        expert_placement(3, 4)


def _capacity_worker(rank, world):
    """Capacity over the ep group: exactly the one-process drops, rank order = batch order."""
    layout = ParallelLayout.build(rank, world, 0, world)
    ep = ExpertParallel(layout)
    g = torch.Generator().manual_seed(5)
    expert_global = torch.randint(0, 4, (world * 6, 2), generator=g)
    expert_global[:, 1] = (expert_global[:, 0] + 1 + torch.randint(0, 3, (world * 6,), generator=g)) % 4
    want = ExpertParallel().capacity_mask(expert_global, 4, 0.75)
    got = ep.capacity_mask(expert_global[rank * 6 : (rank + 1) * 6], 4, 0.75)
    assert torch.equal(got, want[rank * 6 : (rank + 1) * 6])
    assert (~want).sum() > 0  # the case has drops
    # Assignments that will not be computed (cross-slice dropout) take no slot.
    active = torch.rand(world * 6, 2, generator=g) > 0.3
    want = ExpertParallel().capacity_mask(expert_global, 4, 0.75, active)
    got = ep.capacity_mask(expert_global[rank * 6 : (rank + 1) * 6], 4, 0.75, active[rank * 6 : (rank + 1) * 6])
    assert torch.equal(got, want[rank * 6 : (rank + 1) * 6])
    assert not (want & ~active).any()


def test_capacity_matches_one_process():
    run_distributed(_capacity_worker, 4)


def _unequal_rows_worker(rank, world, kind):
    """Ranks with different batch sizes (3 and 1 sequences; rank 1 also tries 0): capacity,
    drops and every aux loss still equal one process on the concatenated batch, because the
    row count travels with the statistics instead of being assumed equal."""
    layout = ParallelLayout.build(rank, world, 0, world)
    ref, layer = make_layer(kind, ExpertParallel(), 4, 0.75), make_layer(kind, ExpertParallel(layout), 4, 0.75)
    X = torch.randn(4, S, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for sizes in ((3, 1), (4, 0)):
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        y_ref, aux_ref = forward(ref, X, None)
        y, aux = forward(layer, X[rows], None)
        torch.testing.assert_close(y, y_ref[rows], **TOL)
        torch.testing.assert_close(total_aux_loss(aux), total_aux_loss(aux_ref), **TOL)
        assert torch.equal(aux[0].tokens_per_expert, aux_ref[0].tokens_per_expert)
        assert aux[0].dropped.item() == aux_ref[0].dropped.item() > 0, sizes


@pytest.mark.parametrize("kind", ["softmax", "slice"])
def test_unequal_batches_across_ranks(kind):
    run_distributed(_unequal_rows_worker, 2, kind)


def _host_reads_worker(rank, world, kind, recompute=False):
    """A capacity-factor layer at ep=2 reads the host once per forward (the all-to-all's
    split sizes, which also say how many of the sorted assignments are kept) and never in
    its backward; its outputs still equal one process's (the parity tests above). Under
    activation checkpointing the backward's recompute reads them once more. On a GPU's
    path: CPU eager counts with bincount, whose host read is free there."""
    import moe_dist.moe.dispatch as dispatch

    dispatch.host_reads_free = lambda device: False  # a forked rank: the change dies with it
    ep = ExpertParallel(ParallelLayout.build(rank, world, 0, world))
    torch.manual_seed(0)
    # fp32 and widths of 16-byte rows: the torch backend (torch._grouped_mm) runs on CPU
    # without reading counts on the host, as on a GPU (the loop backend reads them).
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=8, capacity_factor=1.0, grouped_mm="torch",
                    num_slices=2, slice_router_hidden=8)
    layer = SliceMoEFFN(16, cfg, "relu", ep=ep) if kind == "slice" else MoEFFN(16, cfg, "swiglu", ep=ep)
    layer.shard_experts()
    x = torch.randn(2, 8, 16, requires_grad=True)
    with HostReads() as fwd:
        y, aux = checkpoint_block(layer, x) if recompute else layer(x)
    with HostReads() as bwd:
        y.square().sum().backward()
    assert aux.dropped.item() > 0  # the case has capacity drops
    assert (fwd.reads, bwd.reads) == (["tolist"], ["tolist"] if recompute else []), (fwd.reads, bwd.reads)


@pytest.mark.parametrize("kind, recompute", [("token", False), ("slice", False), ("token", True)])
def test_capacity_layer_reads_the_host_once_at_ep2(kind, recompute):
    run_distributed(_host_reads_worker, 2, kind, recompute)


# ----------------------------------------------------------------------------- training


def torchrun(nproc, run_dir, *overrides, steps=10, env=None):
    args = TINY + [
        f"run.dir={run_dir}", f"train.max_steps={steps}", "train.eval_every=5", "checkpoint.every=5",
        "data.rank_split=batch", "moe.capacity_factor=1.0", "model.attention=switchhead", "model.n_heads=2",
        "attention.num_experts=3", *overrides,
    ]
    return run_train(nproc, args, env=None if env is None else dict(os.environ, **env))  # as torchrun runs it


def losses(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r.get("loss"), r.get("lm_loss"), r.get("aux_loss"), r.get("val_loss")) for r in rows]


def test_training_ep2_matches_ep1(tmp_path):
    """Ten steps at ep=2 (2 processes) give the losses of one process on the same global batch."""
    one = torchrun(1, tmp_path / "ep1", "train.micro_batch_size=8", "logging.moe_stats_every=5")
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, tmp_path / "ep2", "train.micro_batch_size=4", "parallel.ep=2", "parallel.attention_experts=sharded",
                   "logging.moe_stats_every=5")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "ep1"), losses(tmp_path / "ep2")
    assert [r[0] for r in a] == [r[0] for r in b] and len([r for r in a if r[1] is not None]) == 10
    for ra, rb in zip(a, b):
        for va, vb in zip(ra[1:], rb[1:]):
            assert (va is None) == (vb is None)
            if va is not None:
                assert abs(va - vb) <= 1e-5 * max(1.0, abs(va)), (ra, rb)
    check_traffic(tmp_path / "ep1", tmp_path / "ep2")
    # Both ranks wrote DCP data (each its experts) and their extras.
    assert sorted(os.listdir(tmp_path / "ep2" / "checkpoints" / "step_00000010")) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "config.yaml", "extra_rank00000.pt", "extra_rank00001.pt",
        "meta.json"]


def test_training_with_routing_dropout_at_ep2_matches_one_process(tmp_path):
    """Expert and cross-slice dropout draw from a hash of the global row (moe/noise.py): at
    ep=2 on 2 processes the masks, and so the losses, are one process's on the same global
    batch. (They drew from each rank's torch stream before: an audit measured losses 3.4e-3
    to 7.1e-3 apart after 4 steps.) Two micro-batches per step draw the same masks too, so
    step 1 agrees; after it the runs part, as they do without dropout (by 3e-4 at step 4
    for sigma-MoE), because the balancing losses are per micro-batch. SliceMoE with both
    dropouts: the token MoE's expert dropout goes through the same trainer and model path
    (its masks in a split batch: tests/test_noise.py)."""
    common = ["model.ffn=slice_moe", "moe.num_slices=4", "moe.slice_dropout=0.3", "moe.expert_dropout=0.1",
              "model.dropout=0", "train.eval_every=0", "checkpoint.every=0"]
    runs = {
        "one": (1, ["train.micro_batch_size=8"]),
        "ep2": (2, ["train.micro_batch_size=4", "parallel.ep=2"]),
        "accum": (1, ["train.micro_batch_size=4", "train.grad_accum_steps=2"]),
    }
    got = {}
    for name, (nproc, extra) in runs.items():
        p = torchrun(nproc, tmp_path / name, *common, *extra, steps=4)
        assert p.returncode == 0, p.stderr[-3000:]
        got[name] = [r for r in losses(tmp_path / name) if r[1] is not None]
    assert [r[0] for r in got["one"]] == [1, 2, 3, 4]
    for name, steps in (("ep2", 4), ("accum", 1)):
        for ra, rb in zip(got["one"][:steps], got[name][:steps], strict=True):
            for va, vb in zip(ra[1:4], rb[1:4]):  # loss, lm_loss, aux_loss
                assert abs(va - vb) <= 1e-5 * max(1.0, abs(va)), (name, ra, rb)


def check_traffic(ep1, ep2):
    """The traffic windows of both runs: the same per-expert counts and drops (the global batch
    is the same); at ep=2 every computed assignment crossed the rank x rank matrix once out
    (D_in wide) and once back (D_out wide), float32."""
    from test_traffic import events

    a, b = events(ep1), events(ep2)
    d, dh = 32, 16  # model.d_model, head_dim
    widths = {"ffn": (d, d), "attn_src": (d, dh), "attn_dst": (dh, d)}
    labels = [t.split("/")[1] for t in a.Tags()["histograms"] if t.endswith("/tokens_per_expert")]
    assert sorted(labels) == [f"L{i:02d}_{n}" for i in range(2) for n in ("attn_dst", "attn_src", "ffn")]
    assert not [t for t in a.Tags()["histograms"] if t.endswith("a2a_bytes")]  # one process: no traffic
    for label in labels:
        ha, hb = (x.Histograms(f"moe/{label}/tokens_per_expert") for x in (a, b))
        assert [h.step for h in ha] == [h.step for h in hb] == [5, 10]
        for x, y in zip(ha, hb):
            assert list(x.histogram_value.bucket) == list(y.histogram_value.bucket), label
        for key in ("dropped", "imbalance") + (("capacity_overflow",) if label.endswith("ffn") else ()):
            assert [e.value for e in a.Scalars(f"moe/{label}/{key}")] == [e.value for e in b.Scalars(f"moe/{label}/{key}")]
        w_in, w_out = widths[label.split("_", 1)[1]]
        for kept, matrix in zip(hb, b.Histograms(f"moe/{label}/a2a_bytes")):
            assert len(matrix.histogram_value.bucket) == 4  # 2 x 2 ranks
            per_step = sum(matrix.histogram_value.bucket)
            assert per_step * 5 == pytest.approx(sum(kept.histogram_value.bucket) * (w_in + w_out) * 4, rel=1e-12), label


def test_four_processes_train_and_resume(tmp_path):
    """4 processes at ep=4, each reading its own shards: rank 1 dies after step 7, the job
    resumes from step 5 and repeats steps 6-8 of an uninterrupted run bit for bit."""
    args = ["parallel.ep=4", "train.micro_batch_size=2", "data.rank_split=shards", "parallel.timeout_s=20"]
    p = torchrun(4, tmp_path / "ref", *args, steps=8)
    assert p.returncode == 0, p.stderr[-3000:]
    ref = losses(tmp_path / "ref")
    train = [r for r in ref if r[1] is not None]
    assert len(train) == 8 and train[-1][2] < train[0][2]
    run = tmp_path / "ep4"
    p = torchrun(4, run, *args, steps=8, env={"MOE_DIST_FAULT": "kill_rank:1:7"})
    assert p.returncode != 0
    p = torchrun(4, run, *args, "train.resume=auto", steps=8)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step_00000005 (step 5)" in p.stdout
    assert [r for r in losses(run) if r[0] > 5] == [r for r in ref if r[0] > 5]


def test_ep_not_dividing_world_is_an_error(tmp_path):
    p = torchrun(2, tmp_path / "bad", "parallel.ep=3")
    assert p.returncode != 0
    assert "error: parallel.ep=3 does not divide the world size WORLD_SIZE=2" in p.stderr


def _lm_parity_worker(rank, world, overrides):
    """A whole MoEUT model (shared groups applied twice, SwitchHead + sigma-MoE, capacity)
    at ep=world against one process on the global batch: loss and every gradient."""
    from moe_dist.config import load_config
    from moe_dist.models.transformer import LM, lm_loss

    cfg = load_config(None, [
        "model.d_model=16", "model.n_layers=4", "model.group_size=2", "model.n_heads=2", "model.head_dim=8",
        "model.norm=peri", "model.attention=switchhead", "model.ffn=sigma_moe", "moe.num_experts=7", "moe.top_k=2",
        "moe.d_expert=8", "moe.capacity_factor=1.0", "moe.entropy_loss_weight=0.01", "attention.num_experts=3",
        "attention.entropy_loss_weight=0.01", "data.seq_len=8", "moe.grouped_mm=loop", f"parallel.ep={world}",
        *overrides,
    ])
    layout = ParallelLayout.build(rank, world, 0, world)
    torch.manual_seed(0)
    ref = LM(cfg, 40).double()
    torch.manual_seed(0)
    model = LM(cfg, 40, layout).double()
    idx = torch.randint(0, 40, (world * 2, 9), generator=torch.Generator().manual_seed(3))
    out_ref = ref(idx[:, :-1])
    (lm_loss(out_ref.logits, idx[:, 1:]) + out_ref.aux_loss).backward()
    mine = idx[rank * 2 : (rank + 1) * 2]
    out = model(mine[:, :-1])
    loss = lm_loss(out.logits, mine[:, 1:]) + out.aux_loss
    loss.backward()
    reduce_gradients(model, layout)
    assert len(out.moe) == len(out_ref.moe) == 12  # 4 layers x (attn src, attn dst, ffn)
    for a, r in zip(out.moe, out_ref.moe):
        assert torch.equal(a.tokens_per_expert, r.tokens_per_expert) and a.dropped.item() == r.dropped.item()
        torch.testing.assert_close(a.loss, r.loss, **TOL, msg=lambda m: f"{a.label} loss: {m}")
        if r.probs_sum is not None:  # per sequence: this rank's rows of the global batch
            want = r.probs_sum if r.num_sequences is None else r.probs_sum[rank * 2 : (rank + 1) * 2]
            torch.testing.assert_close(a.probs_sum, want, **TOL, msg=lambda m: f"{a.label} probs: {m}")
        torch.testing.assert_close(a.terms, r.terms, **TOL)
    torch.testing.assert_close(out.aux_loss, out_ref.aux_loss, **TOL)
    ref_params = dict(ref.named_parameters())
    n_sharded = 0
    for name, p in model.named_parameters():
        want = ref_params[name].grad
        if is_expert_param(p):
            n_sharded += 1
            want = want[slice(*model.ep.local_range(want.shape[0]))]
        torch.testing.assert_close(p.grad, want, **TOL, msg=lambda m: f"{name}: {m}")
    sharded = cfg.parallel.attention_experts == "sharded"
    assert n_sharded == 2 * (2 + (2 if sharded else 0))  # per distinct block: FFN in/out (+ V, O)


@pytest.mark.parametrize("placement, scope", [("sharded", "batch"), ("replicated", "batch"), ("sharded", "sequence")])
def test_moeut_model_parity(placement, scope):
    run_distributed(_lm_parity_worker, 2, [f"parallel.attention_experts={placement}", f"moe.entropy_scope={scope}",
                                           f"attention.entropy_scope={scope}"])

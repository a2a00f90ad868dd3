"""Expert traffic in TensorBoard: counts, bytes and timings read back from the event files,
the custom-scalars layout through a real TensorBoard server, and tools/traffic_report.py.
(ep=2 against ep=1 on the same global batch: test_expert_parallel.py.)"""

import json
import math
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import REPO, TINY
from dist_utils import free_port, run_distributed
from moe_dist.config import load_config
from moe_dist.errors import ConfigError
from moe_dist.trainer.traffic import CallStats
from moe_dist.trainer.trainer import Trainer

STEPS, EVERY, ACCUM = 6, 3, 2
TOKENS = 4 * 32  # micro_batch_size x seq_len


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def train(run_dir, *overrides):
    cfg = load_config(None, TINY + [
        f"run.dir={run_dir}", f"train.max_steps={STEPS}", "train.eval_every=0", "checkpoint.every=0",
        "checkpoint.save_final=false", f"logging.moe_stats_every={EVERY}", f"train.grad_accum_steps={ACCUM}", *overrides,
    ])
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.fit()
    trainer.close()
    return run_dir


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """Switch top-2 with capacity 1.0 (drops happen) and aux-loss-free bias."""
    return train(tmp_path_factory.mktemp("traffic") / "run", "moe.capacity_factor=1.0", "moe.bias_update_rate=0.01")


def test_counts_sum_to_assignments_minus_drops(moe_run):
    ea = events(moe_run)
    rows = {r["step"]: r for r in map(json.loads, open(moe_run / "metrics.jsonl"))}
    assigned = TOKENS * 2 * ACCUM * EVERY  # tokens x top-2 x micro-batches x steps per window
    total_dropped = {EVERY: 0, 2 * EVERY: 0}
    for label in ("L00_ffn", "L01_ffn"):
        hist = ea.Histograms(f"moe/{label}/tokens_per_expert")
        dropped = ea.Scalars(f"moe/{label}/dropped")
        assert [h.step for h in hist] == [d.step for d in dropped] == [EVERY, 2 * EVERY]
        for h, d, frac in zip(hist, dropped, ea.Scalars(f"moe/{label}/dropped_frac")):
            kept = np.asarray(h.histogram_value.bucket)
            assert len(kept) == 4 and kept.sum() + d.value == assigned
            assert frac.value == pytest.approx(d.value / assigned)
            total_dropped[h.step] += d.value
    assert sum(total_dropped.values()) > 0  # capacity 1.0 did drop: the check above is not vacuous
    # metrics.jsonl carries the window summary at the window steps only (no per-step sync).
    for step, dropped in total_dropped.items():
        assert rows[step]["dropped_frac"] == pytest.approx(dropped / (2 * assigned))
    assert "dropped_frac" not in rows[1] and "dropped_frac" not in rows[EVERY + 1]


def test_window_scalars_images_and_layout(moe_run):
    ea = events(moe_run)
    scalars = set(ea.Tags()["scalars"])
    for key in ("imbalance", "capacity_overflow", "router_entropy", "usage_perplexity", "load_entropy",
                "dead_experts", "aux/switch_lb", "aux/z_loss", "bias_spread", "time_ms/compute", "time_ms_max/dispatch"):
        assert f"moe/L00_ffn/{key}" in scalars, key
    for tag in ("perf/tokens_per_s", "perf/model_tflops"):
        assert len(ea.Scalars(tag)) == 2
    assert "perf/mfu" not in scalars  # CPU: no known peak, no made-up MFU
    entropy = ea.Scalars("moe/L00_ffn/router_entropy")[0].value
    assert 0 < entropy <= math.log(4) + 1e-6
    perplexity = ea.Scalars("moe/L00_ffn/usage_perplexity")[0].value
    assert 1 <= perplexity <= 4
    assert ea.Scalars("moe/L00_ffn/load_entropy")[0].value == pytest.approx(math.log(perplexity) / math.log(4), rel=1e-5)
    assert ea.Scalars("moe/L00_ffn/time_ms/compute")[0].value > 0
    assert ea.Scalars("moe/L00_ffn/time_ms/all_to_all")[0].value == 0  # one process: no all-to-all
    # Aux-loss-free bias after 3 and 6 updates of +-0.01: a multiple of 0.01 (here it
    # oscillates between +-0.01 and 0: spreads 0.02 and 0).
    spreads = [e.value / 0.01 for e in ea.Scalars("moe/L00_ffn/bias_spread")]
    assert max(spreads) > 0 and all(abs(v - round(v)) < 1e-4 for v in spreads), spreads
    assert len(ea.Histograms("moe/L00_ffn/bias")) == 2
    # Layer x expert heatmap: 2 rows x 4 experts of 16-pixel cells.
    from PIL import Image
    import io

    img = Image.open(io.BytesIO(ea.Images("moe/tokens_heatmap")[-1].encoded_image_string))
    assert img.size == (4 * 16, 2 * 16)
    layout = custom_layout(ea)
    titles = [c.title for c in layout.category]
    assert titles[0] == "Experts" and "Experts by layer" in titles and "Experts: time per step (ms)" in titles
    charts = {ch.title: list(ch.multiline.tag) for ch in layout.category[0].chart}
    import re

    pattern = charts["load imbalance (max/mean routed)"][0]
    assert sorted(t for t in scalars if re.match(pattern, t)) == ["moe/L00_ffn/imbalance", "moe/L01_ffn/imbalance"]


def custom_layout(ea):
    from tensorboard.plugins.custom_scalar import layout_pb2

    tensor = ea.Tensors("custom_scalars__config__")[0].tensor_proto
    return layout_pb2.Layout.FromString(tensor.string_val[0])


def test_moeut_repeats_and_switchhead(tmp_path):
    """MoEUT: 2 shared blocks applied twice each; every repeat is its own label, and each
    shared block gets a category holding its repeats."""
    run = train(tmp_path / "moeut", "model.n_layers=4", "model.group_size=2", "model.norm=peri",
                "model.attention=switchhead", "model.ffn=sigma_moe", "moe.capacity_factor=0",
                "moe.entropy_loss_weight=0.01", "attention.num_experts=3", "attention.entropy_loss_weight=0.001",
                "train.max_steps=3", "train.grad_accum_steps=1", "logging.peak_tflops=0.5")
    ea = events(run)
    # A configured peak gives an MFU: model TFLOP/s over it.
    assert ea.Scalars("perf/mfu")[0].value == pytest.approx(ea.Scalars("perf/model_tflops")[0].value / 0.5)
    labels = sorted({t.split("/")[1] for t in ea.Tags()["histograms"] if t.endswith("tokens_per_expert")})
    assert labels == [f"L{d:02d}_{n}" for d in range(4) for n in ("attn_dst", "attn_src", "ffn")]
    src = ea.Histograms("moe/L00_attn_src/tokens_per_expert")[0].histogram_value.bucket
    # SwitchHead: 2 heads x 3 experts, each (token, head) picks top-2, nothing dropped.
    assert len(src) == 6 and sum(src) == TOKENS * 2 * 2 * 3
    assert "moe/L03_ffn/aux/entropy_reg" in ea.Tags()["scalars"]
    assert "moe/L03_ffn/capacity_overflow" not in ea.Tags()["scalars"]  # dropless
    titles = [c.title for c in custom_layout(ea).category]
    assert "Experts: shared block 0 (L00_attn_src, L00_attn_dst, L00_ffn, L02_attn_src, L02_attn_dst, L02_ffn)" in titles


def test_slice_dropout_skips_are_counted(tmp_path):
    """SliceMoE's cross-slice dropout removes assignments from compute: they are counted
    (slice_dropout_frac), so computed + dropped + skipped is still every assignment."""
    run = train(tmp_path / "slice", "model.ffn=slice_moe", "moe.num_slices=2", "moe.slice_router_hidden=8",
                "moe.slice_dropout=0.3", "moe.capacity_factor=1.0", "train.max_steps=3", "train.grad_accum_steps=1")
    ea = events(run)
    assigned = TOKENS * 2 * 2 * EVERY  # tokens x slices x top-2 x steps
    kept = sum(ea.Histograms("moe/L00_ffn/tokens_per_expert")[0].histogram_value.bucket)
    dropped = ea.Scalars("moe/L00_ffn/dropped")[0].value
    skipped = ea.Scalars("moe/L00_ffn/slice_dropout_frac")[0].value * assigned
    assert skipped > 0 and dropped > 0
    assert kept + dropped + round(skipped) == assigned and abs(skipped - round(skipped)) < 1e-3


def test_call_stats_by_hand():
    c = CallStats(label="L00_ffn", block=0, routed=np.array([0, 3, 1, 0]), kept=np.array([0, 2, 1, 0]), dropped=1,
                  skipped=0, assignments=4, capacity=1, calls=2, router_entropy=0.5, terms={}, bias=None,
                  bytes_matrix=None, ms=np.zeros((1, 5)))
    assert c.imbalance == 3.0  # max 3 / mean 1
    assert c.dead_experts == 2
    assert c.dropped_frac == 0.25
    assert c.capacity_overflow == 1.5  # 3 routed to the hottest over 2 calls of capacity 1
    assert c.usage_perplexity == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert c.load_entropy == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4))
    assert c.kind == "ffn"


def test_stats_off_and_bad_interval(tmp_path):
    run = train(tmp_path / "off", "logging.moe_stats_every=0", "train.max_steps=2")
    assert not [t for t in events(run).Tags()["scalars"] if t.startswith("moe/")]
    with pytest.raises(ConfigError, match="logging.moe_stats_every"):
        load_config(None, TINY + ["logging.moe_stats_every=-1"])


def _bytes_worker(rank, world, out_dir):
    """One MoE layer on 4 ranks = dp 2 x ep 2 (5 experts: the ranks of each ep group own 3
    and 2), a window through the monitor and the TensorBoard logger; the world x world bytes
    matrix must equal what the routing implies, zero between ep groups."""
    from moe_dist.config import MoEConfig
    from moe_dist.moe.layer import MoEFFN
    from moe_dist.moe.router import route_topk
    from moe_dist.parallel.expert_parallel import ExpertParallel
    from moe_dist.parallel.layout import ParallelLayout
    from moe_dist.trainer.metrics import MetricsLogger
    from moe_dist.trainer.traffic import TrafficMonitor, set_timing

    layout = ParallelLayout.build(rank, world, 0, ep=2)
    torch.manual_seed(0)
    D, E = 12, 5
    layer = MoEFFN(D, MoEConfig(num_experts=E, top_k=2, d_expert=8, capacity_factor=0), "gelu", ep=ExpertParallel(layout))
    layer.reset_parameters(0.5, 0.5)
    layer.shard_experts()
    set_timing(layer, True)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(rank))
    _, aux = layer(x)
    aux.layer = 0
    monitor = TrafficMonitor(layout, torch.device("cpu"), 1.0, None)
    monitor.observe([aux])
    monitor.end_step(18 * world, 0.1)
    window = monitor.collect(step=1)
    # Expected from the routing alone: each rank's assignments per owner (experts 0-2 on ep
    # index 0, 3-4 on ep index 1); a row goes out with D floats and comes back with D floats.
    expert_TK, _, _ = route_topk(layer.router(x.reshape(-1, D)), 2)
    owner = (expert_TK.reshape(-1) >= 3).long()
    mine = torch.bincount(owner, minlength=2)
    every = [torch.zeros(2, dtype=torch.long) for _ in range(world)]
    dist.all_gather(every, mine)
    # Ranks 2g and 2g+1 form ep group g; ep index = rank % 2.
    want = np.array([[(every[r][j % 2] + every[j][r % 2]).item() * D * 4 if r // 2 == j // 2 else 0
                      for j in range(world)] for r in range(world)], dtype=float)
    got = window.calls[0].bytes_matrix
    assert np.array_equal(got, want), (got, want)
    assert window.calls[0].ms[:, 2].min() > 0  # every rank timed its all-to-alls
    # Capacity compared with world-summed counts: per ep group (36 rows x 2 / 5 experts = 15)
    # times the 2 groups.
    from moe_dist.moe.layer import global_capacity

    assert global_capacity(layer.ep, 18, 2, 5, 1.0) == 30
    if rank == 0:
        logger = MetricsLogger(out_dir, tensorboard=True, resume_step=None)
        logger.log_traffic(window)
        logger.close()
        np.save(os.path.join(out_dir, "want.npy"), want)


def test_bytes_matrix_matches_routing(tmp_path):
    run_distributed(_bytes_worker, 4, str(tmp_path))
    ea = events(tmp_path)
    got = np.asarray(ea.Histograms("moe/L00_ffn/a2a_bytes")[0].histogram_value.bucket).reshape(4, 4)
    want = np.load(tmp_path / "want.npy")
    assert np.array_equal(got, want)
    assert want[0, 1] > 0 and want[1, 0] > 0 and want[2, 3] > 0 and want[3, 2] > 0
    assert not want[:2, 2:].any() and not want[2:, :2].any()  # nothing crosses ep groups
    assert ea.Scalars("moe/L00_ffn/a2a_bytes_per_step")[0].value == want.sum() - np.trace(want)
    assert "moe/L00_ffn/a2a_heatmap" in ea.Tags()["images"]


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_tensorboard_server_serves_experts_dashboard(moe_run):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(moe_run / "tb"), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast=false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}/data/plugin"
    try:
        deadline, layout = time.time() + 90, None
        while time.time() < deadline:
            try:
                layout = _get(f"{base}/custom_scalars/layout")
                if layout.get("category"):
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(1)
        assert layout and layout["category"][0]["title"] == "Experts", layout
        tags = _get(f"{base}/scalars/tags")
        run = next(iter(tags))
        assert "moe/L01_ffn/imbalance" in tags[run]
        served = _get(f"{base}/scalars/scalars?tag=moe/L01_ffn/imbalance&run={run}")
        want = [e.value for e in events(moe_run).Scalars("moe/L01_ffn/imbalance")]
        assert [v[1] for v in served] == [EVERY, 2 * EVERY]  # [wall time, step, value]
        assert [v[2] for v in served] == pytest.approx(want)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_traffic_report(moe_run, tmp_path):
    out = tmp_path / "report.png"
    p = subprocess.run([sys.executable, "tools/traffic_report.py", str(moe_run), "--out", str(out), "--top", "1"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    ea = events(moe_run)
    kept = np.asarray(ea.Histograms("moe/L01_ffn/tokens_per_expert")[-1].histogram_value.bucket)
    hot, cold = int(np.argmax(kept)), int(np.argmin(kept))
    line = next(l for l in p.stdout.splitlines() if l.startswith("L01_ffn"))
    assert line.split()[1:3] == [f"{hot}:", str(int(kept[hot]))] and f"{cold}: {int(kept[cold])}" in line
    assert "imbalance (max/mean) over time:" in p.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run([sys.executable, "tools/traffic_report.py", str(tmp_path / "nope")], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "nope/tb does not exist" in missing.stderr
    # An --out whose directory is missing is refused before the report is built.
    p = subprocess.run([sys.executable, "tools/traffic_report.py", str(moe_run), "--out", str(tmp_path / "nope" / "x.png")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and f"--out {tmp_path / 'nope' / 'x.png'}: its directory does not exist" in p.stderr

"""TensorBoard rendering of a TrafficWindow (trainer/traffic.py): scalars, histograms,
heatmap images, and the custom-scalars "Experts" dashboards.

Tags (per routed call label, e.g. L03_ffn):
  moe/<label>/tokens_per_expert   histogram, bucket e = tokens expert e kept in the window
  moe/<label>/a2a_bytes           histogram, bucket src*world+dst = bytes per step (exact)
  moe/<label>/a2a_heatmap         image of that rank x rank matrix
  moe/<label>/bias                histogram of the aux-loss-free selection biases
  moe/<label>/<scalar>            imbalance, dropped_frac, dropped, capacity_overflow,
                                  router_entropy, usage_perplexity, load_entropy,
                                  dead_experts,
                                  slice_dropout_frac, bias_spread, a2a_bytes_per_step,
                                  aux/<term>, time_ms/<phase>, time_ms_max/<phase>
  moe/tokens_heatmap              image, one row per label, one column per expert
  perf/tokens_per_s, perf/model_tflops, perf/mfu
Histograms are written with one bucket per expert (or per rank pair) so that counts read
back exactly; images are for the eye.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from moe_dist.parallel.phase_timer import PHASES
from moe_dist.trainer.traffic import CallStats, TrafficWindow

# viridis at five stops (matplotlib's colormap data, public domain), linearly interpolated:
# no matplotlib import in the training process.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)

SCALARS = (
    ("imbalance", "load imbalance (max/mean routed)"),
    ("dropped_frac", "dropped fraction (capacity)"),
    ("capacity_overflow", "hottest expert demand / capacity"),
    ("router_entropy", "router entropy (nats per row)"),
    ("usage_perplexity", "expert usage perplexity"),
    ("load_entropy", "normalised expert-load entropy"),
    ("dead_experts", "dead experts (no tokens in window)"),
    ("bias_spread", "aux-loss-free bias max - min"),
    ("a2a_bytes_per_step", "all-to-all bytes per step (off-rank)"),
)


def heatmap_rgb(values: np.ndarray, vmax: Optional[float] = None, cell: int = 8) -> np.ndarray:
    """[rows, cols] -> uint8 HWC image, viridis over [0, vmax]; NaN cells are black."""
    v = np.asarray(values, dtype=np.float64)
    top = vmax if vmax else (np.nanmax(v) if np.isfinite(v).any() else 1.0) or 1.0
    x = np.clip(np.nan_to_num(v, nan=0.0) / top, 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (x - lo)[..., None]
    rgb = _VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac
    rgb[~np.isfinite(v)] = 0.0
    return np.kron(rgb, np.ones((cell, cell, 1))).astype(np.uint8)


def load_over_mean(counts: list[np.ndarray]) -> np.ndarray:
    """[layers, max E]: each layer's per-expert counts over that layer's mean (NaN-padded where
    a layer has fewer experts): the layer x expert heatmap, shared by tools/traffic_report.py."""
    grid = np.full((len(counts), max(len(c) for c in counts)), np.nan)
    for i, c in enumerate(counts):
        mean = c.mean()
        grid[i, : len(c)] = c / mean if mean > 0 else 0.0
    return grid


def _cell(n: int) -> int:
    return max(2, min(16, 256 // max(n, 1)))


def _bucket_histogram(tb, tag: str, values: np.ndarray, step: int) -> None:
    """A histogram whose bucket i holds values[i]: exact per-bucket numbers in TensorBoard."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    idx = np.arange(len(v))
    tb.add_histogram_raw(
        tag, min=0.0, max=float(len(v) - 1), num=int(round(v.sum())), sum=float((idx * v).sum()),
        sum_squares=float((idx**2 * v).sum()), bucket_limits=[i + 0.5 for i in idx], bucket_counts=v.tolist(),
        global_step=step,
    )


def call_scalars(c: CallStats) -> dict[str, float]:
    out = {
        "imbalance": c.imbalance,
        "dropped_frac": c.dropped_frac,
        "dropped": float(c.dropped),
        "router_entropy": c.router_entropy,
        "usage_perplexity": c.usage_perplexity,
        "load_entropy": c.load_entropy,
        "dead_experts": float(c.dead_experts),
    }
    if c.capacity_overflow is not None:
        out["capacity_overflow"] = c.capacity_overflow
    if c.skipped:
        out["slice_dropout_frac"] = c.skipped / c.assignments
    if c.bias is not None:
        out["bias_spread"] = float(c.bias.max() - c.bias.min())
    if c.bytes_matrix is not None:
        out["a2a_bytes_per_step"] = float(c.bytes_matrix.sum() - np.trace(c.bytes_matrix))
    out.update({f"aux/{k}": v for k, v in c.terms.items()})
    if c.ms.any():
        for i, phase in enumerate(PHASES):
            out[f"time_ms/{phase}"] = float(c.ms[:, i].mean())
            out[f"time_ms_max/{phase}"] = float(c.ms[:, i].max())
    return out


def log_window(tb, w: TrafficWindow) -> None:
    step = w.step
    for c in w.calls:
        base = f"moe/{c.label}"
        _bucket_histogram(tb, f"{base}/tokens_per_expert", c.kept, step)
        for key, value in call_scalars(c).items():
            tb.add_scalar(f"{base}/{key}", value, step)
        if c.bias is not None:
            tb.add_histogram(f"{base}/bias", c.bias.reshape(-1), step)
        if c.bytes_matrix is not None:
            _bucket_histogram(tb, f"{base}/a2a_bytes", c.bytes_matrix, step)
            n = c.bytes_matrix.shape[0]
            tb.add_image(f"{base}/a2a_heatmap", heatmap_rgb(c.bytes_matrix, cell=_cell(n)), step, dataformats="HWC")
    if w.calls:
        grid = load_over_mean([c.kept for c in w.calls])
        # Colour = load / mean load of the layer, 0..2 (balanced experts sit mid-scale).
        tb.add_image("moe/tokens_heatmap", heatmap_rgb(grid, vmax=2.0, cell=_cell(grid.shape[1])), step, dataformats="HWC")
    if w.tokens_per_s:
        tb.add_scalar("perf/tokens_per_s", w.tokens_per_s, step)
        tb.add_scalar("perf/model_tflops", w.model_tflops, step)
    if w.mfu is not None:
        tb.add_scalar("perf/mfu", w.mfu, step)


def experts_layout(w: TrafficWindow) -> dict:
    """Custom-scalars layout: "Experts" (one chart per metric, a line per layer), "Experts:
    time" (per phase), "Experts: aux losses", one category per MoEUT shared block (its
    repeats), and "Experts by layer" (one chart per layer)."""
    any_label = r"moe/L\d+_\w+?"
    by_metric = {title: ["Multiline", [f"{any_label}/{key}$"]] for key, title in SCALARS}
    layout = {"Experts": by_metric}
    layout["Experts: time per step (ms)"] = {
        **{f"{p} (mean over ranks)": ["Multiline", [f"{any_label}/time_ms/{p}$"]] for p in PHASES},
        **{f"{p} (slowest rank)": ["Multiline", [f"{any_label}/time_ms_max/{p}$"]] for p in PHASES},
    }
    terms = sorted({k for c in w.calls for k in c.terms})
    if terms:
        layout["Experts: aux losses"] = {t: ["Multiline", [f"{any_label}/aux/{t}$"]] for t in terms}
    blocks: dict[int, list[str]] = {}
    for c in w.calls:
        blocks.setdefault(c.block, []).append(c.label)
    if any(len(v) > len({re.sub(r"^L\d+_", "", x) for x in v}) for v in blocks.values()):  # shared blocks
        for b, labels in sorted(blocks.items()):
            alt = "|".join(labels)
            layout[f"Experts: shared block {b} ({', '.join(labels)})"] = {
                title: ["Multiline", [f"moe/({alt})/{key}$"]] for key, title in SCALARS[:5]
            }
    layout["Experts by layer"] = {
        f"{c.label}: load": ["Multiline", [f"moe/{c.label}/(imbalance|capacity_overflow|usage_perplexity)$"]]
        for c in w.calls
    }
    layout["Throughput"] = {
        "tokens/s": ["Multiline", [r"perf/tokens_per_s$"]],
        "model TFLOP/s per device and MFU": ["Multiline", [r"perf/(model_tflops|mfu)$"]],
    }
    return layout

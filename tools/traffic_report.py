"""Summarise a run's expert traffic from its TensorBoard events.

    python tools/traffic_report.py RUN_DIR [--out report.png] [--top 3]

Prints, per routed layer, the hottest and coldest experts of the last window (tokens
computed), the load imbalance and drop rate over time, and the rank x rank all-to-all bytes
of the last window; saves the same as a PNG (default RUN_DIR/traffic_report.png).
Reads what the trainer writes every logging.moe_stats_every steps (trainer/traffic_board.py).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np


def load(run_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = os.path.join(run_dir, "tb")
    if not os.path.isdir(tb):
        sys.exit(f"error: {tb} does not exist (was logging.tensorboard off?)")
    ea = EventAccumulator(tb, size_guidance={"scalars": 0, "histograms": 0, "images": 1, "tensors": 0})
    ea.Reload()
    return ea


def buckets(event) -> np.ndarray:
    return np.asarray(event.histogram_value.bucket, dtype=np.float64)


def report(run_dir: str, out: str, top: int) -> list[str]:
    ea = load(run_dir)
    hist_tags = ea.Tags()["histograms"]
    scalar_tags = set(ea.Tags()["scalars"])
    labels = sorted({m.group(1) for t in hist_tags if (m := re.fullmatch(r"moe/(L\d+_\w+)/tokens_per_expert", t))})
    if not labels:
        sys.exit(f"error: no expert traffic in {run_dir}/tb (logging.moe_stats_every=0, or a dense model?)")
    lines = []
    last_step = ea.Histograms(f"moe/{labels[0]}/tokens_per_expert")[-1].step
    lines.append(f"expert traffic of {run_dir}, last window ending at step {last_step}")
    lines.append(f"{'layer':<14}{'hottest (expert: tokens)':<34}{'coldest':<34}{'imbalance':>10}{'dropped':>9}")
    series = {}
    grids = []
    for label in labels:
        counts = buckets(ea.Histograms(f"moe/{label}/tokens_per_expert")[-1])
        grids.append(counts)
        order = np.argsort(-counts, kind="stable")
        fmt = lambda ids: ", ".join(f"{i}: {int(counts[i])}" for i in ids)  # noqa: E731
        imb = [(e.step, e.value) for e in ea.Scalars(f"moe/{label}/imbalance")]
        drop = [(e.step, e.value) for e in ea.Scalars(f"moe/{label}/dropped_frac")]
        series[label] = (imb, drop)
        lines.append(f"{label:<14}{fmt(order[:top]):<34}{fmt(order[::-1][:top]):<34}{imb[-1][1]:>10.3f}{drop[-1][1]:>9.4f}")
    lines.append("imbalance (max/mean) over time:")
    for label, (imb, _) in series.items():
        lines.append(f"  {label:<12}" + " ".join(f"{s}:{v:.2f}" for s, v in imb))
    lines.append("dropped fraction over time:")
    for label, (_, drop) in series.items():
        lines.append(f"  {label:<12}" + " ".join(f"{s}:{v:.4f}" for s, v in drop))
    a2a = None
    a2a_tags = [f"moe/{label}/a2a_bytes" for label in labels if f"moe/{label}/a2a_bytes" in hist_tags]
    if a2a_tags:
        a2a = sum(buckets(ea.Histograms(t)[-1]) for t in a2a_tags)
        n = int(round(len(a2a) ** 0.5))
        a2a = a2a.reshape(n, n)
        lines.append("all-to-all bytes per step, all layers, last window (row = sender, column = receiver):")
        for r in range(n):
            lines.append(f"  rank {r:<3}" + " ".join(f"{int(v):>12d}" for v in a2a[r]))
    elif not any(t.endswith("a2a_bytes_per_step") for t in scalar_tags):
        lines.append("no all-to-all traffic (no expert parallelism)")
    _plot(out, labels, series, grids, a2a)
    lines.append(f"saved {out}")
    return lines


def _plot(out, labels, series, grids, a2a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4 if a2a is not None else 3
    fig, axes = plt.subplots(1, cols, figsize=(5 * cols, 4))
    for label, (imb, drop) in series.items():
        axes[0].plot(*zip(*imb), label=label)
        axes[1].plot(*zip(*drop), label=label)
    axes[0].set(title="load imbalance (max/mean)", xlabel="step")
    axes[1].set(title="dropped fraction", xlabel="step")
    axes[0].legend(fontsize=6)
    from moe_dist.trainer.traffic_board import load_over_mean

    im = axes[2].imshow(load_over_mean(grids), aspect="auto", vmin=0, vmax=2, cmap="viridis", interpolation="nearest")
    axes[2].set(title="tokens / layer mean, last window", xlabel="expert", yticks=range(len(labels)), yticklabels=labels)
    # Experts and ranks are integers: matplotlib's default ticks fall between cells (0.5, 1.5).
    from matplotlib.ticker import MaxNLocator

    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=axes[2])
    if a2a is not None:
        im = axes[3].imshow(a2a, cmap="viridis", interpolation="nearest")
        axes[3].set(title="all-to-all bytes per step", xlabel="receiver rank", ylabel="sender rank")
        axes[3].xaxis.set_major_locator(MaxNLocator(integer=True))  # one locator per axis
        axes[3].yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=axes[3])
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/traffic_report.png)")
    p.add_argument("--top", type=int, default=3, help="hottest/coldest experts to list per layer")
    a = p.parse_args(argv)
    out = a.out or os.path.join(a.run_dir, "traffic_report.png")
    if a.out and not os.path.isdir(os.path.dirname(os.path.abspath(a.out))):  # before the work, not at savefig
        p.error(f"--out {a.out}: its directory does not exist")
    print("\n".join(report(a.run_dir, out, a.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

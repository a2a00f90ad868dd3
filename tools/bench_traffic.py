"""Overhead of the expert-traffic window (logging.moe_stats_every, phase timing included).

    python tools/bench_traffic.py [CONFIG] [--chunks 8] [--steps 20] [override ...]
    torchrun --nproc_per_node 2 tools/bench_traffic.py configs/quickstart.yaml parallel.ep=2

One trainer trains in chunks of --steps steps (a whole number of windows), alternating
traffic statistics on (the config's interval, default 10) and off (logging.moe_stats_every=0
behaviour: no observe, no timing, no window), so both modes see the same model, data and
machine noise. Each chunk is timed end to end on the host (window collection and
TensorBoard writes included; eval and checkpoints off). Prints the median seconds per step
of each mode and the median of the per-pair ratios on/off.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from moe_dist.config import load_config
from moe_dist.trainer.traffic import set_timing
from moe_dist.trainer.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--chunks", type=int, default=8, help="pairs of (on, off) chunks")
    p.add_argument("--steps", type=int, default=20, help="steps per chunk")
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        cfg = load_config(a.config, [
            f"run.dir={root}/run", "logging.progress=false", "checkpoint.every=0", "checkpoint.save_final=false",
            "train.eval_every=0", "train.resume=none", "train.max_steps=1000000", *a.overrides,
        ])
        every = cfg.logging.moe_stats_every
        if every == 0 or a.steps % every:
            raise SystemExit(f"--steps {a.steps} must be a multiple of logging.moe_stats_every ({every})")
        t = Trainer(cfg, log=lambda *_: None)
        monitor = t.traffic
        main_rank = t.is_main
        # The window's own cost, timed directly: far below the step-to-step noise of the pairs.
        window_s: list[float] = []
        collect, log_traffic = monitor.collect, (t.metrics.log_traffic if t.metrics else None)

        def timed_collect(step):
            t0 = time.perf_counter()
            w = collect(step)
            if log_traffic is not None:
                log_traffic(w)
            window_s.append(time.perf_counter() - t0)
            return w

        monitor.collect = timed_collect
        if t.metrics is not None:
            t.metrics.log_traffic = lambda w: None  # done (and timed) in timed_collect

        def chunk(on: bool, steps: int) -> float:
            t.traffic = monitor if on else None
            set_timing(t.model, on and cfg.logging.expert_timing)
            t.cfg.train.max_steps = t.step + steps
            t0 = time.perf_counter()
            t.fit()
            return (time.perf_counter() - t0) / steps

        chunk(True, a.warmup * every)  # warm-up (first-step allocations, window shapes)
        per_step: dict[bool, list[float]] = {True: [], False: []}
        ratios = []
        for i in range(a.chunks):
            order = (True, False) if i % 2 == 0 else (False, True)
            got = {on: chunk(on, a.steps) for on in order}
            for on, s in got.items():
                per_step[on].append(s)
            ratios.append(got[True] / got[False])
            if main_rank:
                print(f"pair {i}: on {got[True] * 1000:.1f} ms/step, off {got[False] * 1000:.1f} ms/step, "
                      f"ratio {ratios[-1]:.4f}", flush=True)
        t.close()
        if main_rank:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            on, off = statistics.median(per_step[True]), statistics.median(per_step[False])
            print(f"{a.config} {' '.join(a.overrides)} world {world}, window every {every} steps, "
                  f"{a.chunks} pairs of {a.steps} steps")
            print(f"median step: on {on * 1000:.1f} ms, off {off * 1000:.1f} ms; "
                  f"median on/off ratio {statistics.median(ratios):.4f} "
                  f"(overhead {(statistics.median(ratios) - 1) * 100:+.2f}%)")
            w = statistics.median(window_s[a.warmup:])
            print(f"window collect + TensorBoard write: median {w * 1000:.1f} ms per window = "
                  f"{w / every * 1000:.2f} ms per step = {w / every / off * 100:.2f}% of the off step")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Peak memory and step time of train.activation_checkpoint=none against full, side by side.

    python tools/bench_activation_checkpoint.py [--config configs/quickstart.yaml] [--batch 16]
        [--rounds 5] [key=value ...]

One process, the config's model (overrides as in training), one forward and backward of
`--batch` sequences of data.seq_len random tokens per step. The two settings alternate,
round after round, and the tool prints each one's median step time and its peak memory:
on CUDA the step's torch.cuda.max_memory_allocated above what was allocated before it, on
CPU the peak that torch's MemTracker sees, split into parameters, gradients, activations
and temporaries. No optimizer: its state is
the same under both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from moe_dist.config import load_config  # noqa: E402
from moe_dist.macs import vocab_size  # noqa: E402
from moe_dist.models.transformer import LM, lm_loss  # noqa: E402

MODES = ("none", "full")


def build(config: str, mode: str, overrides: list[str], device: torch.device, vocab):
    cfg = load_config(config, [*overrides, f"train.activation_checkpoint={mode}"])
    torch.manual_seed(0)
    return cfg, LM(cfg, vocab or vocab_size(cfg)).to(device)  # the tokenizer's, as training's


def step_fn(model, idx, dtype):
    def step():
        with torch.autocast(idx.device.type, dtype=dtype, enabled=dtype is not None):
            out = model(idx[:, :-1])
            loss = lm_loss(out.logits, idx[:, 1:]) + out.aux_loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def peak_memory(step, model, device) -> dict[str, float]:
    """MiB at the peak of one step: 'total', plus categories on CPU. On CUDA the peak above
    what was allocated before the step (both settings' models and inputs stay resident)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {"total": (torch.cuda.max_memory_allocated() - resident) / 2**20}
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        step()
    peak = tracker.get_tracker_snapshot("peak")[device]
    named = {str(k).split(".")[-1].lower(): v / 2**20 for k, v in peak.items()}
    return {"total": named.pop("total"), **{k: named[k] for k in ("param", "grad", "act", "temp")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default: the config's data.vocab_size)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    runs = {}
    for mode in MODES:
        cfg, model = build(a.config, mode, a.overrides, device, a.vocab)
        idx = torch.randint(0, a.vocab or vocab_size(cfg), (a.batch, cfg.data.seq_len + 1), device=device)
        step = step_fn(model, idx, dtype)
        step()  # warm up (and, on CPU, keep MemTracker's first-call work out of the times)
        runs[mode] = {"step": step, "memory": peak_memory(step, model, device), "ms": []}
    for _ in range(a.rounds):
        for mode in MODES:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            runs[mode]["step"]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            runs[mode]["ms"].append((time.perf_counter() - t0) * 1e3)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{a.config} {' '.join(a.overrides)} | vocab {a.vocab or cfg.data.vocab_size}, batch {a.batch} x seq "
          f"{cfg.data.seq_len} | {name}, "
          f"torch {torch.__version__}, {a.rounds} alternating rounds")
    base = runs["none"]
    for mode in MODES:
        r = runs[mode]
        ms = statistics.median(r["ms"])
        mem = "  ".join(f"{k} {v:.1f}" for k, v in r["memory"].items())
        print(f"  {mode:>4}: step {ms:8.1f} ms (x{ms / statistics.median(base['ms']):.2f})   "
              f"peak MiB: {mem}   (x{r['memory']['total'] / base['memory']['total']:.2f} total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

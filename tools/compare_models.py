#!/usr/bin/env python
"""Train dense, Switch, sigma-MoE, SwitchHead, MoEUT and SliceMoE at matched total parameters
on the embedded corpus for one token budget, and write the comparison to docs/results.md.

    python tools/compare_models.py                 # scale "cpu": 17-19 min on 2 cores
    python tools/compare_models.py --quick         # scale "quick": about 45 s, a smoke run
    python tools/compare_models.py --scale gpu     # larger settings (the default on CUDA)
    python tools/compare_models.py --seeds 2       # every model with seeds 0 and 1: means and spread

Every model starts from its configs/tiny_*.yaml and gets the scale's shared settings
(d_model, layers, context, batch, steps, learning rate, seed): only the architecture
differs, and every model sees the same batches in the same order. Total parameters are
then matched to the dense model's by solving one size knob per model (expert width,
expert count or SwitchHead's head width) with the counting of moe_dist/macs.py, which
tests/test_macs.py checks against real models. Every FFN uses ReLU, as in the SwitchHead,
sigma-MoE/MoEUT and Switch papers' baselines.

Each model trains in its own `python -m moe_dist.train` process, one after another, so
tokens/s is measured without a neighbour. Read back from its metrics.jsonl: validation
perplexity after the last step, the median tokens/s of the steps after the first 10%, and
the normalised expert-load entropy (entropy of the per-expert routed counts / log E) of the
last traffic window (the last 10% of steps), averaged over the routed FFN or attention calls.

The table goes into --out between markers for the scale (other scales' tables and the text
around them are kept), with the command, commit and machine; the papers' three qualitative
claims are checked and marked reproduced or not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from moe_dist.config import Config, load_config  # noqa: E402
from moe_dist.macs import Counts, count  # noqa: E402


@dataclass(frozen=True)
class Scale:
    d_model: int
    n_layers: int
    n_heads: int
    """Heads of standard multi-head attention (SwitchHead models use 2, as in the paper)."""
    seq_len: int
    micro_batch: int
    steps: int
    eval_batches: int
    lr: float
    data: tuple[str, ...] = ()
    """Data overrides (tokenizer, vocabulary, document cap)."""

    @property
    def tokens(self) -> int:
        return self.steps * self.micro_batch * self.seq_len

    @property
    def warmup(self) -> int:
        """Warmup steps; also the traffic-window length (the entropy is read from the last one)."""
        return max(1, self.steps // 10)

    @property
    def min_lr(self) -> float:
        return self.lr / 10


SCALES = {
    # The test suite's tiny corpus (12 documents, 512-token BPE): prepared in seconds.
    "quick": Scale(d_model=64, n_layers=4, n_heads=2, seq_len=32, micro_batch=8, steps=30, eval_batches=2, lr=3e-3,
                   data=("data.vocab_size=512", "data.max_docs=12", "data.samples_per_shard=256")),
    # 17-19 minutes per seed on 2 CPU cores (measured): 1.2M tokens per model, under one epoch
    # of the corpus.
    "cpu": Scale(d_model=128, n_layers=4, n_heads=4, seq_len=128, micro_batch=16, steps=600, eval_batches=32,
                 lr=2e-3, data=("data.vocab_size=4096",)),
    # One GPU: 8M tokens per model (about 3 epochs of the 2.7M-token corpus).
    "gpu": Scale(d_model=256, n_layers=8, n_heads=4, seq_len=256, micro_batch=32, steps=1000, eval_batches=32,
                 lr=1e-3, data=("data.vocab_size=4096",)),
}


@dataclass(frozen=True)
class Model:
    name: str
    config: str
    fixed: Callable[[int], list[str]] = lambda d: []
    """Overrides that depend on d_model only (applied after the scale's)."""
    knob: Optional[str] = None
    """Config key solved so that total parameters match the dense model's."""
    candidates: Callable[[int], range] = lambda d: range(0)


MODELS = [
    Model("dense", "configs/tiny_dense.yaml", lambda d: ["model.activation=relu", f"model.d_ff={4 * d}"]),
    # Switch: 8 experts, top-1, capacity 1.25; the experts share the dense FFN's parameters.
    Model("switch", "configs/tiny_switch.yaml", knob="moe.d_expert", candidates=lambda d: range(4, 4 * d + 1, 4)),
    # sigma-MoE: K * d_expert = 2 d as in the paper (K=8 of d/4-wide experts here; the paper's
    # d/8 experts would be 16 wide at d=128); the expert count is solved.
    Model("sigma_moe", "configs/tiny_sigma_moe.yaml", lambda d: ["moe.top_k=8", f"moe.d_expert={d // 4}"],
          knob="moe.num_experts", candidates=lambda d: range(8, 1025)),
    # SwitchHead: 2 heads, 4 V/O experts per head, top-2, the dense model's FFN; the head
    # width is solved (multiples of 4).
    Model("switchhead", "configs/tiny_switchhead.yaml",
          lambda d: ["model.n_heads=2", "model.activation=relu", f"model.d_ff={4 * d}"],
          knob="model.head_dim", candidates=lambda d: range(4, 2 * d + 1, 4)),
    # MoEUT: G=2 shared layers (A B A B), peri-layernorm, SwitchHead attention with heads of
    # d/2, sigma-MoE FFN as above; the expert count is solved.
    Model("moeut", "configs/tiny_moeut.yaml",
          lambda d: ["model.n_heads=2", f"model.head_dim={d // 2}", "moe.top_k=8", f"moe.d_expert={d // 4}"],
          knob="moe.num_experts", candidates=lambda d: range(8, 1025)),
    # SliceMoE: S=8 slices, 16 experts, top-2 per slice; the expert width is solved.
    Model("slicemoe", "configs/tiny_slicemoe.yaml", knob="moe.d_expert", candidates=lambda d: range(4, 16 * d + 1, 4)),
]
MATCH_TOLERANCE = 0.03
"""Largest relative difference from the dense model's total parameters we accept."""


def shared_overrides(s: Scale) -> list[str]:
    return [
        f"model.d_model={s.d_model}", f"model.n_layers={s.n_layers}", f"model.n_heads={s.n_heads}",
        f"data.seq_len={s.seq_len}", *s.data, f"train.micro_batch_size={s.micro_batch}",
        f"train.max_steps={s.steps}", f"optim.warmup_steps={s.warmup}", f"optim.lr={s.lr}",
        f"optim.min_lr={s.min_lr}", f"train.eval_every={s.steps}", f"train.eval_batches={s.eval_batches}",
        "train.resume=none", "checkpoint.every=0", "checkpoint.save_final=false",
        "logging.log_every=1", f"logging.moe_stats_every={s.warmup}", "logging.progress=false",
    ]


@dataclass
class Plan:
    model: Model
    overrides: list[str]
    cfg: Config
    counts: Counts
    knob_value: Optional[int] = None


def plan(model: Model, s: Scale, target: Optional[int]) -> Plan:
    """The model's overrides, with its knob solved to the total parameter count nearest `target`."""
    base = shared_overrides(s) + model.fixed(s.d_model)
    path = os.path.join(REPO, model.config)
    if model.knob is None:
        cfg = load_config(path, base)
        return Plan(model, base, cfg, count(cfg))
    best = None
    for value in model.candidates(s.d_model):
        overrides = base + [f"{model.knob}={value}"]
        cfg = load_config(path, overrides)
        c = count(cfg)
        gap = abs(c.params_total - target)
        if best is None or gap < best[0]:
            best = (gap, Plan(model, overrides, cfg, c, value))
        elif c.params_total > target:
            break  # parameters grow with every knob: past the target, the gap only widens
    p = best[1]
    miss = abs(p.counts.params_total - target) / target
    if miss > MATCH_TOLERANCE:
        raise SystemExit(f"{model.name}: no {model.knob} in {model.candidates(s.d_model)} brings total parameters "
                         f"within {MATCH_TOLERANCE:.0%} of dense's {target:,} (best {p.counts.params_total:,})")
    return p


def plans(s: Scale, names: list[str]) -> list[Plan]:
    dense = plan(MODELS[0], s, None)
    return [dense] + [plan(m, s, dense.counts.params_total) for m in MODELS[1:] if m.name in names]


@dataclass
class Run:
    """One seed of one model."""
    val_ppl: float
    tokens_per_s: float
    wall_s: float
    load_entropy: dict[str, float] = field(default_factory=dict)


@dataclass
class Result:
    """A model over its seeds: means, and the per-seed validation perplexities."""
    plan: Plan
    runs: list[Run]

    @property
    def val_ppl(self) -> float:
        return statistics.mean(r.val_ppl for r in self.runs)

    @property
    def tokens_per_s(self) -> float:
        return statistics.mean(r.tokens_per_s for r in self.runs)

    @property
    def load_entropy(self) -> dict[str, float]:
        return {k: statistics.mean(r.load_entropy[k] for r in self.runs) for k in self.runs[0].load_entropy}


def train(p: Plan, run_dir: str, seed: int) -> float:
    """Train one model in its own process; returns the wall seconds."""
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # a run dir of this tool's work directory: start over
    os.makedirs(run_dir)
    log = run_dir + ".log"
    cmd = [sys.executable, "-m", "moe_dist.train", "--config", os.path.join(REPO, p.model.config), *p.overrides,
           f"run.seed={seed}", f"run.dir={run_dir}"]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{p.model.name}: training exited with {rc} (log: {log})\n{tail}")
    return time.perf_counter() - t0


def read_run(p: Plan, run_dir: str, wall_s: float) -> Run:
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    evals = [r for r in rows if "val_ppl" in r]
    steps = [r for r in rows if "tokens_per_s" in r]
    windows = [r for r in steps if "window_tokens_per_s" in r]
    if not evals or not steps:
        raise SystemExit(f"{p.model.name}: {path} has no evaluation or no training rows")
    skip = len(steps) // 10  # warm-up steps: allocator and thread-pool start
    entropy = {k: windows[-1][f"load_entropy_{k}"] for k in ("ffn", "attn") if windows and f"load_entropy_{k}" in windows[-1]}
    return Run(evals[-1]["val_ppl"], statistics.median(r["tokens_per_s"] for r in steps[skip:]), wall_s, entropy)


# --- claims ----------------------------------------------------------------------------------
PPL_MATCH = 0.02
"""SwitchHead "matches" dense: validation perplexity at most 2% above dense's."""


def claims(results: dict[str, Result]) -> list[tuple[str, str, bool]]:
    """(claim, what was measured, reproduced) for each claim whose models were trained."""
    out = []
    dense = results["dense"]
    if "switchhead" in results:
        sh = results["switchhead"]
        ratio = sh.val_ppl / dense.val_ppl
        attn = sh.plan.counts.macs_attention / dense.plan.counts.macs_attention
        out.append(("SwitchHead matches dense perplexity with fewer attention MACs",
                    f"ppl {sh.val_ppl:.2f} vs {dense.val_ppl:.2f} ({ratio:.3f}x; match = at most "
                    f"{1 + PPL_MATCH:.2f}x); attention MACs {attn:.2f}x dense's",
                    ratio <= 1 + PPL_MATCH and attn < 1))
    if "moeut" in results:
        mu = results["moeut"]
        out.append(("MoEUT beats dense at equal parameters",
                    f"ppl {mu.val_ppl:.2f} vs {dense.val_ppl:.2f} ({mu.val_ppl / dense.val_ppl:.3f}x)",
                    mu.val_ppl < dense.val_ppl))
    if "slicemoe" in results and "switch" in results:
        sl, sw = results["slicemoe"].load_entropy["ffn"], results["switch"].load_entropy["ffn"]
        out.append(("SliceMoE's expert-load entropy exceeds token MoE's (Switch)",
                    f"normalised load entropy {sl:.4f} vs {sw:.4f}", sl > sw))
    return out


# --- report ----------------------------------------------------------------------------------
def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def _m(n: float) -> str:
    return f"{n / 1e6:.3f}M"


def table(scale_name: str, s: Scale, results: list[Result], command: str, total_s: float) -> str:
    dense = results[0].plan.counts
    seeds = len(results[0].runs)
    seed_text = "seed 0" if seeds == 1 else f"seeds 0-{seeds - 1} (values are means over the seeds)"
    lines = [
        f"Command: `{command}`  ",
        f"Scale `{scale_name}`: d_model {s.d_model}, {s.n_layers} layers, context {s.seq_len}, "
        f"{s.micro_batch} x {s.seq_len} tokens per step, {s.steps} steps = {s.tokens:,} tokens per model, "
        f"lr {s.lr:g} (warmup {s.warmup}, cosine to {s.min_lr:g}), {seed_text}, ReLU FFNs.  ",
        f"Machine: {machine()}; commit {commit()}; {time.strftime('%Y-%m-%d')}; {total_s / 60:.1f} min in all.",
        "",
        "| model | val ppl | total params | vs dense | active params | MACs/token | attention MACs/token "
        "| tokens/s | load entropy FFN | load entropy attn | solved knob | val ppl per seed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.plan.counts
        knob = f"`{r.plan.model.knob}={r.plan.knob_value}`" if r.plan.model.knob else "(reference)"
        ent = [f"{r.load_entropy[k]:.4f}" if k in r.load_entropy else "-" for k in ("ffn", "attn")]
        lines.append(
            f"| {r.plan.model.name} | {r.val_ppl:.2f} | {_m(c.params_total)} | {c.params_total / dense.params_total - 1:+.1%} "
            f"| {_m(c.params_active)} | {_m(c.macs_total)} | {_m(c.macs_attention)} | {r.tokens_per_s:,.0f} "
            f"| {ent[0]} | {ent[1]} | {knob} | {', '.join(f'{x.val_ppl:.2f}' for x in r.runs)} |")
    lines += ["", "| claim (paper) | measured | reproduced |", "|---|---|---|"]
    for claim, measured, ok in claims({r.plan.model.name: r for r in results}):
        lines.append(f"| {claim} | {measured} | {'yes' if ok else 'no'} |")
    return "\n".join(lines)


def write_section(path: str, scale_name: str, body: str) -> None:
    """Replace this scale's section of `path` (between its markers), keeping everything else."""
    begin, end = f"<!-- compare_models:{scale_name}:begin -->", f"<!-- compare_models:{scale_name}:end -->"
    section = f"{begin}\n{body}\n{end}"
    text = open(path).read() if os.path.exists(path) else "# Model comparison at matched parameters\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## Scale `{scale_name}`\n\n{section}\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=sorted(SCALES), default=None,
                   help="settings (default: gpu when CUDA is available, else cpu)")
    p.add_argument("--quick", action="store_true", help="the 'quick' scale: a smoke run of about 45 s")
    p.add_argument("--models", default=",".join(m.name for m in MODELS),
                   help="comma-separated subset (dense is always trained: it is the reference)")
    p.add_argument("--work-dir", default=None, help="run directories (default runs/compare_<scale>)")
    p.add_argument("--out", default=None, help="results file (default docs/results.md; --quick: <work-dir>/results.md)")
    p.add_argument("--seeds", type=int, default=1, help="train every model with seeds 0..N-1 and report means")
    p.add_argument("--plan-only", action="store_true", help="print the matched plans, train nothing")
    a = p.parse_args(argv)
    scale_name = "quick" if a.quick else a.scale or ("gpu" if torch.cuda.is_available() else "cpu")
    names = a.models.split(",")
    unknown = set(names) - {m.name for m in MODELS}
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}; choose from {[m.name for m in MODELS]}")
    s = SCALES[scale_name]
    work = os.path.abspath(a.work_dir or os.path.join(REPO, "runs", f"compare_{scale_name}"))
    out = a.out or (os.path.join(work, "results.md") if scale_name == "quick" else os.path.join(REPO, "docs", "results.md"))
    if a.seeds < 1:
        p.error("--seeds: must be >= 1")
    todo = plans(s, names)
    for pl in todo:
        c = pl.counts
        knob = f"{pl.model.knob}={pl.knob_value}" if pl.model.knob else "reference"
        print(f"{pl.model.name:<11} total {c.params_total:>10,}  active {c.params_active:>10,}  "
              f"MACs/token {c.macs_total:>11,}  ({knob})", flush=True)
    if a.plan_only:
        return 0
    t0 = time.perf_counter()
    results = []
    for pl in todo:
        runs = []
        for seed in range(a.seeds):
            run_dir = os.path.join(work, f"{pl.model.name}-seed{seed}")
            r = read_run(pl, run_dir, train(pl, run_dir, seed))
            runs.append(r)
            print(f"{pl.model.name:<11} seed {seed}  val ppl {r.val_ppl:8.2f}  {r.tokens_per_s:8,.0f} tokens/s  "
                  f"load entropy {r.load_entropy}  ({r.wall_s:.0f} s)", flush=True)
        results.append(Result(pl, runs))
    command = "python tools/compare_models.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = table(scale_name, s, results, command.strip(), time.perf_counter() - t0)
    write_section(out, scale_name, body)
    print(body)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

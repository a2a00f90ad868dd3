#!/usr/bin/env python
"""Count the ops one routed layer's training step launches, and time the step (CPU).

    python tools/count_layer_ops.py                                 # T=256, d 64: counts, times
    python tools/count_layer_ops.py --tokens 16 --d-model 16 --d-expert 32   # host-bound times
    python tools/count_layer_ops.py --list "top-2 cf1.25"           # one layer's ops in order

Why: on a GPU a small MoE layer is bound by its host, not its FLOPs (docs/benchmarks.md,
issue 9: 3.2-3.9x the time of a dense FFN of equal FLOPs on an H100 at 4k tokens). In
eager mode every op that is not a view is at least one kernel launch, so the op count is
the layer's fixed cost, and it is the same on any machine: this tool counts it here,
exactly, without a GPU.

Two paths:
  cpu   what runs here: counts by bincount, capacity drops left out (host reads are free);
  gpu   what a GPU runs in eager: moe/dispatch.py's host_reads_free rebound to False, so
        counts are scatter-adds and dropped assignments are computed with no output. The
        ops are then a GPU's, except the casts autocast adds (this runs in float32).
Ops counted: every aten op dispatched below autograd, minus views and metadata (they
launch nothing), forward (the loss included) and backward. Timing: median wall time of
one forward+backward on the cpu path, 1 thread, over --rounds rounds of --steps steps,
the layers interleaved. At T=16 the host is the whole cost, as on a GPU at small sizes;
at the default T=256 the CPU's grouped matmuls already weigh in.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from moe_dist.config import AttentionConfig, MoEConfig  # noqa: E402
from moe_dist.models.ffn import FFN  # noqa: E402
from moe_dist.models.switchhead import SwitchHeadAttention  # noqa: E402
from moe_dist.moe import dispatch  # noqa: E402
from moe_dist.moe.layer import MoEFFN  # noqa: E402
from moe_dist.moe.slice_layer import SliceMoEFFN  # noqa: E402

# Views and metadata: no kernel, no launch.
VIEWS = {
    "view", "_unsafe_view", "reshape", "alias", "detach", "t", "transpose", "permute", "expand", "slice",
    "select", "unsqueeze", "squeeze", "as_strided", "unflatten", "split", "split_with_sizes", "unbind",
    "promote_types", "result_type", "is_same_size", "sym_size", "sym_stride", "sym_numel",
}  # fmt: skip

T, D, F, E = 256, 64, 128, 8  # tokens, model dim, expert width, experts (--tokens, --d-model, --d-expert)


def _moe(k: int, cf: float, score: str = "softmax", **kw) -> MoEFFN:
    cfg = MoEConfig(num_experts=E, top_k=k, d_expert=F, capacity_factor=cf, grouped_mm="torch", **kw)
    layer = MoEFFN(D, cfg, "gelu", score)
    layer.reset_parameters(0.02, 0.02)
    return layer


def _slice() -> SliceMoEFFN:
    cfg = MoEConfig(num_experts=E, top_k=2, d_expert=F // 4, capacity_factor=1.25, num_slices=4,
                    slice_router_hidden=32, grouped_mm="torch", z_loss_weight=0.0)  # fmt: skip
    layer = SliceMoEFFN(D, cfg, "gelu")
    layer.reset_parameters(0.02, 0.02)
    return layer


def _switchhead() -> SwitchHeadAttention:
    cfg = AttentionConfig(num_experts=4, top_k=2)
    layer = SwitchHeadAttention(D, 2, 32, T, True, 10000.0, 0.0, cfg, "torch")
    layer.reset_parameters(0.02, 0.02)
    return layer


# name -> builder. Tiny shapes, float32. "dense": the FFN whose FLOPs equal a top-2 layer's.
LAYERS = {
    "switch top-1 cf1.25": lambda: _moe(1, 1.25, lb_loss_weight=0.01, z_loss_weight=0.001),
    "top-2 cf1.25": lambda: _moe(2, 1.25, lb_loss_weight=0.01, z_loss_weight=0.0),
    "top-2 dropless": lambda: _moe(2, 0.0, lb_loss_weight=0.01, z_loss_weight=0.0),
    "sigma-moe top-2": lambda: _moe(2, 0.0, "sigmoid", lb_loss_weight=0.0, z_loss_weight=0.0, entropy_loss_weight=0.001),
    "slicemoe top-2 cf1.25": _slice,
    "switchhead attention": _switchhead,
    "dense": lambda: FFN(D, 2 * F, "gelu"),
}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def gpu_path(on: bool):
    """moe/dispatch.py takes a GPU's branches: no host reads."""
    saved = dispatch.host_reads_free
    if on:
        dispatch.host_reads_free = lambda device: False
    try:
        yield
    finally:
        dispatch.host_reads_free = saved


def _loss(out) -> torch.Tensor:
    if isinstance(out, tuple):  # (y, aux) or (y, [aux, ...])
        loss = out[0].square().mean()
        for a in out[1] if isinstance(out[1], list) else [out[1]]:
            loss = loss + a.loss
        return loss
    return out.square().mean()


def _step(layer, x: torch.Tensor, count: bool = False):
    xi = x.detach().requires_grad_()
    fwd, bwd = (_Count(), _Count()) if count else (contextlib.nullcontext(), contextlib.nullcontext())
    with fwd:
        loss = _loss(layer(xi.view(1, T, D)) if not isinstance(layer, FFN) else layer(xi))
    with bwd:
        loss.backward()
    return (fwd.ops, bwd.ops) if count else None


def count_ops(name: str, path: str = "cpu") -> tuple[list[str], list[str]]:
    """(forward ops, backward ops) of one training step of LAYERS[name]."""
    torch.manual_seed(0)
    layer = LAYERS[name]()
    x = torch.randn(T, D)
    with gpu_path(path == "gpu"):
        _step(layer, x)  # first call: lazy inits
        return _step(layer, x, count=True)


def main(argv=None) -> int:
    global T, D, F  # the layers' shapes
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=T)
    p.add_argument("--d-model", type=int, default=D)
    p.add_argument("--d-expert", type=int, default=F)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--list", metavar="LAYER", choices=list(LAYERS), help="print this layer's ops in order (gpu path)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    T, D, F = a.tokens, a.d_model, a.d_expert
    torch.set_num_threads(1)  # the host cost of a launch, not the threading of tiny ops
    if a.list:
        fwd, bwd = count_ops(a.list, "gpu")
        print("forward:", " ".join(fwd))
        print("backward:", " ".join(bwd))
        return 0
    print(f"torch {torch.__version__}; T={T} D={D} F={F} E={E}, float32, 1 thread")
    rows = []
    names = list(LAYERS)
    for name in names:
        (cf, cb), (gf, gb) = count_ops(name, "cpu"), count_ops(name, "gpu")
        rows.append(dict(layer=name, cpu_fwd=len(cf), cpu_bwd=len(cb), gpu_fwd=len(gf), gpu_bwd=len(gb)))
    # Time on the path this machine runs, every layer in each round (start rotated).
    torch.manual_seed(0)
    layers = {n: LAYERS[n]() for n in names}
    x = torch.randn(T, D)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(a.rounds + 1):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(a.steps):
                _step(layers[n], x)
            if r:  # round 0 warms up
                times[n].append((time.perf_counter() - t0) / a.steps * 1e6)
    dense_us = statistics.median(times["dense"])
    print(f"\n{'layer':<24} {'ops fwd+bwd (gpu path)':>24} {'(cpu path)':>12} {'us/step':>9} {'/ dense':>8}")
    for row in rows:
        us = statistics.median(times[row["layer"]])
        row.update(us=us, vs_dense=us / dense_us)
        gpu = f"{row['gpu_fwd']}+{row['gpu_bwd']}={row['gpu_fwd'] + row['gpu_bwd']}"
        cpu = f"{row['cpu_fwd'] + row['cpu_bwd']}"
        print(f"{row['layer']:<24} {gpu:>24} {cpu:>12} {us:9.0f} {us / dense_us:8.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

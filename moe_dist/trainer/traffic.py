"""Expert traffic: where tokens go and what it costs, gathered once per logging window.

Per micro-batch, `observe(out.moe)` keeps references to each routed call's statistics
(device tensors and host ints, moe/aux.py): no kernel launch and no host sync in the step.
Every `logging.moe_stats_every` steps, `collect()`
  1. sums each statistic over the window on the device,
  2. packs this rank's window into one float64 vector,
  3. exchanges it with ONE all_gather over the world,
  4. copies the gathered [world, n] matrix to the host            <- the one host sync
and returns a TrafficWindow (the same on every rank; rank 0 logs it).

What is global and what is per rank: routed counts, drops and loss terms were already summed
over the world inside the forward (they feed the balancing losses), so row 0 holds them. The
kept counts, slice-dropout skips and router entropies are this rank's rows: summed
over the gathered rows. Bytes sent to each peer and phase times stay per rank: the bytes
matrix and the per-rank timings.

A call is identified by its label (L03_ffn, L03_attn_src): the depth of the block that
routed, so each repeat of a MoEUT shared block is its own label (`block` says which shared
block it is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from moe_dist.moe.aux import MoEAux
from moe_dist.parallel.expert_parallel import _all_gather_single
from moe_dist.parallel.layout import ParallelLayout
from moe_dist.parallel.phase_timer import PHASES, PhaseTimer

# Dense bf16 tensor-core peaks (TFLOP/s per device, no sparsity) for the MFU estimate, from
# the vendors' data sheets; logging.peak_tflops overrides, and without either (CPU) no MFU.
# Matched by substring of the device name, in this order (the PCIe/NVL parts before SXM).
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H100": 989.4, "H200": 989.4, "H800": 989.4,
    "GH200": 989.4, "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
}


def peak_tflops(device: torch.device, override: Optional[float]) -> Optional[float]:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


@dataclass
class CallStats:
    """One routed call (label) over one window. Counts are sums over the window."""

    label: str
    block: int
    routed: np.ndarray
    """[E] assignments each expert was chosen for, global batch, before drops."""
    kept: np.ndarray
    """[E] assignments each expert kept (its output reached the tokens), global batch."""
    dropped: int
    """Assignments dropped for capacity."""
    skipped: int
    """Assignments not kept because cross-slice dropout zeroed them (SliceMoE)."""
    assignments: int
    """Assignments routed (rows x top-k)."""
    capacity: Optional[int]
    """An expert's capacity in one call, summed over the world's ep groups (None: dropless)."""
    calls: int
    """Forward calls in the window (steps x micro-batches)."""
    router_entropy: float
    """Mean per-row entropy of softmax(router logits), nats."""
    terms: dict[str, float]
    """Auxiliary-loss terms (unweighted), mean over the window's calls."""
    bias: Optional[np.ndarray]
    """Aux-loss-free selection bias at the end of the window, [G, E]."""
    bytes_matrix: Optional[np.ndarray]
    """[world, world] all-to-all bytes per step, row = sender, column = receiver (the
    diagonal is a rank's copy to itself); None without expert parallelism."""
    ms: np.ndarray
    """[world, len(PHASES)] forward milliseconds per step on each rank (zeros: timing off)."""

    @property
    def imbalance(self) -> float:
        """max / mean of the routed counts: 1 is perfect balance, E is one expert taking all."""
        mean = self.routed.mean()
        return float(self.routed.max() / mean) if mean > 0 else 0.0

    @property
    def dropped_frac(self) -> float:
        return self.dropped / self.assignments if self.assignments else 0.0

    @property
    def capacity_overflow(self) -> Optional[float]:
        """The hottest expert's routed count over its capacity, both summed over the window and
        the world's ep groups: above 1, it dropped tokens (SliceMoE in training excepted: its
        cross-slice-dropped assignments count as routed but take no slot)."""
        if self.capacity is None:
            return None
        return float(self.routed.max()) / (self.capacity * self.calls)

    @property
    def _routed_entropy(self) -> Optional[float]:
        """Entropy (nats) of the routed-count distribution; None when nothing was routed."""
        total = self.routed.sum()
        if total == 0:
            return None
        p = self.routed[self.routed > 0] / total
        return float(-(p * np.log(p)).sum())

    @property
    def usage_perplexity(self) -> float:
        """exp(entropy of the routed-count distribution): the number of experts in effective
        use, E at perfect balance."""
        h = self._routed_entropy
        return 0.0 if h is None else math.exp(h)

    @property
    def load_entropy(self) -> float:
        """Entropy of the routed-count distribution over log(E), in [0, 1]: 1 at perfect
        balance. SliceMoE's paper reports this "normalised expert-load entropy"."""
        h, E = self._routed_entropy, len(self.routed)
        return 0.0 if h is None or E < 2 else h / math.log(E)

    @property
    def kind(self) -> str:
        """'ffn' or 'attn' (SwitchHead's value and output routers)."""
        return "attn" if "_attn_" in self.label else "ffn"

    @property
    def dead_experts(self) -> int:
        """Experts chosen by no assignment in the whole window."""
        return int((self.routed == 0).sum())


@dataclass
class TrafficWindow:
    step: int
    steps: int
    calls: list[CallStats] = field(default_factory=list)
    tokens_per_s: float = 0.0
    """Global batch tokens per second of training-step time (no eval or checkpoint time)."""
    model_tflops: float = 0.0
    """Model TFLOP/s per device: 6 x forward MACs per token (macs.py) x tokens/s / world."""
    mfu: Optional[float] = None
    """model_tflops / the device's peak (None when the peak is unknown)."""

    def summary(self) -> dict[str, float]:
        """The metrics.jsonl fields of this window."""
        assigned = sum(c.assignments for c in self.calls)
        out = {
            "dropped_frac": sum(c.dropped for c in self.calls) / assigned if assigned else 0.0,
            "max_imbalance": max((c.imbalance for c in self.calls), default=0.0),
            "dead_experts": sum(c.dead_experts for c in self.calls),
            "window_tokens_per_s": self.tokens_per_s,
            "model_tflops": self.model_tflops,
        }
        for kind in ("ffn", "attn"):
            ent = [c.load_entropy for c in self.calls if c.kind == kind]
            if ent:
                out[f"load_entropy_{kind}"] = float(np.mean(ent))
        if self.mfu is not None:
            out["mfu"] = self.mfu
        return out


class _Acc:
    """One label's references over the current window."""

    def __init__(self, aux: MoEAux):
        self.label, self.block, self.capacity = aux.label, aux.block, aux.capacity
        self.terms = sorted(aux.terms)
        self.routed: list[torch.Tensor] = []
        self.dropped: list[torch.Tensor] = []
        self.kept: list[torch.Tensor] = []
        self.skipped: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []
        self.term_values: dict[str, list[torch.Tensor]] = {k: [] for k in self.terms}
        self.assignments = self.rows = self.calls = 0
        self.sent: Optional[list[int]] = None
        self.timers: list = []
        self.bias = aux.balance_bias
        self.experts = aux.tokens_per_expert.numel()

    @property
    def bias_numel(self) -> int:
        return 0 if self.bias is None else self.bias.numel()

    def add(self, aux: MoEAux) -> None:
        self.calls += 1
        self.assignments += aux.assignments
        self.rows += aux.local_rows
        self.routed.append(aux.tokens_per_expert)
        self.dropped.append(aux.dropped)
        if aux.kept_per_expert is not None:
            self.kept.append(aux.kept_per_expert)
        if aux.skipped is not None:
            self.skipped.append(aux.skipped)
        if aux.router_entropy_sum is not None:
            self.entropy.append(aux.router_entropy_sum)
        for k in self.terms:
            self.term_values[k].append(aux.terms[k])
        if aux.sent_bytes:
            self.sent = aux.sent_bytes if self.sent is None else [a + b for a, b in zip(self.sent, aux.sent_bytes)]
        if isinstance(aux.timer, PhaseTimer):  # not the no-op timer of timing off
            self.timers.append(aux.timer)
        self.bias = aux.balance_bias


def _sum(tensors: list[torch.Tensor], shape: tuple[int, ...], device) -> torch.Tensor:
    if not tensors:
        return torch.zeros(shape, dtype=torch.float64, device=device)
    return torch.stack([t.to(torch.float64) for t in tensors]).sum(0).reshape(shape)


class TrafficMonitor:
    def __init__(self, layout: ParallelLayout, device: torch.device, flops_per_token: float, peak: Optional[float]):
        self.layout, self.device = layout, device
        self.flops_per_token, self.peak = flops_per_token, peak
        self._accs: dict[str, _Acc] = {}
        self._steps, self._tokens, self._seconds = 0, 0, 0.0

    def observe(self, auxes: list[MoEAux]) -> None:
        """Keep one micro-batch's routed-call statistics (references only)."""
        for aux in auxes:
            acc = self._accs.get(aux.label)
            if acc is None:
                acc = self._accs[aux.label] = _Acc(aux)
            acc.add(aux)

    def end_step(self, tokens: int, seconds: float) -> None:
        """Count one optimizer step of `tokens` global tokens that took `seconds`."""
        self._steps += 1
        self._tokens += tokens
        self._seconds += seconds

    def collect(self, step: int) -> TrafficWindow:
        """Close the window (collective: every rank calls it at the same step)."""
        L, dev, W = self.layout, self.device, self.layout.world_size
        accs = list(self._accs.values())
        if dev.type == "cuda" and any(a.timers for a in accs):
            # The phase events must have completed before they are read.
            torch.cuda.synchronize(dev)
        segments: list[torch.Tensor] = []
        host: list[float] = []  # host-side values of every label, copied to the device at once
        for a in accs:
            E = a.experts
            seconds = np.zeros(len(PHASES))
            for t in a.timers:
                seconds += [t.resolve()[p] for p in PHASES]
            sent = np.zeros(W)
            if a.sent is not None:  # columns are global ranks: this rank's ep group
                first = L.dp_rank * L.ep
                sent[first : first + len(a.sent)] = a.sent
            host += [a.rows, *sent, *seconds]
            segments += [
                _sum(a.routed, (E,), dev),
                _sum(a.dropped, (1,), dev),
                *[_sum(a.term_values[k], (1,), dev) for k in a.terms],
                _sum(a.kept, (E,), dev),
                _sum(a.skipped, (1,), dev),
                _sum(a.entropy, (1,), dev),
                # The bias is the same on every rank: packed here so it needs no copy of its own.
                _sum([] if a.bias is None else [a.bias], (a.bias_numel,), dev),
            ]
        host_t = torch.tensor(host or [0.0], dtype=torch.float64)
        local = torch.cat([*segments, host_t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else host_t])
        if L.distributed:
            gathered = torch.empty(W * local.numel(), dtype=torch.float64, device=dev)
            _all_gather_single(gathered, local)
            rows = gathered.view(W, -1)
        else:
            rows = local.view(1, -1)
        # NOTE: device-to-host sync, once per window.
        rows_np = rows.cpu().numpy()
        window = TrafficWindow(step=step, steps=self._steps)
        off = 0
        host_off = rows_np.shape[1] - len(host_t)
        steps = max(self._steps, 1)

        def take(n: int) -> np.ndarray:
            nonlocal off
            out = rows_np[:, off : off + n]
            off += n
            return out

        def take_host(n: int) -> np.ndarray:
            nonlocal host_off
            out = rows_np[:, host_off : host_off + n]
            host_off += n
            return out

        for a in accs:
            E = a.experts
            routed, dropped = take(E)[0], take(1)[0, 0]
            terms = {k: float(take(1)[0, 0]) / a.calls for k in a.terms}
            kept, skipped, entropy = take(E).sum(0), take(1).sum(), take(1).sum()
            bias = take(a.bias_numel)[0]
            per_rank = take_host(1 + W + len(PHASES))  # [world, rows | bytes sent | seconds]
            rows_total = per_rank[:, 0].sum()
            window.calls.append(
                CallStats(
                    label=a.label,
                    block=a.block,
                    routed=routed.round().astype(np.int64),
                    kept=kept.round().astype(np.int64),
                    dropped=int(round(dropped)),
                    skipped=int(round(skipped)),
                    assignments=a.assignments,
                    capacity=a.capacity,
                    calls=a.calls,
                    router_entropy=float(entropy / rows_total) if rows_total else 0.0,
                    terms=terms,
                    bias=None if a.bias is None else bias.reshape(a.bias.shape),
                    bytes_matrix=per_rank[:, 1 : 1 + W] / steps if a.sent is not None else None,
                    ms=per_rank[:, 1 + W :] * 1000.0 / steps,
                )
            )
        if self._seconds > 0:
            window.tokens_per_s = self._tokens / self._seconds
            window.model_tflops = self.flops_per_token * window.tokens_per_s / W / 1e12
            if self.peak:
                window.mfu = window.model_tflops / self.peak
        self._accs, self._steps, self._tokens, self._seconds = {}, 0, 0, 0.0
        return window


def set_timing(model: torch.nn.Module, on: bool) -> None:
    """Turn phase timing on or off in every routed layer's ExpertParallel."""
    for module in model.modules():
        ep = getattr(module, "ep", None)
        if ep is not None and hasattr(ep, "timing"):
            ep.timing = on

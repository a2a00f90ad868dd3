"""Where one routed call's forward time goes: route, dispatch, all-to-all, expert compute,
combine.

A routed layer starts a timer when it is entered and calls `lap(phase)` at each phase
boundary: the time since the previous lap is charged to `phase` (a phase may be lapped
several times, e.g. the two all-to-alls). On CPU a lap reads the host clock: every op has
finished when it returns. On CUDA a lap records an event, and the events are read once
per logging window (`resolve`, after the window's synchronisation), so timing adds no
host sync to a step.

Phases of ExpertParallel.run (parallel/expert_parallel.py):
  route      router matmul, top-k, capacity (its all-gather under ep), balancing sums
  dispatch   sort by expert, gather rows, count exchange and split sizes, order received rows
  all_to_all the two payload exchanges (rows out, expert outputs back)
  compute    the local experts, which read the received rows in expert order and write
             their outputs back in received order
  combine    scale by the routing weights, scatter-add into the tokens
In one process the token-choice FFN runs gather, experts, weights and scatter-add as one
op (ops.expert_mlp): all of it is charged to compute, and dispatch and combine read 0.
Only the forward is timed: the backward's all-to-alls run inside autograd.
"""

from __future__ import annotations

import time

import torch

PHASES = ("route", "dispatch", "all_to_all", "compute", "combine")


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._last = self._now()

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def lap(self, phase: str) -> None:
        now = self._now()
        if self.cuda:
            self._pending.append((phase, self._last, now))
        else:
            self.seconds[phase] += now - self._last
        self._last = now

    def resolve(self) -> dict[str, float]:
        """Seconds per phase. On CUDA the caller must have synchronised the device."""
        for phase, start, end in self._pending:
            self.seconds[phase] += start.elapsed_time(end) / 1000.0
        self._pending = []
        return self.seconds


class _NoTimer:
    """Timing off: laps cost one attribute lookup and a call."""

    def lap(self, phase: str) -> None:
        pass


NO_TIMER = _NoTimer()

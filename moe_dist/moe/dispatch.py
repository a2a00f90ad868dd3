"""Grouping routed assignments by expert (the local half of dispatch).

Legend: P assignments (rows x top-k, flattened row-major), N kept assignments, E experts.

Every routed layer (token-choice MoE, sigma-MoE, SliceMoE, SwitchHead's V and O) does:
  1. sort its assignments by expert -> the rows of each expert are contiguous, and
     within an expert they stay in assignment (token) order,
  2. hand the sorted row indices to ExpertParallel.run (local, or all-to-all across ranks),
  3. scale the outputs by the routing weights and scatter-add them into their rows.
No [T, E, capacity] one-hot tensors (DeepSpeed-MoE's einsum dispatch) anywhere.

Capacity drops take one of three forms:
  - left out, ep=1 on CPU in eager: the dropped assignments sort after every kept one and
    the order is cut at the kept count, which the host reads (one sync, free on CPU, where
    computing the dropped rows is not).
  - sent only if kept, ep > 1: the same order, uncut; ExpertParallel.run sends only its
    first sum(rows_per_expert) rows and reads that number with the all-to-all's split
    sizes, which it must read anyway, so the layer makes one sync, not two.
  - computed, ep=1 on a GPU or under torch.compile (computes_dropped): every assignment
    is sorted in and the dropped ones get no output, weight 0 in the token MoE, a zeroed
    expert output in SliceMoE. No shape then depends on the data: a GPU sync drains the
    launch queue, which a small layer's host time then no longer overlaps, and under
    compile it would break the graph (and rule out a CUDA graph). This saves the sync
    only where the experts run without one: on the torch (bf16 torch._grouped_mm) and
    triton backends, not on the loop backend, which splits rows by counts read on the
    host. The expert FLOPs are then a dropless layer's: at a capacity factor above 1,
    fewer than the E x capacity padded rows that DeepSpeed-MoE, Tutel and Megatron's
    drop-and-pad compute for the same static shapes. One difference: an expert output
    that overflows to inf on a dropped row gives NaN (inf x 0), where leaving the row out
    gives nothing; on a kept row it is inf or NaN either way.
"""

from __future__ import annotations

from typing import Optional

import torch


def host_reads_free(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host costs nothing: CPU in eager. On a GPU a
    read drains the launch queue, and under torch.compile it breaks the graph.
    (tools/count_layer_ops.py rebinds this to count the ops a GPU's path launches.)"""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def _scatter_counts(flat: torch.Tensor, num_experts: int, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Counts of `flat`'s ids (only where `keep`), by a scatter-add into [E] zeros: static shapes."""
    ones = torch.ones_like(flat, dtype=torch.long) if keep is None else keep.long()
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, ones)


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[num_experts] int64: how many of `ids` (all in [0, num_experts)) name each expert.

    A scatter-add of ones into [E] zeros: a static shape, no host sync. torch.bincount
    sizes its output by max(ids) + 1, read on the host: on CUDA it copies min(ids) and
    max(ids) to the host (two syncs a call, two or three calls per routed layer), and
    torch.compile breaks the graph there. bincount is kept for CPU eager only, where
    reading a value is free and it is 1.3-1.8x faster (8-85 us for 4k-131k ids, 2 cores).
    Integer adds are exact, so both give the same counts in any order (tests check they
    agree). On CUDA the scatter-add's atomics all hit E addresses: not timed there yet."""
    flat = ids.reshape(-1)
    if host_reads_free(flat.device):
        return torch.bincount(flat, minlength=num_experts)
    return _scatter_counts(flat, num_experts)


def computes_dropped(ep_size: int, device: torch.device) -> bool:
    """Whether a routed layer keeps its capacity-dropped assignments in the dispatch, giving
    them no output, rather than leave them out (see the module docstring)."""
    return ep_size == 1 and not host_reads_free(device)


def _kept_first(expert_P: torch.Tensor, keep_P: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order_P, kept_per_expert_E): every assignment, the kept ones stably sorted by expert
    first (in assignment order within an expert), then the dropped ones; no host sync."""
    key_P = expert_P.masked_fill(~keep_P, num_experts)  # dropped: one bucket past the last expert
    return torch.sort(key_P, stable=True).indices, expert_counts(key_P, num_experts + 1)[:num_experts]


def sort_by_expert(
    expert_P: torch.Tensor, keep_P: Optional[torch.Tensor], num_experts: int, counts_E: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(assignment_N, tokens_per_expert_E): the kept assignment ids, stably sorted by expert
    (rows of one expert stay in assignment order), and how many each expert got.
    counts_E: expert_counts(expert_P) if the caller has them (used when keep_P is None)."""
    if keep_P is None:
        counts_E = expert_counts(expert_P, num_experts) if counts_E is None else counts_E
        return torch.sort(expert_P, stable=True).indices, counts_E
    order_P, kept_E = _kept_first(expert_P, keep_P, num_experts)
    # NOTE: device-to-host sync: the number of kept rows sizes the permuted buffer.
    return order_P[: int(kept_E.sum())], kept_E


def dispatch_order(
    expert_P: torch.Tensor, keep_P: Optional[torch.Tensor], num_experts: int, ep_size: int,
    counts_E: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:  # fmt: skip
    """(assignment_N, rows_per_expert_E, dropped_N, kept_per_expert_E): the assignments
    sorted by expert under the module docstring's rule for capacity drops.
      - left out (ep=1, CPU eager): sort_by_expert; dropped_N is None.
      - ep > 1: assignment_N lists every assignment, the kept ones first; only the first
        rows_per_expert_E.sum() are run (ExpertParallel.run), so the caller keeps the
        prefix as long as run's output. dropped_N is None.
      - computed (computes_dropped): every assignment, sorted by expert; dropped_N marks
        the rows whose outputs the caller must zero.
    counts_E: expert_counts(expert_P), before drops, if the caller has them."""
    if keep_P is None:
        assignment_N, rows_E = sort_by_expert(expert_P, None, num_experts, counts_E)
        return assignment_N, rows_E, None, rows_E
    if ep_size > 1:
        order_P, kept_E = _kept_first(expert_P, keep_P, num_experts)
        return order_P, kept_E, None, kept_E
    if not computes_dropped(ep_size, expert_P.device):
        assignment_N, kept_E = sort_by_expert(expert_P, keep_P, num_experts)
        return assignment_N, kept_E, None, kept_E
    assignment_N, rows_E = sort_by_expert(expert_P, None, num_experts, counts_E)
    kept_E = _scatter_counts(expert_P, num_experts, keep_P)  # no sync
    return assignment_N, rows_E, ~keep_P.index_select(0, assignment_N), kept_E

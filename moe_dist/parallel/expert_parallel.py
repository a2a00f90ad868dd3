"""Expert parallelism: what a routed layer needs from the process groups, in one object.

Legend: T local tokens (or routed rows), D row width, E experts of the layer (global ids),
E_loc experts on this rank, K top-k, N local routed rows, R rows received, P ep size.

A routed layer does its routing locally, then calls
    y_N = ep.run(rows_MD, src_N, tokens_per_expert_E, experts)
with its assignments already sorted by global expert id (src_N: the row each one reads).
ep=1: the experts run on rows_MD[src_N] directly. ep=P:
    1. exchange per-expert counts (all_to_all of E ints), read the split sizes
                                                             <- the one host sync
    2. gather the rows (one copy, already grouped by expert, so by owner rank),
    3. all_to_all_single the rows with variable split sizes (no padding, autograd),
    4. order the received rows by local expert (they arrive grouped by source rank),
    5. run the local experts in that order (one grouped matmul per projection), outputs
       back in received order,
    6. all_to_all back, and the caller combines with its routing weights.
Step 1's sync is the only one in run(). With the experts on the torch or triton backend
(the CPU loop backend reads its counts), it is also the only one in a routed layer's
forward at ep > 1: with a capacity factor, the layer hands run() its kept assignments
followed by the dropped ones, and run() sends only as many rows as the counts say, a
number it reads with the split sizes (moe/dispatch.py). At ep=1, dropless routing does not
sync, and a capacity factor syncs once on CPU in eager, never on a GPU (moe/dispatch.py).
Capacity is decided over the whole ep group (capacity_mask), and balancing statistics are
summed over the whole world (sum_stats), so every loss equals its one-process value on
the same global batch.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from moe_dist.moe.dispatch import expert_counts
from moe_dist.moe.router import capacity_mask as local_capacity_mask
from moe_dist.parallel.layout import ParallelLayout, expert_placement
from moe_dist.parallel.phase_timer import NO_TIMER, PhaseTimer


# torch 2.13 renamed all_gather_into_tensor to all_gather_single; the GPU machines run 2.11.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _AllReduceSum(torch.autograd.Function):
    """Sum over the world with autograd: the backward of a sum that every rank uses is the
    sum of every rank's gradient. Written here because torch.distributed.nn's all_reduce
    is deprecated and the functional all_reduce that replaces it has no autograd."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class ExpertParallel:
    def __init__(self, layout: Optional[ParallelLayout] = None, shard: bool = True):
        """shard=False: every rank holds every expert (replicated placement) but the
        balancing statistics are still summed over the world's global batch."""
        self.layout = layout if layout is not None else ParallelLayout.single()
        self.size = self.layout.ep if shard else 1
        self.rank = self.layout.ep_rank if shard else 0
        self.group = self.layout.ep_group if shard else None
        self.world = self.layout.world_size
        self.timing = False
        """Time the phases of every routed call (set by the trainer's traffic monitor)."""
        self._owner_cache: dict[tuple[int, str], torch.Tensor] = {}

    def timer(self, device: torch.device):
        """A PhaseTimer started now, or a no-op one when timing is off."""
        return PhaseTimer(device) if self.timing else NO_TIMER

    # -- placement -----------------------------------------------------------------------

    def local_range(self, num_experts: int) -> tuple[int, int]:
        starts = expert_placement(num_experts, self.size)
        return starts[self.rank], starts[self.rank + 1]

    def _owner(self, num_experts: int, device) -> torch.Tensor:
        """Owner rank of each global expert id, [E] (cached per E and device)."""
        key = (num_experts, str(device))
        if key not in self._owner_cache:
            starts = expert_placement(num_experts, self.size)
            sizes = torch.tensor([b - a for a, b in zip(starts, starts[1:])], device=device)
            self._owner_cache[key] = torch.repeat_interleave(  # output_size: no host read
                torch.arange(self.size, device=device), sizes, output_size=num_experts
            )
        return self._owner_cache[key]

    # -- statistics ----------------------------------------------------------------------

    def sum_stats(self, t: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """Sum over every rank of the world (the global batch). With grad=True, autograd
        flows back through the sum (its backward sums the gradients over ranks, which the
        1/world gradient average then turns into the one-process gradient)."""
        if self.world == 1:
            return t
        if grad:
            return _AllReduceSum.apply(t)
        t = t.clone()
        dist.all_reduce(t)
        return t

    def sum_stats_many(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """sum_stats of several tensors in one all-reduce (one float64 buffer; autograd flows
        to the ones that require grad). A small gloo all-reduce costs about 1.3 ms on the
        2-core CPU machine, mostly latency: a routed call's counts, drops and loss sums
        travel together. Integer counts stay exact in float64 (below 2^53). Floating
        tensors come back in their own dtype: a sum over two ranks equals a separate
        sum_stats call, and over more it is rounded once, not once per addition."""
        if self.world == 1:
            return list(tensors)
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        summed = self.sum_stats(flat, grad=any(t.requires_grad for t in tensors))
        out = []
        for t, piece in zip(tensors, summed.split([t.numel() for t in tensors])):
            piece = piece.view(t.shape)
            out.append(piece.to(t.dtype) if t.is_floating_point() else piece.round().to(t.dtype))
        return out

    def capacity_mask(
        self,
        expert_TK: torch.Tensor,
        num_experts: int,
        capacity_factor: Optional[float],
        active_TK: Optional[torch.Tensor] = None,
        counts_E: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Boolean [T, K]: the assignments one process would keep on the ep group's
        concatenated batch (ranks in order). Priority: choice rank k first, then position in
        that concatenation (router.py). Capacity = ceil(T_group * K / E * cf).
        active_TK (SliceMoE's cross-slice dropout): assignments that will not be computed
        take no slot and are not kept; the capacity still counts every row.
        counts_E: this rank's expert_counts(expert_TK), if the caller has them (one
        process, no active_TK: the counts capacity needs)."""
        if capacity_factor is None or capacity_factor == 0:
            keep = torch.ones_like(expert_TK, dtype=torch.bool)
            return keep if active_TK is None else active_TK.clone()
        T, K = expert_TK.shape
        if active_TK is not None:  # inactive ones queue for an extra expert id, E
            expert_TK = expert_TK.masked_fill(~active_TK, num_experts)
        if self.size == 1:
            from moe_dist.moe.router import expert_capacity

            capacity = expert_capacity(T, K, num_experts, capacity_factor)
            if active_TK is None:
                return local_capacity_mask(expert_TK, num_experts, capacity, counts_E)
            return local_capacity_mask(expert_TK, num_experts + 1, capacity) & active_TK
        E = num_experts + 1  # the ids, with the extra one (empty without active_TK)
        # Key (k, e) of every assignment in priority order (k-major, then token).
        key_P = (torch.arange(K, device=expert_TK.device).unsqueeze(1) * E + expert_TK.t()).reshape(-1)
        counts_KE = expert_counts(key_P, K * E)
        sorted_P, order = torch.sort(key_P, stable=True)
        starts = torch.cumsum(counts_KE, 0) - counts_KE
        local_pos = torch.empty_like(key_P)
        local_pos[order] = torch.arange(key_P.numel(), device=key_P.device) - starts[sorted_P]
        # Counts of every rank of the ep group: [P, K, E].
        gathered = torch.empty(self.size * K * E, dtype=counts_KE.dtype, device=counts_KE.device)
        _all_gather_single(gathered, counts_KE.contiguous(), group=self.group)
        gathered = gathered.view(self.size, K, E)
        total_KE = gathered.sum(0)
        before_KE = gathered[: self.rank].sum(0)  # same (k, e) on lower ranks
        earlier_k_KE = torch.cumsum(total_KE, 0) - total_KE  # all ranks, lower choice rank
        offset_P = (earlier_k_KE + before_KE).reshape(-1)[key_P]
        # The group's rows from the gathered counts (each row makes K assignments), so ranks
        # with unequal batches still agree on one capacity; a tensor, so no host sync.
        # Integer math in float64 rounded like expert_capacity's round-then-ceil.
        rows = total_KE.sum() // K
        capacity = torch.ceil(torch.round(rows.double() * K / num_experts * capacity_factor, decimals=9))
        keep_P = (offset_P + local_pos) < capacity
        keep = keep_P.view(K, T).t()
        return keep if active_TK is None else keep & active_TK

    # -- dispatch ------------------------------------------------------------------------

    def run(
        self,
        rows_MD: torch.Tensor,
        src_N: Optional[torch.Tensor],
        tokens_per_expert_E: torch.Tensor,
        experts: Callable[..., torch.Tensor],
        timer=NO_TIMER,
    ) -> tuple[torch.Tensor, list[int]]:
        """Expert outputs for the sorted assignments, [N, D_out], and the bytes this rank sent
        to each ep rank (dispatch + combine; the entry of this rank is its local copy).
        src_N=None: rows_MD is already the sorted assignment rows. At ep > 1 src_N (or
        rows_MD) may list more rows than tokens_per_expert_E sums to: the rest (capacity
        drops, sorted last) are not sent, and the output has only the counted rows, so the
        caller keeps that prefix of its assignments. experts(x, counts[, order]):
        the local experts on rows sorted by expert, or read through `order` (see
        GroupedExperts.forward). `timer` gets the dispatch, all_to_all and compute laps."""
        if self.size == 1:
            # index_select, not rows_MD[src_N]: deterministic gradients (see ops/__init__.py).
            x_ND = rows_MD if src_N is None else rows_MD.index_select(0, src_N)
            timer.lap("dispatch")
            y_ND = experts(x_ND, tokens_per_expert_E)
            timer.lap("compute")
            return y_ND, []
        from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

        P, E = self.size, tokens_per_expert_E.numel()
        lo, hi = self.local_range(E)
        E_loc = hi - lo
        device = rows_MD.device
        sizes = [b - a for a, b in zip(expert_placement(E, P), expert_placement(E, P)[1:])]
        # 1. counts exchange: rank j receives, from every source, the counts of j's experts.
        recv_counts = torch.empty(P * E_loc, dtype=tokens_per_expert_E.dtype, device=device)
        dist.all_to_all_single(
            recv_counts, tokens_per_expert_E.contiguous(), [E_loc] * P, sizes, group=self.group
        )
        owner_E = self._owner(E, device)
        send_rows_P = torch.zeros(P, dtype=tokens_per_expert_E.dtype, device=device).index_add(
            0, owner_E, tokens_per_expert_E
        )
        recv_counts_PE = recv_counts.view(P, E_loc)
        # NOTE: device-to-host sync: all_to_all split sizes must be Python ints.
        splits = torch.cat([send_rows_P, recv_counts_PE.sum(1)]).tolist()
        send_splits, recv_splits = splits[:P], splits[P:]
        # 2. the rows sent: the first sum(send_splits) of the sorted ones (the rest are
        # capacity drops). index_select, not rows_MD[src_N]: deterministic gradients.
        n_send = sum(send_splits)
        x_ND = rows_MD[:n_send] if src_N is None else rows_MD.index_select(0, src_N[:n_send])
        x_ND = x_ND.contiguous()
        timer.lap("dispatch")
        # 3. the payload, with autograd.
        x_RD = wait_tensor(all_to_all_single_autograd(x_ND, recv_splits, send_splits, self.group))
        timer.lap("all_to_all")
        # 4. regroup by local expert: rows arrive as [source 0: e0, e1, ...][source 1: ...].
        label_R = torch.repeat_interleave(
            torch.arange(E_loc, device=device).repeat(P), recv_counts, output_size=x_RD.shape[0]
        )
        order_R = torch.sort(label_R, stable=True).indices
        timer.lap("dispatch")
        # 5. the experts read their rows through order_R and write their outputs back in
        # received order (undoing 4). The loop and triton backends gather and scatter
        # through order_R expert by expert, without a sorted copy of all the rows.
        y_RD = experts(x_RD, recv_counts_PE.sum(0), order_R)
        timer.lap("compute")
        y_ND = wait_tensor(all_to_all_single_autograd(y_RD, send_splits, recv_splits, self.group))
        timer.lap("all_to_all")
        in_bytes = x_ND.shape[1] * x_ND.element_size()
        out_bytes = y_ND.shape[1] * y_ND.element_size()
        sent = [s * in_bytes + r * out_bytes for s, r in zip(send_splits, recv_splits)]
        return y_ND, sent

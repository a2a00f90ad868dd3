"""What every routed layer returns beside its output: losses and routing statistics.

Layers return these from forward (no global side channel). The model collects them in
depth order, one per routed call, and marks each with the block module that routed
(`block`): MoEUT's shared blocks return one per repeat, all with the same block, and
`total_aux_loss` pools the entropy regulariser over each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from moe_dist.moe.router import entropy_regularizer


@dataclass
class MoEAux:
    name: str
    """What routed: 'ffn', 'attn_src', 'attn_dst'."""
    loss: torch.Tensor
    """Weighted per-call auxiliary losses (Switch LB, z-loss, slice capacity), float32 scalar."""
    tokens_per_expert: torch.Tensor
    """[E] assignments routed to each expert before capacity drops (detached, int64)."""
    dropped: torch.Tensor
    """Assignments dropped for capacity (detached, int64 scalar)."""
    assignments: int
    """Routed rows x top-k."""
    probs_sum: Optional[torch.Tensor] = None
    """Sum over rows of softmax(router logits), for the pooled entropy regulariser: [E] (or
    [H, E]) over the global batch, or with entropy_scope=sequence [B, E] (or [B, H, E]),
    this rank's sequences."""
    num_rows: Any = 0
    """Rows that probs_sum sums over: over the global batch (a tensor, so no host sync), or
    per sequence with entropy_scope=sequence."""
    entropy_weight: float = 0.0
    """Weight of the entropy regulariser for this router."""
    num_sequences: Any = None
    """entropy_scope=sequence: the mean's divisor, the global batch's sequences (times the
    heads, for SwitchHead's per-head gates); None for the batch scope."""
    sum_over_ranks: Any = None
    """entropy_scope=sequence: sums a list of tensors over the world with autograd (one
    all-reduce; ExpertParallel.sum_stats_many)."""
    layer: int = -1
    """Depth (0-based application index) of the block that routed; set by the model."""
    block: int = -1
    """Index of the block module that routed (MoEUT: repeats of a shared block share it);
    set by the model. Calls with the same block (and name) pool their entropy regulariser;
    -1 (a layer called outside a model) pools alone. Set outside the layers on purpose: an
    id(module) taken inside a block compiled by train.compile makes dynamo guard on the
    module's identity, so every block compiles its own graph and, past dynamo's recompile
    limit (8), the rest run uncompiled."""
    sent_bytes: list[int] = field(default_factory=list)
    """Under expert parallelism: bytes this rank sent to each ep rank in this call
    (rows dispatched + expert outputs returned); empty in one process."""
    # -- traffic statistics (trainer/traffic.py); all detached, none synced to the host --
    kept_per_expert: Optional[torch.Tensor] = None
    """[E] assignments of THIS rank's rows that each expert kept (after capacity drops and
    slice dropout): the ones whose output reaches the tokens, int64. (Where dropped rows
    are computed with weight 0, moe/dispatch.py, they are not counted.)"""
    skipped: Optional[torch.Tensor] = None
    """Assignments of this rank's rows not computed because cross-slice dropout zeroed
    their weight (SliceMoE training only; not a capacity drop), int64 scalar."""
    capacity: Optional[int] = None
    """An expert's capacity in this call, summed over the world's ep groups (None: dropless)."""
    router_entropy_sum: Optional[torch.Tensor] = None
    """Sum over this rank's rows of the entropy (nats) of softmax(router logits)."""
    local_rows: int = 0
    """Rows this rank routed (router_entropy_sum's count)."""
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    """Unweighted auxiliary-loss terms of this call, over the global batch: switch_lb,
    z_loss, slice_cv2, entropy_reg (the per-call value; the loss pools MoEUT repeats)."""
    balance_bias: Optional[torch.Tensor] = None
    """The router's aux-loss-free selection bias [G, E] (a live buffer, not a copy)."""
    timer: Any = None
    """PhaseTimer of this call's forward, when the trainer asked for timing."""

    @property
    def label(self) -> str:
        return f"L{self.layer:02d}_{self.name}"


def sequence_probs(probs_RE: torch.Tensor, rows_per_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """entropy_scope=sequence, this rank's part: the softmax summed per sequence, [B, (H,) E]
    from rows [T, (H,) E] (T = B * rows_per_seq), and the sum over sequences (and heads) of
    p log p, detached: the per-call value to log, which the caller sums over ranks."""
    probs_seq = probs_RE.unflatten(0, (-1, rows_per_seq)).sum(1)
    return probs_seq, entropy_regularizer(probs_seq.detach(), rows_per_seq)


def entropy_fields(
    probs_seq: Optional[torch.Tensor], summed: torch.Tensor, rows: torch.Tensor, rows_per_seq: int, heads: int = 1
) -> tuple[torch.Tensor, Any, Any, torch.Tensor]:
    """(probs_sum, num_rows, num_sequences, entropy_reg term) for a routed call's MoEAux, after
    its all-reduce. Sequence scope (probs_seq given): summed is sequence_probs's logged value
    summed over ranks, averaged over the global batch's sequences x heads (rows: the global
    row count). Batch scope: summed is the softmax summed over the global batch ([E], or
    [H, E] for SwitchHead's gates, whose heads are averaged, as the sequence scope does)."""
    if probs_seq is not None:
        num_sequences = rows / rows_per_seq * heads
        return probs_seq, rows_per_seq, num_sequences, summed / num_sequences
    probs_sum = summed.float()
    return probs_sum, rows, None, batch_entropy(probs_sum, rows)


def batch_entropy(probs_sum: torch.Tensor, rows) -> torch.Tensor:
    """entropy_scope=batch: sum_e p log p of the batch's mean softmax, averaged over heads
    when there are some ([H, E]): the MoEUT authors average heads, and the sequence scope
    does, so one attention.entropy_loss_weight means the same in both scopes (summed, a
    weight was H times stronger under batch)."""
    term = entropy_regularizer(probs_sum, rows)
    return term / probs_sum.shape[0] if probs_sum.ndim > 1 else term  # no launch for one head


def total_aux_loss(auxes: list[MoEAux]) -> torch.Tensor:
    """Sum of per-call losses plus, per router group, weight * sum_e p_e log p_e of the mean
    softmax pooled over every call of that router (all repeats of a MoEUT group): one p over
    the global batch, or (entropy_scope=sequence) one p per sequence, the terms averaged
    over the global batch's sequences. The sequence scope's sums over ranks travel in one
    all-reduce, so under expert parallelism every rank must call this alike."""
    if not auxes:
        return torch.zeros((), dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float32, device=auxes[0].loss.device)  # no host copy
    pooled: dict[tuple[int, str], list[MoEAux]] = {}
    for a in auxes:
        total = total + a.loss
        if a.entropy_weight > 0 and a.probs_sum is not None:
            key = id(a) if a.block < 0 else a.block
            pooled.setdefault((key, a.name), []).append(a)
    per_sequence: list[tuple[MoEAux, torch.Tensor]] = []
    for group in pooled.values():
        probs_sum = torch.stack([a.probs_sum for a in group]).sum(0)
        rows = sum(a.num_rows for a in group)
        if group[0].num_sequences is None:
            total = total + group[0].entropy_weight * batch_entropy(probs_sum, rows)
        else:  # sums p log p over sequences (and heads); averaged once summed over ranks
            per_sequence.append((group[0], entropy_regularizer(probs_sum, rows)))
    if per_sequence:
        sums = per_sequence[0][0].sum_over_ranks([term for _, term in per_sequence])
        for (a, _), summed in zip(per_sequence, sums):
            total = total + (a.entropy_weight * summed / a.num_sequences).float()
    return total

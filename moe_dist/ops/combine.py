"""The combine of routed rows back into tokens: each row goes to its assignment slot, and
an output row is the sum of its slots.

    y_TF = combine_slots(y_NF, slot_N, num_slots, per_row, slot_weight_M=None)
    y_TF = sum_slots(c_MF, per_row)        # c already in slot order

Legend: N routed rows, M slots (T * K for a top-k MoE; some may hold no row), T = M /
per_row output rows, F width. slot_N: each row's slot, distinct.

Why not `new_zeros(T, F).index_add(0, slot_N // per_row, y_NF)`, the usual one-liner:
1. On CUDA, index_add adds floats with atomics, in another order every run, so the same
   inputs give other last bits. Under activation checkpointing (moe/recompute.py) a
   router after the combine, in the same block, then reads a different value in the
   recompute than in the forward and may send a near-tie to another expert.
2. The atomics add in the output's dtype: in bf16 every add rounds. Summing K bf16 rows
   that way, rounding after each add, against an fp32 sum rounded once (CPU, 4096 x 256
   rows of N(0, 1)): relative error 2.7e-3 against 1.7e-3 at K = 4, 5.0e-3 against 1.7e-3
   at K = 16 (MoEUT's k).
Here no two rows share a slot (index_copy writes each once) and one reduction sums a
row's slots in fp32: deterministic, one rounding. With two slots per row and no weights,
index_add is both already (0 + a + b = a + b in any order), so it stays. The price is a
buffer of M rows, the size of y_NF when nothing is dropped. The Triton kernels combine the
same way (ops/grouped_mm.py: the scatter writes slots, sum_slots adds them).
"""

from __future__ import annotations

from typing import Optional

import torch


def sum_slots(c_MF: torch.Tensor, per_row: int) -> torch.Tensor:
    """Sum each run of per_row consecutive rows (a token's K slots) in fp32 (fp64 stays
    fp64), in c's dtype. Explicit about both because CUDA autocast runs `sum` in fp32 and
    would change the output's dtype, and with it the dtype of the gradient autograd hands
    the backward."""
    if per_row <= 1:
        return c_MF
    acc = torch.promote_types(c_MF.dtype, torch.float32)
    return c_MF.view(-1, per_row, c_MF.shape[1]).sum(1, dtype=acc).to(c_MF.dtype)


def combine_slots(
    y_NF: torch.Tensor, slot_N: torch.Tensor, num_slots: int, per_row: int,
    slot_weight_M: Optional[torch.Tensor] = None, row_N: Optional[torch.Tensor] = None,
) -> torch.Tensor:  # fmt: skip
    """Output row r = sum over the rows n with slot_N[n] // per_row == r of
    slot_weight_M[slot_N[n]] * y_NF[n]. A slot no row fills (a dropped assignment) adds 0.
    slot_weight_M is indexed by slot: the routing weights [T, K] flattened, no gather.
    row_N: slot_N // per_row, where the caller has it."""
    if per_row == 2 and slot_weight_M is None:
        # Two adds into an exact zero: 0 + a + b is a + b rounded once in any order, so
        # index_add is exact and repeatable here, and costs one launch less than the slots.
        row_N = torch.div(slot_N, per_row, rounding_mode="floor") if row_N is None else row_N
        return y_NF.new_zeros(num_slots // per_row, y_NF.shape[1]).index_add(0, row_N, y_NF)
    if slot_N.shape[0] == num_slots:  # every slot filled: no zero fill
        c_MF = torch.empty_like(y_NF).index_copy(0, slot_N, y_NF)
    else:
        c_MF = y_NF.new_zeros(num_slots, y_NF.shape[1]).index_copy(0, slot_N, y_NF)
    if slot_weight_M is not None:
        c_MF = c_MF * slot_weight_M.to(c_MF.dtype).unsqueeze(1)
    return sum_slots(c_MF, per_row)

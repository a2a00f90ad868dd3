"""Row-block schedule of a grouped GEMM, computed on the device (no host sync).

Legend: E experts, N routed rows sorted by expert, B row blocks (an upper bound).

A grouped GEMM tiles the sorted rows in blocks of BLOCK_M rows that never straddle two
experts, so each program multiplies by one expert's weight. Expert e owns
ceil(count_e / BLOCK_M) blocks; their number is data-dependent, but it never exceeds
B = cdiv(N, BLOCK_M) + E, which the host knows without reading the counts. The grid is
launched for B blocks and the surplus programs find expert -1 and exit at once.

Outputs (int32): offs_E1 the row offsets [0, c_0, c_0 + c_1, ..., N], and sched_2B with
row 0 the expert of each block (-1 past the end) and row 1 its first row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def num_blocks_bound(num_rows: int, num_experts: int, block_m: int) -> int:
    """B: sum_e ceil(c_e / BLOCK_M) <= sum_e (c_e / BLOCK_M + 1) <= cdiv(N, BLOCK_M) + E."""
    return triton.cdiv(num_rows, block_m) + num_experts


@triton.jit
def _block_schedule_kernel(
    counts_ptr, offs_ptr, sched_ptr, E, num_blocks,
    BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    es = tl.arange(0, E_POW2)
    e_ok = es < E
    counts = tl.load(counts_ptr + es, mask=e_ok, other=0).to(tl.int32)
    row_end = tl.cumsum(counts, 0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, 0)
    if pid == 0:
        tl.store(offs_ptr + es, row_end - counts, mask=e_ok)
        tl.store(offs_ptr + E, tl.sum(counts, 0))
    bs = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    # Expert of block b = number of experts whose blocks all end at or before b (empty
    # experts end where their predecessor does, so they are skipped); E past the last block.
    done_BE = (block_end[None, :] <= bs[:, None]) & e_ok[None, :]
    expert_B = tl.sum(done_BE.to(tl.int32), axis=1)
    # Pick the expert's first row and first block out of the [E] vectors with a one-hot sum.
    pick_BE = es[None, :] == expert_B[:, None]
    first_row_B = tl.sum(tl.where(pick_BE, (row_end - counts)[None, :], 0), axis=1)
    first_block_B = tl.sum(tl.where(pick_BE, (block_end - blocks)[None, :], 0), axis=1)
    active_B = expert_B < E
    b_ok = bs < num_blocks
    tl.store(sched_ptr + bs, tl.where(active_B, expert_B, -1), mask=b_ok)
    first_B = tl.where(active_B, first_row_B + (bs - first_block_B) * BLOCK_M, 0)
    tl.store(sched_ptr + num_blocks + bs, first_B, mask=b_ok)


def block_schedule(
    tokens_per_expert_E: torch.Tensor, num_rows: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(offs_E1, sched_2B) for rows sorted by expert; num_rows must equal the sum of the counts."""
    assert tokens_per_expert_E.dim() == 1 and block_m >= 1
    E = tokens_per_expert_E.numel()
    B = num_blocks_bound(num_rows, E, block_m)
    counts_E = tokens_per_expert_E.contiguous()
    offs_E1 = torch.empty(E + 1, dtype=torch.int32, device=counts_E.device)
    sched_2B = torch.empty(2, B, dtype=torch.int32, device=counts_E.device)
    e_pow2 = triton.next_power_of_2(max(E, 1))
    # The [BLOCK_B, E] comparison lives in registers: keep it near 8k elements.
    block_b = max(16, min(256, 8192 // e_pow2))
    grid = (triton.cdiv(B, block_b),)
    _block_schedule_kernel[grid](counts_E, offs_E1, sched_2B, E, B, BLOCK_M=block_m, E_POW2=e_pow2, BLOCK_B=block_b)
    return offs_E1, sched_2B


def block_schedule_reference(
    tokens_per_expert_E: torch.Tensor, num_rows: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same outputs with plain torch ops (searchsorted), for tests and reading."""
    E = tokens_per_expert_E.numel()
    B = num_blocks_bound(num_rows, E, block_m)
    counts_E = tokens_per_expert_E.to(torch.int64)
    row_end_E = torch.cumsum(counts_E, 0)
    blocks_E = (counts_E + block_m - 1) // block_m
    block_end_E = torch.cumsum(blocks_E, 0)
    b_B = torch.arange(B, device=counts_E.device)
    expert_B = torch.searchsorted(block_end_E, b_B, right=True)
    active_B = expert_B < E
    e_B = expert_B.clamp(max=max(E - 1, 0))
    first_row_B = (row_end_E - counts_E)[e_B] + (b_B - (block_end_E - blocks_E)[e_B]) * block_m
    offs_E1 = torch.cat([counts_E.new_zeros(1), row_end_E])
    sched_2B = torch.stack([torch.where(active_B, expert_B, -1), torch.where(active_B, first_row_B, 0)])
    return offs_E1.to(torch.int32), sched_2B.to(torch.int32)

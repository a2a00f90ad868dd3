"""Routing noise (expert dropout, cross-slice dropout) as a function of the global row.

Legend: L routed depths (applications of a block: MoEUT repeats count once each), R rows
(tokens, or SliceMoE's (token, slice) pairs), C columns (experts, or top-k slots).

Why not torch.rand: its draws depend on the generator's position, so rank r's rows get
other masks at ep=N than the same rows get in one process, and a compiled graph draws
other numbers than eager. Here u[row, col] is a hash of (key, global row, col, salt): the
same rows get the same masks under any expert-parallel layout, micro-batching, resharded
resume, activation recompute or torch.compile. torch has no stateless counter-based
generator on CPU tensors, hence the small hash below.

The trainer passes, per micro-batch, noise_L2[depth] = (key, row0): key a 32-bit hash of
(run.seed, step, depth) made on the host, row0 the index of this micro-batch's first token
in the step's global batch. Both are device tensors, so a compiled block sees one graph
for every step, and no value is read on the host. Layers called without noise (standalone,
tests) draw from torch.rand as before.
"""

from __future__ import annotations

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
SALT_EXPERT_DROPOUT, SALT_SLICE_DROPOUT = 1, 2


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply, multipliers from Wellons' hash-prospector)
    of int64 values in [0, 2^32). Both multipliers are below 2^31, so no product passes
    2^63: int64 never overflows (signed overflow is undefined in the kernels' C++)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def routing_uniform(noise_2: torch.Tensor, rows: int, cols: int, rows_per_token: int = 1, salt: int = 0) -> torch.Tensor:
    """u[r, c] in [0, 1), float32, [rows, cols]: row r is global row row0 * rows_per_token + r
    (a token's rows_per_token rows are consecutive, as SliceMoE's pairs are)."""
    assert 0 <= cols < 1 << 16 and 0 <= salt < 1 << 15, "columns and salt share one 32-bit word"
    dev = noise_2.device
    key, row0 = noise_2[0], noise_2[1]
    r_R = (row0 * rows_per_token + torch.arange(rows, device=dev)) & _MASK32
    h_R = _mix32(_mix32(r_R) ^ key)
    c_C = _mix32(torch.arange(cols, device=dev) + (salt << 16))
    u_RC = _mix32(h_R[:, None] ^ c_C[None, :])
    return (u_RC >> 8).to(torch.float32) * 2.0**-24  # 24 bits: exact in float32, below 1


def dropout_mask(noise_2, like_RC: torch.Tensor, rate: float, rows_per_token: int = 1, salt: int = 0) -> torch.Tensor:
    """True where a [rows, cols] entry is dropped (probability rate): from the routing noise,
    or from torch.rand where there is none."""
    if noise_2 is None:
        return torch.rand_like(like_RC) < rate
    R, C = like_RC.shape
    return routing_uniform(noise_2, R, C, rows_per_token, salt) < rate


def step_keys(seed: int, step: int, depths: int) -> list[int]:
    """One 32-bit key per routed depth for this optimizer step (host, no device work)."""
    return [int(k) for k in np.random.SeedSequence([seed, step]).generate_state(depths, np.uint32)]


def noise_for(keys: list[int], row0: int, device: torch.device) -> torch.Tensor:
    """noise_L2 = [(key_l, row0)] on the device. From pinned memory without blocking on CUDA:
    a pageable copy would wait for the queued work, a host sync per micro-batch."""
    host = torch.tensor([[k, row0] for k in keys], dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)

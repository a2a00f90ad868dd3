"""The parallel layout of a run, built once from the launcher's environment and passed around.

No module-level process-group globals: the trainer, the data loader and (later) the
expert-parallel dispatcher receive this object. This version runs one process; the
expert-parallel issue adds process groups to it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from moe_dist.config import ParallelConfig
from moe_dist.errors import LaunchError


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"environment variable {name}={raw!r} is not an integer") from None


@dataclass(frozen=True)
class ParallelLayout:
    rank: int
    world_size: int
    local_rank: int
    ep: int

    @property
    def dp(self) -> int:
        return self.world_size // self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, cfg: ParallelConfig) -> "ParallelLayout":
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", 0)
        if not 0 <= rank < world:
            raise LaunchError(f"RANK={rank} is outside WORLD_SIZE={world}")
        if world % cfg.ep != 0:
            raise LaunchError(f"parallel.ep={cfg.ep} does not divide the world size {world}")
        if world > 1 or cfg.ep > 1:
            raise LaunchError(
                f"WORLD_SIZE={world}, parallel.ep={cfg.ep}: this build trains in one process; "
                "multi-process expert/data parallelism is not implemented yet (set parallel.ep=1 "
                "and launch one process)"
            )
        return cls(rank=rank, world_size=world, local_rank=local_rank, ep=cfg.ep)

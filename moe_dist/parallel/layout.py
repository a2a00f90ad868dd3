"""The parallel layout of a run, built once from the launcher's environment and passed around.

world = dp x ep. Ranks are laid out with ep innermost (torchtitan's ["dp", "ep"] mesh):
    ep group of rank r:                    ranks [r - r % ep, ..., r - r % ep + ep - 1]
    expert-data-parallel group of rank r:  ranks {r % ep, r % ep + ep, ...}
The experts of every MoE layer are sharded over an ep group; the dp replicas of a shard
form its expert-data-parallel group. Every rank reads its own slice of the global batch.

No module-level process-group globals: the trainer, the data loader and the expert-parallel
dispatchers receive this object (or the ExpertParallel view of it).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

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
    ep_group: Any = None
    """ProcessGroup of this rank's ep group (None when ep == 1)."""
    edp_group: Any = None
    """ProcessGroup of this rank's expert-data-parallel group (None when dp == 1)."""
    wait_group: Any = None
    """A gloo group over the world with the long parallel.wait_timeout_s: the other ranks
    wait on it while rank 0 alone prepares data or checksums a checkpoint (None: one rank,
    or the default group when built without a wait timeout)."""

    @property
    def dp(self) -> int:
        return self.world_size // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def gather_object(self, obj: Any, group: Any = None) -> list:
        """Every rank's obj (picklable), in rank order; [obj] in one process. For decisions
        all ranks must take together (an error on any rank stops every rank)."""
        if not self.distributed:
            return [obj]
        every: list = [None] * self.world_size
        dist.all_gather_object(every, obj, group=group)
        return every

    @classmethod
    def single(cls) -> "ParallelLayout":
        return cls(rank=0, world_size=1, local_rank=0, ep=1)

    @classmethod
    def from_env(cls, cfg: ParallelConfig, device_type: str = "cpu", timeout_s: float = 300.0) -> "ParallelLayout":
        """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun and the deepspeed launcher set them; under
        mpirun they come from MPI, see env_from_mpi), validate the layout, and create the
        process groups when world > 1."""
        env_from_mpi()
        tasks = _env_int("SLURM_STEP_NUM_TASKS", 1)
        if os.environ.get("RANK") is None and tasks > 1:
            # Plain `srun -n N python -m moe_dist.train`: nothing sets RANK, and each task
            # would train alone into the same run.dir.
            raise LaunchError(
                f"launched by srun with {tasks} tasks (SLURM_STEP_NUM_TASKS) but RANK is not set: each would "
                "train alone. Use launch/slurm.sbatch (torchrun on every node), or srun --mpi=pmix/pmi2 with mpi4py"
            )
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", 0)
        if not 0 <= rank < world:
            raise LaunchError(f"RANK={rank} is outside WORLD_SIZE={world}")
        if world % cfg.ep != 0:
            raise LaunchError(
                f"parallel.ep={cfg.ep} does not divide the world size WORLD_SIZE={world}: "
                "world = dp x ep needs ep to divide it"
            )
        if world == 1:
            return cls(rank=0, world_size=1, local_rank=local_rank, ep=1)
        if not dist.is_initialized():
            for var in ("MASTER_ADDR", "MASTER_PORT"):
                if not os.environ.get(var):
                    raise LaunchError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun")
            backend = "nccl" if device_type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls.build(rank, world, local_rank, cfg.ep, timeout_s, cfg.wait_timeout_s)

    @classmethod
    def build(
        cls, rank: int, world: int, local_rank: int, ep: int, timeout_s: Optional[float] = None,
        wait_timeout_s: Optional[float] = None,
    ) -> "ParallelLayout":
        """Create the ep and expert-data-parallel groups (every rank must call this). Their
        collectives wait at most timeout_s for a peer (new groups default to 30 minutes);
        the wait group's wait_timeout_s."""
        dp = world // ep
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        ep_group = edp_group = None
        # new_group is collective over the whole world: create every group on every rank.
        for g in range(dp):
            ranks = list(range(g * ep, (g + 1) * ep))
            group = dist.new_group(ranks, timeout=timeout) if ep > 1 else None
            if rank in ranks:
                ep_group = group
        for j in range(ep):
            ranks = list(range(j, world, ep))
            group = dist.new_group(ranks, timeout=timeout) if dp > 1 else None
            if rank in ranks:
                edp_group = group
        wait_group = None
        if wait_timeout_s:
            wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=wait_timeout_s))
        return cls(rank=rank, world_size=world, local_rank=local_rank, ep=ep, ep_group=ep_group, edp_group=edp_group,
                   wait_group=wait_group)


_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def env_from_mpi() -> None:
    """Under mpirun (Open MPI, MPICH/Hydra), take rank and world from MPI through mpi4py;
    rank 0 picks a free port and broadcasts its address, then gloo/nccl start from env://.
    Does nothing when RANK is already set (torchrun, deepspeed) or outside MPI."""
    if os.environ.get("RANK") is not None or not any(v in os.environ for v in _MPI_SIZE_VARS):
        return
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchError(
            "launched by mpirun but mpi4py is missing: pip install 'moe_dist[mpi]' (mpi4py + mpich)"
        ) from None
    import socket

    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    found = None
    if comm.Get_rank() == 0:
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        multi_node = local.Get_size() < comm.Get_size()
        try:
            found = (master_address(multi_node), port, None)
        except LaunchError as e:
            found = (None, None, str(e))
    addr, port, error = comm.bcast(found, root=0)
    if error is not None:  # on every rank, none left waiting
        raise LaunchError(error)
    os.environ.update(
        RANK=str(comm.Get_rank()),
        WORLD_SIZE=str(comm.Get_size()),
        LOCAL_RANK=str(local.Get_rank()),
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
    )


def master_address(multi_node: bool) -> str:
    """Rank 0's address for the others to reach: MASTER_ADDR if set, else this host's
    name's address, else the source address of the default route. A hostname often
    resolves to loopback (Debian's /etc/hosts maps it to 127.0.1.1), which ranks on other
    nodes would take for their own machine and wait on: refused for a multi-node job."""
    import socket

    if os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    addr = socket.gethostbyname(socket.gethostname())
    if addr.startswith("127.") and multi_node:
        try:  # connect() on UDP sends nothing: it only picks the outgoing interface
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect(("10.255.255.255", 1))
                addr = s.getsockname()[0]
        except OSError:
            pass
        if addr.startswith("127.") or addr == "0.0.0.0":
            raise LaunchError(
                f"mpirun across nodes, but rank 0's host {socket.gethostname()} resolves to {addr}, which the "
                "other nodes cannot reach: set MASTER_ADDR to an address of it they can (e.g. mpirun -x MASTER_ADDR=...)"
            )
    return addr


def expert_placement(num_experts: int, ep: int) -> list[int]:
    """Start index of each ep rank's contiguous expert block, plus the end: [s_0, ..., s_ep].

    Counts need not divide: the first num_experts % ep ranks get one more expert
    (387 experts on 4 ranks: 97, 97, 97, 96). Every rank must own at least one.
    """
    if num_experts < ep:
        raise LaunchError(f"{num_experts} experts cannot be sharded over parallel.ep={ep} ranks")
    base, extra = divmod(num_experts, ep)
    starts = [0]
    for j in range(ep):
        starts.append(starts[-1] + base + (1 if j < extra else 0))
    return starts


def init_single_process_group(device_type: str, timeout_s: float) -> None:
    """A one-rank process group for libraries that need one (DeepSpeed) in a one-process run.
    An in-memory store: no port, no rendezvous (torchrun's agent store is not needed)."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(
        backend, store=dist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=timeout_s)
    )


def destroy(layout: Optional[ParallelLayout]) -> None:
    if layout is not None and dist.is_initialized():
        dist.destroy_process_group()

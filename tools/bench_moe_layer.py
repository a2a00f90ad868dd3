"""Our MoE layer against DeepSpeed-MoE's layer and a dense FFN of equal active FLOPs.

    python tools/bench_moe_layer.py [--tokens 4096] [--d-model 256] [--d-expert 512] [--experts 8]
    torchrun --nproc_per_node 2 tools/bench_moe_layer.py          # ep=2 (gloo on CPU, nccl on GPU)
    python tools/bench_moe_layer.py --backends loop,torch         # ours on each grouped_mm backend
    python tools/bench_moe_layer.py --profile 5                   # + where ours spends its time
    python tools/bench_moe_layer.py --capacity-factor 0 --compile # dropless, + ours and dense compiled
    python tools/bench_moe_layer.py --synced                      # + ours with its old host syncs

For top-1 and top-2 at capacity factor 1.25, on the same input, in one process group:
  ours      moe_dist.moe.layer.MoEFFN (sorted dispatch, variable-size all-to-all), one row
            per --backends entry (moe.grouped_mm; default auto, whose pick is printed)
  deepspeed deepspeed.moe.layer.MoE (GShard einsum dispatch, capacity-padded all-to-all),
            experts of the same shape (no biases), use_rts=False
  dense     a GELU FFN of hidden k x d_expert: the same matmul FLOPs per token
  +c        with --compile: ours (each backend) and dense again, under torch.compile
            (nn.Module.compile, --compile-backend inductor), as train.compile runs the blocks
  ours-synced with --synced: ours (auto) as before commit 0c948e1, with torch.bincount
            counts and capacity drops left out of the dispatch: on CUDA, 2 device-to-host
            syncs per count and one for the kept rows (7 per forward at a capacity
            factor). The same computation as ours on CPU. At ep > 1 only the counts
            change: since commit 421a25a the kept rows are counted with the split sizes.
--capacity-factor 0 is dropless: ours without a capacity, DeepSpeed with drop_tokens=False.
syncs: on CUDA, the device-to-host syncs of one forward+backward (sync debug mode).
Each is timed forward+backward, interleaved round-robin (each round starting one layer
later) so machine noise and position hit all alike: the median over --iters samples (after
--warmup), each sample --repeat steps run back to back between two device syncs, divided by
--repeat. On a GPU the default repeat of 10 lets the host queue step i+1 while step i runs,
as in training; with one step per sync a step's host time and GPU time would add up. Peak
memory: torch.cuda.max_memory_allocated on GPU; on CPU the peak of live bytes allocated
during one forward+backward, from torch.profiler's memory events (CPU has no allocator
statistics).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from moe_dist.config import MoEConfig
from moe_dist.models.ffn import FFN
from moe_dist.moe.layer import MoEFFN
from moe_dist.ops.grouped_mm import _resolve
from moe_dist.parallel.expert_parallel import ExpertParallel
from moe_dist.parallel.layout import ParallelLayout, init_single_process_group
from moe_dist.trainer.deepspeed_backend import skip_cpu_shm_comm_build


def deepspeed_moe(d: int, d_expert: int, experts: int, k: int, ep: int, cf: float) -> nn.Module:
    from deepspeed.moe.layer import MoE

    expert = nn.Sequential(nn.Linear(d, d_expert, bias=False), nn.GELU(), nn.Linear(d_expert, d, bias=False))
    drop = cf > 0  # cf 0: DeepSpeed's dropless mode (capacity = the largest expert's load)
    layer = MoE(d, expert, num_experts=experts, ep_size=ep, k=k, capacity_factor=cf if drop else 1.0,
                eval_capacity_factor=cf if drop else 1.0, min_capacity=0, drop_tokens=drop, use_rts=False,
                top2_2nd_expert_sampling=False)
    if dist.is_initialized():
        layer.set_deepspeed_parallelism()
    return layer


def auto_pick(layer: MoEFFN, aux, x: torch.Tensor) -> str:
    """The backend moe.grouped_mm=auto ran this call on at the mean rows per expert ('' for
    a named backend): it depends on the size of the experts' blocks (ops/grouped_mm.py)."""
    if layer.cfg.grouped_mm != "auto":
        return ""
    # Under ep each rank's experts get rows from every rank: the mean is the same, the
    # pick can differ by rank near the threshold.
    w = layer.experts.w_in_EDH  # this rank's experts
    rows = aux.kept_per_expert.sum().item() * layer.ep.size * w.shape[0] // layer.num_experts
    return _resolve("auto", x, w.to(x.dtype), rows)


_COUNT_USERS: list = []  # the moe_dist modules that call expert_counts by that name


@contextlib.contextmanager
def synced_counts_and_drops():
    """Run the routed layers as they were before commit 0c948e1, which took their host syncs
    out: torch.bincount for every expert count, capacity drops left out of the dispatch.
    For a side-by-side measurement of what that gained; a benchmark's patch, not an option
    of the library. Every moe_dist module's `expert_counts` name is rebound, then restored.
    At ep > 1, dispatch_order no longer asks computes_dropped (the kept rows are counted
    with the split sizes since commit 421a25a): there only the counts are as before."""
    import moe_dist.moe.dispatch as dispatch

    counts, computes_dropped = dispatch.expert_counts, dispatch.computes_dropped
    if not _COUNT_USERS:  # found once: a scan of sys.modules per step would be timed
        _COUNT_USERS.extend(m for name, m in list(sys.modules.items())
                            if name.startswith("moe_dist") and getattr(m, "expert_counts", None) is counts)  # fmt: skip
    users = _COUNT_USERS
    try:
        for m in users:
            m.expert_counts = lambda ids, n: torch.bincount(ids.reshape(-1), minlength=n)
        dispatch.computes_dropped = lambda ep_size, device: False
        yield
    finally:
        for m in users:
            m.expert_counts = counts
        dispatch.computes_dropped = computes_dropped


def count_syncs(step) -> int:
    """Device-to-host syncs in one call of step() on CUDA: set_sync_debug_mode("warn") warns
    at each ("called a synchronizing operation"); the autograd engine replays its threads'
    warnings on this one after backward."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def cpu_peak_bytes(step) -> int:
    """Peak live bytes allocated during step(), from the profiler's per-op memory records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def profile_table(step, iters: int, cuda: bool) -> str:
    """torch.profiler over `iters` calls of step(): the ops by self CPU time (the host's
    launch and Python cost, which bounds a small layer on a GPU), with CUDA times on GPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            step()
    events = prof.key_averages()
    calls = sum(e.count for e in events if e.key.startswith("aten::")) / iters
    head = f"aten calls per forward+backward (nested calls included): {calls:.0f}\n"
    return head + events.table(sort_by="self_cpu_time_total", row_limit=25)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-expert", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeat", type=int, default=None, help="steps per timed sample (default: 10 on GPU, 1 on CPU)")
    p.add_argument("--backends", default="auto", help="comma-separated moe.grouped_mm values for our layer")
    p.add_argument("--compile", action="store_true", help="also time ours and dense under torch.compile")
    p.add_argument("--synced", action="store_true", help="also time ours with its pre-0c948e1 host syncs")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (the smoke test: aot_eager)")
    p.add_argument("--profile", type=int, default=0, metavar="ITERS",
                   help="after timing, profile ours (each --backends entry, top-2) over ITERS steps")
    a = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    repeat = a.repeat if a.repeat is not None else (10 if cuda else 1)
    if repeat < 1:
        p.error("--repeat must be >= 1")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    import deepspeed

    if cuda:
        torch.cuda.set_device(device)
    if world == 1:  # plain `python`: an in-memory one-rank group, so DeepSpeed does not look for MPI
        init_single_process_group(device.type, timeout_s=600)
    if not cuda:
        skip_cpu_shm_comm_build()  # a ~70 s compile of an op the MoE layer never uses
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")  # DeepSpeed needs its comm
    rank = dist.get_rank()
    layout = ParallelLayout.build(rank, world, 0, ep=world)
    dtype = torch.bfloat16 if cuda else torch.float32
    D, F, E = a.d_model, a.d_expert, a.experts
    torch.manual_seed(0)
    x = torch.randn(a.tokens, D, device=device, dtype=dtype)
    rows, notes, profiles = [], [], []
    for k in (1, 2):
        def build_ours(backend):
            torch.manual_seed(0)
            cfg = MoEConfig(num_experts=E, top_k=k, d_expert=F, capacity_factor=a.capacity_factor,
                            lb_loss_weight=0.01, z_loss_weight=0.0, grouped_mm=backend)  # fmt: skip
            ours = MoEFFN(D, cfg, "gelu", ep=ExpertParallel(layout))
            ours.reset_parameters(0.02, 0.02)
            ours.shard_experts()
            return ours.to(device, dtype)

        def build_dense():
            torch.manual_seed(0)
            return FFN(D, k * F, "gelu").to(device, dtype)

        builders = {"ours" if b == "auto" else f"ours-{b}": lambda b=b: build_ours(b) for b in a.backends.split(",")}
        if a.synced:
            builders["ours-synced"] = lambda: build_ours("auto")
        builders["deepspeed"] = lambda: deepspeed_moe(D, F, E, k, world, a.capacity_factor).to(device, dtype)
        builders["dense"] = build_dense
        models = {name: build() for name, build in builders.items()}
        if a.compile:  # the warmup iterations compile them
            for name in [n for n in builders if n not in ("deepspeed", "ours-synced")]:
                models[name + "+c"] = builders[name]()
                models[name + "+c"].compile(backend=a.compile_backend, mode=a.compile_mode)

        def step(name, pick=False):
            xi = x.detach().requires_grad_()
            ours = name.startswith("ours")
            with synced_counts_and_drops() if name == "ours-synced" else contextlib.nullcontext():
                out = models[name](xi.view(1, a.tokens, D) if ours else xi)
            if ours:  # (y, MoEAux)
                loss = out[0].float().square().mean() + out[1].loss
                if pick and not name.endswith("+c"):  # untimed: reads a count on the host
                    picks.add(auto_pick(models[name], out[1], xi))
            elif name == "deepspeed":  # (y, l_aux, expert counts)
                loss = out[0].float().square().mean() + out[1]
            else:
                loss = out.float().square().mean()
            loss.backward()

        def sync():
            if cuda:
                torch.cuda.synchronize()

        picks: set[str] = set()
        times = {n: [] for n in models}
        names = list(models)
        for i in range(a.warmup + a.iters):
            # Each round starts one layer later: a fixed order gave the layer timed first
            # after the barrier a position cost (about 10% at 256 tokens on CPU).
            for n in names[i % len(names):] + names[: i % len(names)]:
                dist.barrier()
                sync()
                t0 = time.perf_counter()
                for _ in range(repeat):
                    step(n)
                sync()
                if i >= a.warmup:
                    times[n].append((time.perf_counter() - t0) / repeat)
        for n in models:
            dist.barrier()
            syncs = "-"  # CPU: nothing to wait for
            if cuda:
                # The step's own peak, above what is resident: every compared layer's weights
                # and gradients stay allocated (as cpu_peak_bytes counts only the step's bytes).
                sync()
                resident = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step(n, pick=True)
                sync()
                peak = torch.cuda.max_memory_allocated() - resident
                syncs = str(count_syncs(lambda: step(n)))  # its own step: pick reads the host
                sync()
            else:
                peak = cpu_peak_bytes(lambda: step(n, pick=True))
            med = statistics.median(times[n])
            rows.append((k, n, med * 1000, peak / 2**20, syncs))
        if "auto" in a.backends.split(","):
            notes.append(f"top-{k}: auto ran {' and '.join(sorted(picks - {''}))}")
        if a.profile and k == 2:  # every rank profiles (ep's collectives); rank 0 prints
            for name in (n for n in models if n.startswith("ours")):
                table = profile_table(lambda: step(name), a.profile, cuda)
                profiles.append(f"\nprofile of {name}, top-2, {a.profile} forward+backward steps:\n{table}")
    if rank == 0:
        where = torch.cuda.get_device_name(device) if cuda else "CPU (gloo)"
        print(f"{where}, world {world} (ep={world}), {a.tokens} tokens/rank, d_model {D}, d_expert {F}, {E} experts, "
              f"cf {a.capacity_factor}, {dtype}, median of {a.iters} samples of {repeat} back-to-back step(s)")
        print(f"{'top-k':<6}{'layer':<15}{'fwd+bwd ms':>11}{'vs ours':>9}{'peak MiB':>10}{'syncs':>7}")
        for k, n, ms, mib, syncs in rows:
            base = next(r[2] for r in rows if r[0] == k and r[1].startswith("ours"))
            print(f"{k:<6}{n:<15}{ms:>11.2f}{ms / base:>9.2f}{mib:>10.2f}{syncs:>7}")
        print("; ".join(notes))
        for text in profiles:
            print(text)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Time one MoE layer forward+backward at ep = 1, 2, 4 (gloo on CPU, nccl on GPU) and
count the bytes each rank sends per routed assignment against the payload minimum.

    python tools/bench_dispatch.py                      # CPU, gloo, ep 1 2 4
    python tools/bench_dispatch.py --tokens 4096 --d-model 512 --experts 32 --ep 1 2

Weak scaling: every rank routes --tokens tokens. Each rank runs torch with one thread, so
ep=2 uses both cores of a 2-core machine and ep=4 oversubscribes it (read its time as an
upper bound there). Reported: median ms of --iters timed iterations after --warmup, and
bytes sent to other ranks per routed assignment, beside the minimum: the fraction of
assignments whose expert lives elsewhere x (D in + D out) x element size. The difference
is the per-call exchange of E expert counts (8 bytes each).
"""

import argparse
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from moe_dist.config import MoEConfig  # noqa: E402
from moe_dist.moe.layer import MoEFFN  # noqa: E402
from moe_dist.parallel.expert_parallel import ExpertParallel  # noqa: E402
from moe_dist.parallel.layout import ParallelLayout, expert_placement  # noqa: E402


def _worker(rank, world, port, a, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
        layout = ParallelLayout.build(rank, world, 0, world)
    else:
        layout = ParallelLayout.single()
    cfg = MoEConfig(num_experts=a.experts, top_k=a.top_k, d_expert=a.d_expert, capacity_factor=None, grouped_mm="auto")
    torch.manual_seed(0)
    layer = MoEFFN(a.d_model, cfg, "swiglu", ep=ExpertParallel(layout)).to(device)
    layer.reset_parameters(0.02, 0.02)
    layer.shard_experts()
    dtype = torch.bfloat16 if cuda else torch.float32
    x = torch.randn(1, a.tokens, a.d_model, device=device, generator=None).requires_grad_()
    times, sent, remote = [], 0, 0
    starts = expert_placement(a.experts, world)
    lo, hi = starts[layout.ep_rank], starts[layout.ep_rank + 1]
    # The counts exchange: a count (int64) per expert, each to its expert's rank; this
    # rank's own stay here.
    counts_bytes = (a.experts - (hi - lo)) * 8 if world > 1 else 0
    for it in range(a.warmup + a.iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            y, aux = layer(x)
        y.float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        if world > 1:
            dist.barrier()
        if it >= a.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
            others = [b for j, b in enumerate(aux.sent_bytes) if j != layout.ep_rank]
            sent += sum(others) + counts_bytes
    # Assignments routed to experts on other ranks, from the last iteration's routing.
    expert_TK = layer.route(x.detach().view(-1, a.d_model))[0]
    remote = int(((expert_TK < lo) | (expert_TK >= hi)).sum())
    # Rows travel in the compute dtype: bf16 under CUDA autocast (moe/experts.py: autocast_input).
    row_bytes = dtype.itemsize if cuda else x.element_size()
    out.put((rank, statistics.median(times), sent / a.iters, remote, expert_TK.numel(), row_bytes))
    if world > 1:
        dist.destroy_process_group()
        # No interpreter finalization while `layer` still owns the ep group: its gloo worker
        # thread may need the GIL to release a finished all_to_all (see moe_dist/train.py).
        os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-expert", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=7)
    a = p.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores), gloo"
    print(f"# one MoE layer fwd+bwd: {a.tokens} tokens/rank, d_model {a.d_model}, {a.experts} experts x "
          f"{a.d_expert} (SwiGLU), top-{a.top_k}, dropless; {device}; torch {torch.__version__}")
    print("| ep | median ms/iter (max over ranks) | tokens/s (all ranks) | bytes sent to other ranks per routed assignment | payload minimum | ratio |")
    print("|---|---|---|---|---|---|")
    ctx = mp.get_context("spawn")
    for ep in a.ep:
        out = ctx.SimpleQueue()
        mp.start_processes(_worker, args=(ep, free_port(), a, out), nprocs=ep, start_method="spawn")
        res = [out.get() for _ in range(ep)]
        ms = max(r[1] for r in res)
        sent = sum(r[2] for r in res)
        remote = sum(r[3] for r in res)
        assigned = sum(r[4] for r in res)
        elem = res[0][5]
        per = sent / assigned
        minimum = remote * 2 * a.d_model * elem / assigned
        ratio = f"{per / minimum:.4f}" if minimum else "-"
        print(f"| {ep} | {ms:.1f} | {a.tokens * ep / ms * 1e3:,.0f} | {per:.1f} | {minimum:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

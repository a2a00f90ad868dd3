"""Sharded (DCP) checkpoints on CPU (gloo): a checkpoint written at ep=4 on 4 processes,
with uneven expert placement, resumes at ep=2 on 2 processes and on one process, model and
optimizer state included, and continues the uninterrupted run's losses; so does a DeepSpeed
ZeRO-2 checkpoint; a multi-process job killed during a save resumes from the last complete
checkpoint, bit for bit."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import REPO, TINY
from dist_utils import run_train
from moe_dist.config import load_config
from moe_dist.models.transformer import LM
from moe_dist.parallel.layout import ParallelLayout
from moe_dist.trainer.metrics import WALL_CLOCK_FIELDS

# 6 FFN experts and 2 heads x 3 SwitchHead experts: placed 2/2/1/1 at ep=4, 3/3 at ep=2.
BASE = TINY + [
    "train.max_steps=10", "train.eval_every=5", "data.rank_split=batch", "moe.num_experts=6",
    "model.attention=switchhead", "attention.num_experts=3", "parallel.attention_experts=sharded",
    "checkpoint.keep_last=0", "optim.grad_clip=0.5",
    # Aux-loss-free selection biases move every step: their state must survive too.
    "moe.bias_update_rate=0.01", "attention.bias_update_rate=0.01",
]
SKIP = WALL_CLOCK_FIELDS


def torchrun(nproc, run_dir, *overrides, env=None):
    """What `torchrun --nproc_per_node nproc -m moe_dist.train ...` does (dist_utils.run_train)."""
    return run_train(nproc, [*BASE, f"run.dir={run_dir}", *overrides], env=dict(os.environ, **(env or {})))


def rows(run_dir, after=0):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in r.items() if k not in SKIP} for r in map(json.loads, f) if r["step"] > after]


def ok(p):
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    return p


def test_resume_at_another_expert_parallel_layout(tmp_path):
    ref = tmp_path / "ep4"
    ok(torchrun(4, ref, "parallel.ep=4", "train.micro_batch_size=2", "checkpoint.every=6"))
    step6 = ref / "checkpoints" / "step_00000006"
    meta = json.loads((step6 / "meta.json").read_text())
    assert (meta["format"], meta["world_size"], meta["ep"], meta["dp"], meta["global_batch"]) == (3, 4, 4, 1, 8)
    assert meta["experts"]["blocks.0.ffn.experts.w_in_EDH"] == [[0, 2], [2, 2], [4, 1], [5, 1]]
    assert meta["experts"]["blocks.0.attn.experts_v.w_GIO"] == [[0, 2], [2, 2], [4, 1], [5, 1]]
    expected = rows(ref, after=6)
    assert len([r for r in expected if "loss" in r]) == 4

    # The tools: inspect verifies every checksum; export stacks the experts back by global id
    # into one safetensors file that a one-process model loads strictly.
    p = ok(subprocess.run([sys.executable, "tools/inspect_checkpoint.py", str(step6)], cwd=REPO,
                          capture_output=True, text=True))
    assert "layout: world 4, ep 4, dp 1" in p.stdout and "all sha256 verified" in p.stdout
    assert "experts blocks.0.ffn.experts.w_in_EDH: 6 over ep=4: [0,2), [2,4), [4,5), [5,6)" in p.stdout
    out = tmp_path / "export"
    ok(subprocess.run([sys.executable, "tools/export_checkpoint.py", str(step6), str(out)], cwd=REPO,
                      capture_output=True, text=True))
    weights = load_file(out / "model.safetensors")
    assert weights["blocks.0.ffn.experts.w_in_EDH"].shape[0] == 6
    assert weights["blocks.0.attn.experts_v.w_GIO"].shape[0] == 6
    # Every tensor equals the checkpoint's own entries, the experts stacked in global-id
    # order from the 4 uneven shards (read here through DCP's own converter).
    dcp_to_torch_save(step6, tmp_path / "flat.pt")
    flat = torch.load(tmp_path / "flat.pt", weights_only=False)
    for name, t in weights.items():
        experts = [flat[f"model.{name}@{g}"] for g in range(t.shape[0])] if f"model.{name}@0" in flat else None
        assert torch.equal(t, torch.stack(experts) if experts else flat[f"model.{name}"]), name
    model = LM(load_config(str(out / "config.yaml")), weights["embed.weight"].shape[0], ParallelLayout.single())
    model.load_state_dict(weights, strict=True)

    for nproc, ep in ((2, 2), (1, 1)):
        run = tmp_path / f"ep{ep}"
        shutil.copytree(step6, run / "checkpoints" / "step_00000006")
        p = ok(torchrun(nproc, run, f"parallel.ep={ep}", f"train.micro_batch_size={8 // nproc}",
                        "train.resume=auto", "checkpoint.every=0", "checkpoint.save_final=false"))
        assert "resumed from" in p.stdout
        got = rows(run)
        assert [sorted(r) for r in got] == [sorted(r) for r in expected]
        for a, b in zip(expected, got):
            for k in ("loss", "lm_loss", "aux_loss", "val_loss", "grad_norm"):
                if k in a:
                    assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (ep, k, a, b)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_checkpoint_reshards(stage, tmp_path):
    """ZeRO on 4 ranks (dp 2 x ep 2: state partitioned over 2 or 4 ranks; ZeRO-3's experts
    outside the engine) resumes on 2 ranks at ep=2 and on one process (where ZeRO-3 holds
    the experts itself): the state is saved per parameter and per expert, not as ZeRO's
    per-rank partitions."""
    # Dropless: with capacity, dp 2 x ep 2 decides drops per ep group (half the batch), a
    # different model from ep=2 on 2 ranks; without drops the layouts compute the same.
    zero = ["train.backend=deepspeed", f"deepspeed.zero_stage={stage}", "moe.capacity_factor=0"]
    ref = tmp_path / "dp2ep2"
    ok(torchrun(4, ref, *zero, "parallel.ep=2", "train.micro_batch_size=2", "checkpoint.every=6"))
    step6 = ref / "checkpoints" / "step_00000006"
    assert json.loads((step6 / "meta.json").read_text())["format"] == 3
    expected = rows(ref, after=6)
    for nproc, ep in ((2, 2), (1, 1)):
        run = tmp_path / f"ep{ep}"
        shutil.copytree(step6, run / "checkpoints" / "step_00000006")
        ok(torchrun(nproc, run, *zero, f"parallel.ep={ep}", f"train.micro_batch_size={8 // nproc}",
                    "train.resume=auto", "checkpoint.every=0", "checkpoint.save_final=false"))
        got = rows(run)
        assert len(got) == len(expected)
        for a, b in zip(expected, got):
            for k in ("loss", "lm_loss", "aux_loss", "val_loss", "grad_norm"):
                if k in a:
                    assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (ep, k, a, b)


ZERO0 = ["train.backend=deepspeed", "deepspeed.zero_stage=0"]
SWITCHES = {
    # FSDP2 cannot step a fused AdamW (DTensors), which DDP uses.
    "ddp_to_fsdp2": ((2, ["parallel.ep=2", "train.micro_batch_size=4"]),
                     (2, ["parallel.ep=2", "train.micro_batch_size=4", "train.fsdp=true"])),
    # DeepSpeed adds parameter groups for the experts at ep > 1 only.
    "zero0_ep1_to_ep2": ((1, [*ZERO0, "train.micro_batch_size=8"]),
                         (2, [*ZERO0, "parallel.ep=2", "train.micro_batch_size=4"])),
}


@pytest.mark.parametrize("case", list(SWITCHES))
def test_resume_where_the_optimizer_is_grouped_or_stepped_differently(case, tmp_path):
    """A checkpoint's optimizer param_groups describe how ITS run stepped. Restored, DDP's
    `fused=True` broke FSDP2's first step ("mixed torch.Tensor and DTensor"), and a
    one-process ZeRO-0 checkpoint lacked the expert groups of ep=2 ("Missing key ...
    optim_param_groups.2.name"). Only the schedule's learning rate comes back now, and
    the resumed run continues the uninterrupted one's losses."""
    (n0, first), (n1, then) = SWITCHES[case]
    ref = tmp_path / "ref"
    ok(torchrun(n0, ref, *first, "checkpoint.every=6"))
    expected = rows(ref, after=6)
    run = tmp_path / "run"
    shutil.copytree(ref / "checkpoints" / "step_00000006", run / "checkpoints" / "step_00000006")
    p = ok(torchrun(n1, run, *then, "train.resume=auto", "checkpoint.every=0", "checkpoint.save_final=false"))
    assert "step_00000006 (step 6)" in p.stdout
    got = rows(run)
    assert [sorted(r) for r in got] == [sorted(r) for r in expected] and len(got) >= 4
    for a, b in zip(expected, got):
        for k in ("loss", "lm_loss", "aux_loss", "val_loss", "grad_norm", "lr"):
            if k in a:
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a, b)


def test_resharding_refuses_another_global_batch(tmp_path):
    run = tmp_path / "run"
    ok(torchrun(2, run, "parallel.ep=2", "train.micro_batch_size=4", "train.max_steps=2", "checkpoint.every=2"))
    p = torchrun(1, run, "train.micro_batch_size=4", "train.resume=auto", "train.max_steps=4")
    assert p.returncode != 0
    assert "was trained with a global batch of 8 sequences; this run has 4" in p.stderr


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killed_during_a_multiprocess_save_resumes_bitwise(mode, tmp_path):
    """With checkpoint.async_save the files are written in the background and the rename
    happens at the next save (step 9 here); the kill comes there."""
    # Dropout: each rank's own RNG stream must come back from its own extras.
    args = ["parallel.ep=2", "train.micro_batch_size=4", "checkpoint.every=3", f"checkpoint.async_save={mode == 'async'}",
            "model.dropout=0.1"]
    ok(torchrun(2, tmp_path / "ref", *args))
    expected = rows(tmp_path / "ref")
    run = tmp_path / "run"
    # Rank 0 SIGKILLs itself after every rank wrote step 6's files, before the rename.
    p = torchrun(2, run, *args, env={"MOE_DIST_FAULT": "kill_in_save:6"})
    assert p.returncode != 0
    names = sorted(os.listdir(run / "checkpoints"))
    assert names == [".tmp-step_00000006", "step_00000003"], names
    p = ok(torchrun(2, run, *args, "train.resume=auto"))
    assert "step_00000003 (step 3)" in p.stdout
    assert rows(run) == expected
    assert not any(n.startswith(".tmp-") for n in os.listdir(run / "checkpoints"))

"""Training backends on CPU (gloo): torch (DDP, or FSDP2) and DeepSpeed ZeRO 0/1/2/3 with
sharded experts give the losses of one process; ZeRO-3 and FSDP2 partition only the dense
parameters; resume is exact; the DeepSpeed config comes from our YAML and a contradicting
user JSON is an error."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY
from dist_utils import run_train
from moe_dist.config import load_config
from moe_dist.errors import ConfigError
from moe_dist.trainer.deepspeed_backend import deepspeed_config, generate_config
from moe_dist.trainer.metrics import WALL_CLOCK_FIELDS

STEPS = 10
# grad_clip=0.5 is below most of these steps' gradient norms (0.53-0.96): clipping is exercised.
BASE = TINY + [
    f"train.max_steps={STEPS}", "train.eval_every=5", "checkpoint.every=0", "checkpoint.save_final=false",
    "data.rank_split=batch", "optim.grad_clip=0.5",
]
FIELDS = ("loss", "lm_loss", "aux_loss", "val_loss", "grad_norm")


def torchrun(nproc, run_dir, *overrides, env=None):
    """What `torchrun --nproc_per_node nproc -m moe_dist.train ...` does (dist_utils.run_train)."""
    return run_train(nproc, [*BASE, f"run.dir={run_dir}", *overrides], env=dict(os.environ, **(env or {})))


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_close(a, b, tol=1e-5, fields=FIELDS):
    assert [(r["step"], sorted(r)) for r in a] == [(r["step"], sorted(r)) for r in b]
    for ra, rb in zip(a, b):
        for k in fields:
            if k in ra:
                assert abs(ra[k] - rb[k]) <= tol * max(1.0, abs(ra[k])), (k, ra, rb)


def ok(p):
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    return p


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run = tmp_path_factory.mktemp("one")
    ok(torchrun(1, run, "train.micro_batch_size=8"))
    r = rows(run)
    assert len([x for x in r if "loss" in x]) == STEPS
    assert max(x["grad_norm"] for x in r if "grad_norm" in x) > 0.5  # the clip was active
    return r


BACKENDS = {
    "ddp": ["train.backend=torch"],
    "fsdp2": ["train.backend=torch", "train.fsdp=true"],
    # Blocks compiled in place, then fully_shard: the all-to-all syncs break their graphs.
    "fsdp2_compiled": ["train.backend=torch", "train.fsdp=true", "train.compile=true", "train.compile_backend=aot_eager"],
    **{f"zero{s}": ["train.backend=deepspeed", f"deepspeed.zero_stage={s}"] for s in range(4)},
}
# Activation checkpointing under the sharding backends: FSDP2's and ZeRO-3's parameter
# gathers run again in the recompute (moe/recompute.py).
RECOMPUTE = ["train.activation_checkpoint=full"]
BACKENDS.update({f"{b}_recompute": BACKENDS[b] + RECOMPUTE for b in ("fsdp2", "zero3")})


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_backends_match_one_process(backend, one_process, tmp_path):
    """2 processes, ep=2, the same global batch: every backend gives the one-process losses."""
    p = ok(torchrun(2, tmp_path, "train.micro_batch_size=4", "parallel.ep=2", *BACKENDS[backend]))
    assert_close(one_process, rows(tmp_path))
    if backend == "ddp":
        assert "torch: DDP over 2 ranks; dense parameters replicated; expert shard of 12288 elements (ep=2)" in p.stdout
    elif backend.startswith("fsdp2"):
        if backend == "fsdp2_compiled":
            assert "train.compile: 2 block(s) compiled with aot_eager" in p.stdout
        assert ("torch: FSDP2 over 2 ranks; dense parameters sharded: 12576 of 25152 elements on rank 0; "
                "expert shard of 12288 elements (ep=2)") in p.stdout
    elif backend.startswith("zero3"):
        # Half of the 25,152 dense elements on rank 0; its 12,288-element expert shard whole.
        assert ("deepspeed: ZeRO stage 3, fp32, world 2; dense parameters partitioned: 12576 of 25152 elements "
                "on rank 0; expert shard of 12288 elements (ep=2, outside ZeRO") in p.stdout
    else:  # the stage as the engine reports it; ZeRO-1/2 partition the fp32 master weights:
        # half of the 25,152 dense elements plus the 12,288-element expert shard whole
        # (its expert-data-parallel group is this one rank).
        assert f"ZeRO stage {backend[4]}, fp32, world 2" in p.stdout and "(ep=2, DeepSpeed expert parameters)" in p.stdout
        assert ("fp32 master partition of 24864 elements on rank 0" in p.stdout) == (backend != "zero0")
    assert ("train.activation_checkpoint=full" in p.stdout) == backend.endswith("_recompute")
    if backend.endswith("_recompute"):  # counted where it happens: 2 blocks x 10 steps
        assert "train.activation_checkpoint=full: 20 block forward(s) ran again in the backward" in p.stdout
    if backend.startswith("zero"):  # DeepSpeed's CPU shm all-reduce op was neither built nor loaded
        assert "shm_comm" not in p.stdout + p.stderr


def test_dp_x_ep_with_accumulation_and_offload(tmp_path):
    """4 processes = dp 2 x ep 2, two micro-batches per step: FSDP2, ZeRO-2 with optimizer
    offload and ZeRO-3 give the DDP losses (expert-data-parallel groups of 2 ranks)."""
    common = ["train.micro_batch_size=1", "train.grad_accum_steps=2", "parallel.ep=2"]
    ok(torchrun(4, tmp_path / "torch", *common))
    ref = rows(tmp_path / "torch")
    ok(torchrun(4, tmp_path / "fsdp", *common, "train.fsdp=true"))
    assert_close(ref, rows(tmp_path / "fsdp"))
    p = ok(torchrun(4, tmp_path / "z2", *common, "train.backend=deepspeed", "deepspeed.zero_stage=2",
                    "deepspeed.offload_optimizer=true"))
    assert_close(ref, rows(tmp_path / "z2"))
    # A quarter of the dense 25,152 elements and half of the 12,288-element expert shard.
    assert "ZeRO stage 2, fp32, world 4, optimizer state on the CPU; fp32 master partition of 12432 elements" in p.stdout
    ok(torchrun(4, tmp_path / "z3", *common, "train.backend=deepspeed", "deepspeed.zero_stage=3"))
    assert_close(ref, rows(tmp_path / "z3"))


def test_fsdp2_with_unsharded_experts_matches_ddp(tmp_path):
    """ep=1: FSDP2 leaves the (replicated) expert stacks to our all-reduce, whose flat buffer
    must list them in the same order on every rank, and counts their norm once."""
    ok(torchrun(2, tmp_path / "ddp", "train.micro_batch_size=4"))
    p = ok(torchrun(2, tmp_path / "fsdp", "train.micro_batch_size=4", "train.fsdp=true"))
    assert "torch: FSDP2 over 2 ranks; dense parameters sharded: 37152 of 49728 elements on rank 0" in p.stdout
    assert_close(rows(tmp_path / "ddp"), rows(tmp_path / "fsdp"))


@pytest.mark.parametrize("backend", ["fsdp2", "zero1", "zero3"])
def test_exact_resume(backend, tmp_path):
    """Rank 1 dies after step 7 (checkpoint at 6); the resumed run repeats steps 7-10 bit for bit."""
    args = ["train.micro_batch_size=4", "parallel.ep=2", *BACKENDS[backend], "checkpoint.every=6", "parallel.timeout_s=20"]
    ok(torchrun(2, tmp_path / "ref", *args))
    p = torchrun(2, tmp_path / "run", *args, env={"MOE_DIST_FAULT": "kill_rank:1:7"})
    assert p.returncode != 0
    p = ok(torchrun(2, tmp_path / "run", *args, "train.resume=auto"))
    assert "step_00000006 (step 6)" in p.stdout
    strip = lambda rs: [{k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS} for r in rs]
    ref, got = strip(rows(tmp_path / "ref")), strip(rows(tmp_path / "run"))
    assert [r for r in got if r["step"] > 6] == [r for r in ref if r["step"] > 6]


def test_bf16_zero1_trains_close_to_fp32(one_process, tmp_path):
    ok(torchrun(2, tmp_path, "train.micro_batch_size=4", "parallel.ep=2", "train.backend=deepspeed",
                "deepspeed.zero_stage=1", "train.dtype=bf16"))
    # Losses: measured 5.6e-5 relative at worst over these 10 steps (gradient norms: 1.5e-3).
    assert_close(one_process, rows(tmp_path), tol=1e-3, fields=("loss", "lm_loss", "aux_loss", "val_loss"))


# ----------------------------------------------------------------------------- config


def cfg(*overrides):
    return load_config(None, ["train.backend=deepspeed", *overrides])


def test_generated_config_follows_the_yaml():
    c = cfg("train.micro_batch_size=3", "train.grad_accum_steps=2", "optim.grad_clip=0.7",
            "deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true")
    ds = generate_config(c, world_size=4, bf16=True)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.7
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert ds["bf16"] == {"enabled": True}
    # ZeRO-0 fp32: our clip (the true global norm), not DeepSpeed's
    assert deepspeed_config(cfg("deepspeed.zero_stage=0"), 2, False)["gradient_clipping"] == 0.0


def test_user_json_merges_and_conflicts_are_named(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}, "train_micro_batch_size_per_gpu": 16}))
    merged = deepspeed_config(cfg(f"deepspeed.config={path}", "train.micro_batch_size=16"), 2, False)
    assert merged["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}

    with pytest.raises(ConfigError) as e:
        deepspeed_config(cfg(f"deepspeed.config={path}", "train.micro_batch_size=8"), 2, False)
    assert str(e.value) == (f"{path}: train_micro_batch_size_per_gpu=16 contradicts train.micro_batch_size "
                            "(which gives 8); remove it from the JSON or change the YAML")
    with pytest.raises(ConfigError, match=r"zero_optimization.stage=1 contradicts deepspeed.zero_stage \(which gives 3\)"):
        deepspeed_config(cfg(f"deepspeed.config={path}", "train.micro_batch_size=16", "deepspeed.zero_stage=3"), 2, False)

    path.write_text(json.dumps({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}))
    with pytest.raises(ConfigError, match=r"ds.json: 'optimizer' contradicts optim.\* \(moe_dist builds the AdamW\); remove it"):
        deepspeed_config(cfg(f"deepspeed.config={path}"), 2, False)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"deepspeed.config: .*ds.json is not valid JSON"):
        deepspeed_config(cfg(f"deepspeed.config={path}"), 2, False)
    with pytest.raises(ConfigError, match=r"deepspeed.config: file not found: /nonexistent.json"):
        deepspeed_config(cfg("deepspeed.config=/nonexistent.json"), 2, False)


def test_refusals_are_named():
    with pytest.raises(ConfigError, match="train.fsdp: is a torch-backend option; with train.backend=deepspeed use"):
        cfg("train.fsdp=true", "train.backend=deepspeed")
    for ep in (1, 2):  # stage-0 bf16 would crash at the first checkpoint, after training
        with pytest.raises(ConfigError, match="deepspeed.zero_stage=0 with bf16 is not supported"):
            deepspeed_config(cfg("deepspeed.zero_stage=0", f"parallel.ep={ep}"), 2, True)
    with pytest.raises(ConfigError, match="deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1"):
        cfg("deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true")
    with pytest.raises(ConfigError, match="deepspeed.zero_stage: must be 0, 1, 2 or 3"):
        cfg("deepspeed.zero_stage=4")
    # And the other way round: a DeepSpeed setting under the torch backend would be ignored.
    for key in ("deepspeed.config=/some/ds.json", "deepspeed.offload_optimizer=true"):
        name = key.split("=")[0]
        with pytest.raises(ConfigError, match=f"{name}: is a deepspeed-backend option; set train.backend=deepspeed"):
            load_config(None, ["train.backend=torch", key])


def test_cli_contradicting_json_exits_2_before_work(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_accumulation_steps": 4}))
    p = subprocess.run([sys.executable, "-m", "moe_dist.train", *BASE, f"run.dir={tmp_path / 'run'}",
                        "train.backend=deepspeed", f"deepspeed.config={path}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().endswith(
        f"error: {path}: gradient_accumulation_steps=4 contradicts train.grad_accum_steps (which gives 1); "
        "remove it from the JSON or change the YAML")
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_adamw_is_fused_for_plain_tensors_and_steps_like_the_default():
    """build_adamw takes torch's fused AdamW for plain CPU/CUDA tensors; it steps like the
    default AdamW. (FSDP2's DTensor parameters keep the default: the fsdp2 cases above fail
    with "got mixed torch.Tensor and DTensor" if they do not.)"""
    import torch

    from moe_dist.trainer.backends import build_adamw, param_groups

    cfg = load_config(None, ["optim.weight_decay=0.1"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    fused = build_adamw(param_groups(model.named_parameters(), 0.1), cfg)
    default = torch.optim.AdamW(param_groups(reference.items(), 0.1), lr=cfg.optim.lr,
                                betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)  # fmt: skip
    assert fused.defaults["fused"] is True and not default.defaults["fused"]
    for _ in range(3):
        for n, p in model.named_parameters():
            p.grad = torch.randn_like(p)
            reference[n].grad = p.grad.clone()
        fused.step()
        default.step()
    for n, p in model.named_parameters():
        assert not torch.equal(p, start[n])  # it stepped
        torch.testing.assert_close(p, reference[n], rtol=1e-6, atol=1e-7)


def test_weight_decay_reaches_matrices_only_in_every_shipped_config():
    """optim.weight_decay: matrices decay; norms, embeddings and biases do not, the stacked
    expert biases of SliceMoE ([E, H], two dims) included (they decayed by their ndim)."""
    import glob

    from moe_dist.models.transformer import LM
    from moe_dist.parallel.layout import ParallelLayout
    from moe_dist.trainer.backends import param_groups

    seen = set()
    for path in sorted(glob.glob(f"{REPO}/configs/*.yaml")):
        model = LM(load_config(path), 512, ParallelLayout.single())
        names = {id(p): n for n, p in model.named_parameters()}
        decay, no_decay = param_groups(model.named_parameters(), 0.1)
        assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
        for p in no_decay["params"]:
            leaf = names[id(p)].rsplit(".", 1)[-1]
            assert p.ndim == 1 or "embed" in names[id(p)] or leaf.startswith("b_"), names[id(p)]
            seen.add(leaf)
        for p in decay["params"]:
            leaf = names[id(p)].rsplit(".", 1)[-1]
            assert p.ndim >= 2 and leaf in ("weight", "w_in_EDH", "w_out_EFD", "w_GIO"), names[id(p)]
    assert {"b_in_EH", "b_out_ED", "bias", "weight"} <= seen  # SliceMoE's expert biases, norms, embeddings

"""End-to-end training: the loss falls, runs resume exactly after SIGKILL, bad input is named."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO, TINY, HostReads, copy_with_corrupt_shard
from dist_utils import run_train
from moe_dist.config import load_config
from moe_dist.errors import CheckpointError
from moe_dist.train import main
from moe_dist.trainer.checkpoint import latest_checkpoint, list_checkpoints
from moe_dist.trainer.metrics import WALL_CLOCK_FIELDS
from moe_dist.trainer.trainer import Trainer

TIMING = WALL_CLOCK_FIELDS  # wall-clock fields cannot repeat bit for bit


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_tiny_training_loss_falls(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, TINY + [f"run.dir={run}", "train.max_steps=60", "train.eval_every=30", "checkpoint.every=30"])
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.fit()
    trainer.close()
    rows = read_metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 61))
    for key in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s"):
        assert key in train_rows[0]
    # The expert-traffic window (every 10 steps) adds its summary to those steps' rows.
    for key in ("dropped_frac", "max_imbalance", "dead_experts", "window_tokens_per_s", "model_tflops",
                "load_entropy_ffn"):
        assert key in train_rows[9] and key not in train_rows[10]
    assert 0 < train_rows[9]["load_entropy_ffn"] <= 1 and "load_entropy_attn" not in train_rows[9]
    first = sum(r["lm_loss"] for r in train_rows[:5]) / 5
    last = sum(r["lm_loss"] for r in train_rows[-5:]) / 5
    assert first > math.log(512) - 0.5  # starts near uniform over the 512-token vocabulary
    assert last < first - 0.6, (first, last)  # measured: 6.23 -> 5.33
    assert [r["step"] for r in eval_rows] == [30, 60]
    assert eval_rows[1]["val_loss"] < eval_rows[0]["val_loss"]
    assert eval_rows[1]["val_ppl"] == pytest.approx(math.exp(eval_rows[1]["val_loss"]))
    # Two MoE layers x top-2 x (4 sequences x 32 tokens): aux loss is ~2 * (0.01 + z) at start.
    assert 0.0 < train_rows[0]["aux_loss"] < 0.1
    assert list_checkpoints(run / "checkpoints") == [30, 60]
    assert (run / "config.yaml").exists()
    # TensorBoard: every logged scalar, and per MoE layer the expert histogram every 10 steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    losses = [e.value for e in ea.Scalars("train/loss")]
    assert losses == pytest.approx([r["loss"] for r in train_rows])
    assert [e.step for e in ea.Scalars("eval/val_loss")] == [30, 60]
    for layer in (0, 1):
        hist = ea.Histograms(f"moe/L{layer:02d}_ffn/tokens_per_expert")
        assert [h.step for h in hist] == [10, 20, 30, 40, 50, 60]
        # Computed + dropped = 10 steps x 4 sequences x 32 tokens x top-2, over 4 expert buckets.
        dropped = ea.Scalars(f"moe/L{layer:02d}_ffn/dropped")
        assert len(dropped) == 6
        assert sum(hist[-1].histogram_value.bucket) + dropped[-1].value == 10 * 4 * 32 * 2


def run_cli(run_dir, *extra, fault=None, steps=16):
    env = dict(os.environ)
    env.pop("MOE_DIST_FAULT", None)
    if fault:
        env["MOE_DIST_FAULT"] = fault
    args = TINY + [
        f"run.dir={run_dir}", f"train.max_steps={steps}", "train.eval_every=6", "checkpoint.every=4",
        "checkpoint.keep_last=0", "model.dropout=0.1", "train.resume=auto", *extra,
    ]
    # `python -m moe_dist.train args`, forked from the session's preloaded server (dist_utils).
    return run_train(1, args, env=env, timeout=300, distributed=False)


def test_exact_resume_after_sigkill(tmp_path):
    ref = run_cli(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    expected = strip_timing(read_metrics(tmp_path / "ref"))
    assert len([r for r in expected if "loss" in r]) == 16

    # Killed right after step 10 (checkpoints at 4 and 8): steps 9-10 are logged, then lost.
    run = tmp_path / "killed"
    p = run_cli(run, fault="kill_at_step:10")
    assert p.returncode == -signal.SIGKILL
    assert read_metrics(run)[-1]["step"] == 10 and list_checkpoints(run / "checkpoints") == [4, 8]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 6.1')  # a row cut short by the kill
    p = run_cli(run)
    assert p.returncode == 0, p.stderr
    assert "resumed from" in p.stdout and "step_00000008" in p.stdout
    assert f"warning: dropped 1 unreadable row(s) of {run / 'metrics.jsonl'}" in p.stdout
    assert strip_timing(read_metrics(run)) == expected  # bitwise: floats compared exactly

    # Killed during the save of step 12, after its files were written but before the rename.
    run = tmp_path / "killed_in_save"
    p = run_cli(run, fault="kill_in_save:12")
    assert p.returncode == -signal.SIGKILL
    ckpts = run / "checkpoints"
    assert list_checkpoints(ckpts) == [4, 8]
    assert any(n.startswith(".tmp-step_00000012") for n in os.listdir(ckpts))
    assert latest_checkpoint(str(ckpts)).endswith("step_00000008")
    p = run_cli(run)
    assert p.returncode == 0, p.stderr
    assert strip_timing(read_metrics(run)) == expected
    assert not any(n.startswith(".tmp-") for n in os.listdir(ckpts))


def test_each_rank_draws_its_own_forward_randomness():
    """Same model init everywhere, but dropout masks of rank r are not rank 0's."""
    import torch

    from moe_dist.trainer.trainer import _seed_forward_rng

    def draw(seed, rank, step=0):
        _seed_forward_rng(seed, rank, step)
        return torch.rand(16)

    assert torch.equal(draw(0, 1), draw(0, 1))  # deterministic
    streams = [draw(0, 0), draw(0, 1), draw(1, 0), draw(0, 0, step=8)]
    assert all(not torch.equal(a, b) for i, a in enumerate(streams) for b in streams[i + 1:])


def test_cli_bad_config_exits_2_with_named_key(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "moe_dist.train", "--config", "configs/quickstart.yaml", "model.d_model=abc"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.strip() == (
        "error: configs/quickstart.yaml + command-line overrides: model.d_model: expected an integer, got 'abc'"
    )


def test_triton_on_cpu_is_refused_before_work(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # test_kernels sets it
    p = subprocess.run(
        [sys.executable, "-m", "moe_dist.train", *TINY, f"run.dir={tmp_path}", "run.device=cpu", "moe.grouped_mm=triton"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 2 and p.stdout == ""  # nothing prepared, nothing built
    assert p.stderr.strip() == "error: moe.grouped_mm=triton needs a CUDA device (this run is on cpu); use auto, torch or loop"


def test_local_rank_beyond_the_visible_gpus_is_a_launch_error(monkeypatch):
    import torch

    from moe_dist.errors import LaunchError
    from moe_dist.trainer.trainer import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(LaunchError, match=r"LOCAL_RANK=2 but this node has 2 visible CUDA device\(s\)"):
        resolve_device(load_config(None, ["run.device=cuda"]))


def test_unwritable_run_dir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(TINY + [f"run.dir={blocker}/run"]) == 2
    err = capsys.readouterr().err
    assert f"error: run.dir={blocker}/run is not writable" in err


def test_explicit_data_dir_must_exist(tmp_path, capsys):
    assert main(TINY + [f"run.dir={tmp_path}/run", f"data.dir={tmp_path}/nodata"]) == 2
    assert f"error: data.dir={tmp_path}/nodata: no manifest.json there" in capsys.readouterr().err


def test_explicit_data_dir_must_match_the_tokenizer_and_hold_seq_len(tmp_path, capsys):
    """A prepared data.dir decides the tokenizer and the longest seq_len; a run that says
    otherwise is refused by key, not trained under a config.yaml that misstates its data
    (nor refused as having 0 validation sequences). A shorter seq_len is allowed: each
    sample then holds several windows."""
    from moe_dist.data.cache import ensure_prepared

    d, manifest = ensure_prepared(load_config(None, TINY).data)  # bpe, seq_len 32
    where = f"data.dir={d} ({d}/manifest.json)"
    args = TINY + [f"run.dir={tmp_path}/run", f"data.dir={d}", "train.max_steps=1", "train.eval_every=0"]
    assert main(args + ["data.tokenizer=bytes"]) == 2
    assert (f"error: data.tokenizer=bytes, but {where} was prepared with the bpe tokenizer: "
            "set data.tokenizer=bpe") in capsys.readouterr().err
    assert main(args + ["data.seq_len=64"]) == 2
    assert (f"error: data.seq_len=64 is longer than the samples of {where}, prepared at seq_len 32: "
            "lower data.seq_len, or prepare the data again with --seq-len 64") in capsys.readouterr().err
    assert main(args + ["data.seq_len=24"]) == 2  # one window of 24 per sample of 32: 8 targets unread
    assert (f"error: data.seq_len=24 does not divide the seq_len 32 of {where}: the last 8 targets of every "
            "sample (25% of the data) would never be read; use a divisor of 32, or prepare the data again "
            "with --seq-len 24") in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
    assert main(args + ["data.seq_len=16"]) == 0
    assert "warning" not in capsys.readouterr().out  # the config's data keys are the manifest's
    # The manifest decides what is read; config values it does not use are named.
    assert main(args + ["data.seq_len=16", "data.source=/elsewhere", "data.val_fraction=0.5", "run.dir="
                        f"{tmp_path}/run2"]) == 0
    assert (f"warning: data.dir={d} ({d}/manifest.json) decides the data; not read: data.source=/elsewhere "
            "(prepared: sotu), data.val_fraction=0.5 (prepared: 0.05)") in capsys.readouterr().out


def test_corrupt_val_shard_stops_training_before_any_step(tmp_path, capsys):
    """Both splits are hashed before the model is built (the eval loader reads without
    checking); data.verify_shards=false skips the hashes, not the size checks."""
    from moe_dist.data.cache import ensure_prepared

    src, manifest = ensure_prepared(load_config(None, TINY).data)
    d = tmp_path / "data"
    shard = copy_with_corrupt_shard(src, d, manifest, "val", 0)
    args = TINY + [f"run.dir={tmp_path}/run", f"data.dir={d}", "train.max_steps=1", "train.eval_every=0"]
    assert main(args) == 2
    assert f"error: corrupt shard {shard}: sha256 differs from the manifest" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
    assert main(args + ["data.verify_shards=false"]) == 0


def test_resume_refuses_other_model_and_corrupt_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    base = TINY + [f"run.dir={run}", "train.max_steps=4", "train.eval_every=0", "checkpoint.every=2"]
    assert main(base) == 0
    capsys.readouterr()
    # A run directory where a checkpoint belongs, or no directory at all, is named as such.
    assert main(base + [f"train.resume={run}"]) == 2
    assert (f"error: {run} is a run directory, not a checkpoint: give one of its step directories (the newest "
            f"is {run}/checkpoints/step_00000004)") in capsys.readouterr().err
    assert main(base + [f"train.resume={tmp_path}/nowhere"]) == 2
    assert f"error: checkpoint directory not found: {tmp_path}/nowhere" in capsys.readouterr().err
    # A fresh run (train.resume=none) into the same run.dir would write over this one.
    assert main(base) == 2
    assert (f"error: run.dir={run} already holds a run (checkpoints of steps 2-4), which train.resume=none "
            "would write over: set train.resume=auto") in capsys.readouterr().err
    assert main(base + ["train.resume=auto", "model.d_model=64", "train.max_steps=6"]) == 2
    err = capsys.readouterr().err
    assert "was written by a different config (these keys must match to resume): model.d_model: checkpoint 32, config 64" in err
    # The optimizer's hyper-parameters and the data stream must match too, named key by key.
    assert main(base + ["train.resume=auto", "optim.lr=0.03", "data.seq_len=16", "run.seed=7", "train.max_steps=6"]) == 2
    assert ("optim.lr: checkpoint 0.003, config 0.03; run.seed: checkpoint 0, config 7; "
            "data.seq_len: checkpoint 32, config 16") in capsys.readouterr().err
    state = run / "checkpoints" / "step_00000004" / "__0_0.distcp"  # the DCP shard of rank 0
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    assert main(base + ["train.resume=auto", "train.max_steps=6"]) == 2
    assert f"error: corrupt checkpoint file {state}: sha256 differs from meta.json" in capsys.readouterr().err
    # Only when allowed: fall back to step 2, say so, and train on from there. The damaged
    # step 4 is set aside, so keep_last=2 keeps step 2 beside the new step 5 (counting the
    # damaged one, it deleted step 2 and kept step 4).
    assert main(base + ["train.resume=auto", "train.max_steps=5", "checkpoint.fallback=true",
                        "checkpoint.every=0", "checkpoint.keep_last=2"]) == 0
    out = capsys.readouterr().out
    assert (f"warning: rank 0: corrupt checkpoint file {state}: sha256 differs from meta.json; "
            "checkpoint.fallback=true: trying the checkpoint before it") in out
    assert "resumed from" in out and "step_00000002 (step 2)" in out
    ckpts = run / "checkpoints"
    assert f"moved the damaged {ckpts / 'step_00000004'} aside to {ckpts / 'step_00000004.damaged'}" in out
    assert sorted(os.listdir(ckpts)) == ["step_00000002", "step_00000004.damaged", "step_00000005"]
    # Resuming a finished run says so and trains nothing.
    assert main(base + ["train.resume=auto", "train.max_steps=5"]) == 0
    out = capsys.readouterr().out
    assert "nothing to train: the run is at step 5 and train.max_steps=5" in out and "done: step 5" in out


def test_an_edited_corpus_is_prepared_anew_and_refused_on_resume(tmp_path, capsys):
    """The cache key holds the source files' names, sizes and mtimes; a checkpoint holds its
    data's manifest sha256. Adding a document under the same data.source gives new shards,
    and resuming the old position in them is refused."""
    from test_data import write_txt_corpus

    from moe_dist.config import DataConfig
    from moe_dist.data.cache import default_data_dir

    corpus = tmp_path / "corpus"
    write_txt_corpus(corpus, n_docs=8)
    spec = DataConfig(source=str(corpus), tokenizer="bytes", seq_len=32)
    before = default_data_dir(spec)
    assert default_data_dir(spec) == before  # stable while nothing changes
    args = TINY + [f"run.dir={tmp_path / 'run'}", f"data.source={corpus}", "data.tokenizer=bytes", "data.max_docs=null",
                   "train.eval_every=0", "checkpoint.every=2"]
    assert main(args + ["train.max_steps=2"]) == 0
    (corpus / "doc_new.txt").write_text("A new document. " * 50)
    assert default_data_dir(spec) != before
    capsys.readouterr()
    assert main(args + ["train.max_steps=4", "train.resume=auto"]) == 2
    captured = capsys.readouterr()
    assert "preparing data.source=" in captured.out  # the edited corpus, into a new directory
    assert "was trained on other data" in captured.err and f"did the files of data.source={corpus} change?" in captured.err


def test_a_fresh_start_in_a_used_run_dir_starts_its_logs_over(tmp_path):
    run = tmp_path / "run"
    args = TINY + [f"run.dir={run}", "train.eval_every=0", "checkpoint.every=0", "checkpoint.save_final=false"]
    assert main(args + ["train.max_steps=3"]) == 0
    assert main(args + ["train.max_steps=2"]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert len([n for n in os.listdir(run / "tb") if n.startswith("events.out.tfevents.")]) == 1


def test_keys_newer_than_a_checkpoint_count_as_their_defaults():
    """A checkpoint from an earlier version lacks keys added since: they are compared as the
    defaults (how that version behaved), not as None, so it still resumes."""
    import copy

    from moe_dist.config import Config
    from moe_dist.trainer.trainer import _config_diff

    new = Config().to_dict()
    old = copy.deepcopy(new)
    del old["moe"]["entropy_scope"], old["attention"]["entropy_scope"], old["data"]["rank_split"]
    assert _config_diff(old, new) == []
    new["moe"]["entropy_scope"], new["moe"]["eval_capacity_factor"] = "sequence", 2.0  # eval-only: may differ
    assert _config_diff(old, new) == ["moe.entropy_scope: checkpoint 'batch', config 'sequence'"]


def test_with_a_data_dir_the_manifest_not_the_recorded_tokenizer_must_match():
    """data.dir's manifest decides the tokenizer (checked against data.tokenizer at start,
    and the checkpoint pins the manifest's sha256): a checkpoint that recorded another
    tokenizer name, as runs could before that check, still resumes. Without data.dir the
    tokenizer decides the stream and must match."""
    from moe_dist.config import Config
    from moe_dist.trainer.trainer import _config_diff

    old, new = Config().to_dict(), Config().to_dict()
    old["data"]["tokenizer"], new["data"]["tokenizer"] = "bpe", "bytes"
    assert _config_diff(old, new) == ["data.tokenizer: checkpoint 'bpe', config 'bytes'"]
    old["data"]["dir"] = new["data"]["dir"] = "data/mine"
    assert _config_diff(old, new) == []


def test_checkpoint_metadata_is_validated(tmp_path):
    """meta.json must list every file a load reads and agree with the directory's step."""
    import shutil

    from moe_dist.trainer.checkpoint import load_checkpoint

    run = tmp_path / "run"
    assert main(TINY + [f"run.dir={run}", "train.max_steps=2", "train.eval_every=0", "checkpoint.every=2"]) == 0
    good = run / "checkpoints" / "step_00000002"
    assert load_checkpoint(str(good))[1]["step"] == 2

    def broken(name, edit):
        bad = tmp_path / name / "step_00000002"
        shutil.copytree(good, bad)
        meta = json.loads((bad / "meta.json").read_text())
        edit(meta)
        (bad / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(str(bad))
        return str(e.value).replace(str(bad), "DIR")

    assert broken("nofiles", lambda m: m.pop("files")) == "DIR/meta.json: missing or malformed key 'files' (expected dict)"
    assert broken("step", lambda m: m.update(step=99)) == "DIR/meta.json: step 99, but the directory is step_00000002"
    assert broken("extras", lambda m: m["files"].pop("extra_rank00000.pt")) == (
        "DIR/meta.json does not list extra_rank00000.pt: refusing unverified files")
    assert broken("dcp", lambda m: m["files"].pop(".metadata")) == (
        "DIR/meta.json does not list .metadata: refusing unverified files")
    # Entries that are not {bytes: int, sha256: str} for a file of this directory, and
    # layouts that cannot exist: named, never a TypeError or a division by zero.
    entry = "(expected a file name in this directory with an int 'bytes' and a str 'sha256')"
    assert broken("int", lambda m: m["files"].update({"config.yaml": 1})) == (
        f"DIR/meta.json: malformed entry files['config.yaml'] {entry}")
    assert broken("nobytes", lambda m: m["files"]["config.yaml"].pop("bytes")) == (
        f"DIR/meta.json: malformed entry files['config.yaml'] {entry}")
    assert broken("outside", lambda m: m["files"].update({"../x/config.yaml": m["files"]["config.yaml"]})) == (
        f"DIR/meta.json: malformed entry files['../x/config.yaml'] {entry}")
    assert broken("ep0", lambda m: m.update(ep=0)) == (
        "DIR/meta.json: world_size 1 and ep 0 are no layout (both >= 1, ep dividing world_size)")
    assert broken("ep3", lambda m: m.update(world_size=4, ep=3)) == (
        "DIR/meta.json: world_size 4 and ep 3 are no layout (both >= 1, ep dividing world_size)")


def test_resume_by_path_rolls_back_and_sets_the_later_branch_aside(tmp_path, capsys):
    """train.resume=<step 4> in a run at step 6 rolls it back: step 6 and the metrics rows
    after step 4 are kept aside, named in the log. Left in place, keep_last pruned the new
    branch's step 4 and kept the old step 6, which a later resume=auto then continued."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    base = TINY + [f"run.dir={run}", "train.eval_every=0", "checkpoint.keep_last=2", "checkpoint.save_final=false"]
    assert main(base + ["train.max_steps=6", "checkpoint.every=2"]) == 0
    first = read_metrics(run)
    capsys.readouterr()
    assert main(base + ["train.max_steps=5", "checkpoint.every=1", f"train.resume={ckpts / 'step_00000004'}"]) == 0
    out = capsys.readouterr().out
    assert (f"train.resume rolls the run back to step 4: moved its later checkpoint {ckpts / 'step_00000006'} "
            f"aside to {ckpts / 'step_00000006.abandoned'}") in out
    assert f"metrics.jsonl: the rows after step 4 moved to {run / 'metrics.jsonl.abandoned'}" in out
    assert sorted(os.listdir(ckpts)) == ["step_00000004", "step_00000005", "step_00000006.abandoned"]
    with open(run / "metrics.jsonl.abandoned") as f:
        assert [json.loads(line) for line in f] == first[4:]  # the old steps 5 and 6, whole
    # resume=auto continues the new branch, and the log reads as one run.
    assert main(base + ["train.max_steps=6", "checkpoint.every=1", "train.resume=auto"]) == 0
    assert "step_00000005 (step 5)" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(ckpts)) == ["step_00000005", "step_00000006", "step_00000006.abandoned"]


def test_tokens_and_evaluation_follow_the_sequences_not_the_batch_split(tmp_path):
    """metrics' `tokens` sums what each step read, so a run resumed with another batch keeps
    counting right (it was step x this run's batch); an evaluation reads eval_batches global
    batches, however the global batch splits into micro-batches (it read eval_batches
    micro-batches: another split evaluated other sequences)."""
    run = tmp_path / "run"
    base = TINY + ["model.ffn=dense", "train.eval_every=0", "checkpoint.save_final=false", "data.seq_len=32"]
    assert main(base + [f"run.dir={run}", "train.max_steps=2", "checkpoint.every=2", "train.micro_batch_size=4"]) == 0
    assert main(base + [f"run.dir={run}", "train.max_steps=3", "checkpoint.every=0", "train.micro_batch_size=2",
                        "train.resume=auto"]) == 0
    assert [r["tokens"] for r in read_metrics(run)] == [128, 256, 256 + 64]
    # One step, then an evaluation, with the same global batch of 4 split two ways. A dense
    # model: accumulation then trains the same model (routed layers balance per micro-batch).
    val = {}
    for split in (["train.micro_batch_size=4"], ["train.micro_batch_size=2", "train.grad_accum_steps=2"]):
        d = tmp_path / split[-1]
        assert main(base + [f"run.dir={d}", "train.max_steps=1", "train.eval_every=1", "train.eval_batches=2",
                            "checkpoint.every=0", *split]) == 0
        val[split[-1]] = [r["val_loss"] for r in read_metrics(d) if "val_loss" in r]
    a, b = val.values()
    assert len(a) == len(b) == 1 and abs(a[0] - b[0]) <= 1e-5 * abs(a[0]), val


def test_an_interrupted_resave_is_restored_whatever_train_resume_says(tmp_path, capsys):
    """A crash between a re-save's two renames leaves the step only in .tmp-replaced-: a
    fresh start must see it (and refuse to write over the run), not let its first save's
    cleanup delete the only copy."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    base = TINY + [f"run.dir={run}", "train.eval_every=0", "checkpoint.save_final=false"]
    assert main(base + ["train.max_steps=2", "checkpoint.every=2"]) == 0
    os.rename(ckpts / "step_00000002", ckpts / ".tmp-replaced-step_00000002")
    capsys.readouterr()
    assert main(base + ["train.max_steps=2", "checkpoint.every=2"]) == 2
    out, err = capsys.readouterr()
    assert f"restored {ckpts / 'step_00000002'}: a re-save of that step was interrupted" in out
    assert "already holds a run (a checkpoint of step 2)" in err
    assert sorted(os.listdir(ckpts)) == ["step_00000002"]


def test_checkpoint_retention_and_resave(tmp_path):
    from moe_dist.trainer.checkpoint import load_checkpoint, save_checkpoint, state_file, write_rank_file

    def write(state):
        return lambda tmp: write_rank_file(tmp, state_file(0), state)

    root = str(tmp_path / "ckpt")
    for step in (100, 150):
        save_checkpoint(root, step, write({"step": step}), "a: 1\n", keep_last=2)
    # A run resumed from an older step saves step 60: retention keeps it (and the newest).
    save_checkpoint(root, 60, write({"step": 60}), "a: 1\n", keep_last=2)
    assert list_checkpoints(root) == [60, 150]
    # Re-saving a step replaces it whole; nothing is left aside.
    save_checkpoint(root, 150, write({"step": 151}), "a: 2\n", keep_last=2)
    meta, state, config = load_checkpoint(os.path.join(root, "step_00000150"))
    assert state == {"step": 151} and config == "a: 2\n" and meta["step"] == 150
    assert sorted(os.listdir(root)) == ["step_00000060", "step_00000150"]
    # A crash between a re-save's two renames leaves step 150 only aside (and the new one
    # unrenamed): it is put back, not lost to the next save's cleanup of .tmp- directories.
    from moe_dist.trainer.checkpoint import recover_interrupted_resave

    os.rename(os.path.join(root, "step_00000150"), os.path.join(root, ".tmp-replaced-step_00000150"))
    os.makedirs(os.path.join(root, ".tmp-step_00000150"))
    assert recover_interrupted_resave(root) == [os.path.join(root, "step_00000150")]
    assert load_checkpoint(os.path.join(root, "step_00000150"))[1] == {"step": 151}
    assert recover_interrupted_resave(root) == []  # nothing else aside
    # keep_every: multiples of 100 survive beyond keep_last.
    for step in (200, 250, 300, 350):
        save_checkpoint(root, step, write({"step": step}), "a: 1\n", keep_last=2, keep_every=100)
    assert list_checkpoints(root) == [200, 300, 350]


def test_a_training_step_reads_the_host_once(tmp_path, monkeypatch):
    """On a GPU every read of a value on the host waits for the queued work. A step reads
    once (the logged losses and the gradient norm together), however many micro-batches:
    2 more steps add exactly 2 reads. The routed layers take a GPU's path (no host reads)."""
    import moe_dist.moe.dispatch as dispatch

    monkeypatch.setattr(dispatch, "host_reads_free", lambda device: False)

    def run(steps):
        cfg = load_config(None, TINY + [f"run.dir={tmp_path / str(steps)}", f"train.max_steps={steps}",
                                        "train.grad_accum_steps=3", "train.eval_every=0", "checkpoint.every=0",
                                        "checkpoint.save_final=false", "moe.grouped_mm=torch"])  # fmt: skip
        trainer = Trainer(cfg, log=lambda *_: None)
        with HostReads() as host:
            trainer.fit()
        trainer.close()
        return sorted(host.reads)

    two, four = run(2), run(4)
    extra = list(four)
    for r in two:
        extra.remove(r)
    assert extra == ["tolist", "tolist"], (two, four)

"""One-process trainer: AdamW, warmup + cosine, clipping, bf16 autocast on GPU, eval,
metrics, TensorBoard, atomic checkpoints and exact resume.

Exact resume: a checkpoint holds everything that decides the next step (parameters,
optimizer moments and step counts, scheduler, torch/numpy/python RNG states, the data
loader's position), and the data loaders draw from their own generators, never the global
RNG, so a resumed run computes bit-for-bit the same steps as an uninterrupted one on CPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from typing import Any, Optional

import numpy as np
import torch
import yaml
from torch.distributed.checkpoint.api import CheckpointException

import moe_dist
from moe_dist.config import Config, dump_config
from moe_dist.data.cache import ensure_prepared
from moe_dist.data.loader import build_loader, shard_hash_errors, val_windows
from moe_dist.data.prepare import MANIFEST
from moe_dist.errors import CheckpointError, ConfigError, DataError, LaunchError, MoeDistError
from moe_dist.files import sha256_file
from moe_dist.macs import count as count_macs
from moe_dist.models.transformer import LM, lm_loss
from moe_dist.parallel.layout import ParallelLayout, env_from_mpi
from moe_dist.moe.experts import expert_stacks
from moe_dist.moe.noise import noise_for, step_keys
from moe_dist.moe.recompute import recompute_count
from moe_dist.trainer import checkpoint as ckpt
from moe_dist.trainer.backends import build_backend, load_scheduler
from moe_dist.trainer.metrics import MetricsLogger
from moe_dist.trainer.traffic import TrafficMonitor, peak_tflops, set_timing

# Config sections that must match between a checkpoint and the run resuming it.
_MUST_MATCH = ("model", "moe", "attention")
# An implementation choice, and an evaluation-only setting: neither changes the model.
_MAY_DIFFER = {"moe.grouped_mm", "moe.eval_capacity_factor"}
# Single keys that must match too. The optimizer's: a resume loads AdamW's hyper-parameters
# and the schedule's base lr from the checkpoint but rebuilds the schedule's shape from the
# config, so a change would train with neither (Megatron refuses these too, unless told to
# override). The data stream's: the loader position counts windows of one tokenization,
# order and split; another corpus, tokenizer, seq_len, seed or worker count would resume
# into a different stream (or crash inside torchdata). train.max_steps and optim.grad_clip
# may change: they are read from the config every step.
_MUST_MATCH_KEYS = tuple(
    [f"optim.{k}" for k in ("lr", "min_lr", "schedule", "warmup_steps", "weight_decay", "beta1", "beta2", "eps")]
    + ["run.seed"]
    + [f"data.{k}" for k in ("source", "tokenizer", "vocab_size", "seq_len", "val_fraction", "text_field",
                             "max_docs", "samples_per_shard", "shuffle", "rank_split", "num_workers")]
)
# A checkpoint resumes only under the same backend settings: ZeRO-0 fp32 writes torch-format
# optimizer state, ZeRO-1/2/3 their own per-parameter keys, and cross-resume is not tested.
_BACKEND_KEYS = ("train.backend", "deepspeed.zero_stage", "deepspeed.offload_optimizer")


def _fault(kind: str, step: int, rank: int = 0) -> bool:
    """Test hook, MOE_DIST_FAULT=...: kill_at_step:N and kill_in_save:N SIGKILL every rank
    (one process); kill_rank:R:N SIGKILLs rank R and hang_rank:R:N stops rank R forever,
    after step N."""
    spec = os.environ.get("MOE_DIST_FAULT", "")
    return spec in (f"{kind}:{step}", f"{kind}:{rank}:{step}")


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def resolve_device(cfg: Config) -> torch.device:
    if cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("run.device: cuda requested but no CUDA device is available")
        local = os.environ.get("LOCAL_RANK", "0") or "0"
        count = torch.cuda.device_count()
        if not local.isdigit() or int(local) >= count:
            raise LaunchError(
                f"LOCAL_RANK={local} but this node has {count} visible CUDA device(s): launch at most "
                f"{count} process(es) per node (NPROC), one per GPU"
            )
        torch.cuda.set_device(int(local))
        return torch.device("cuda", int(local))
    if cfg.moe.grouped_mm == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("moe.grouped_mm=triton needs a CUDA device (this run is on cpu); use auto, torch or loop")
    return torch.device("cpu")


def _check_run_dir(run_dir: str) -> None:
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise LaunchError(f"run.dir={run_dir} is not writable: {e.strerror or e}") from None


def _config_diff(old: dict, new: dict) -> list[str]:
    """Differing must-match keys. A key newer than the checkpoint's config counts as its
    default there: the code that wrote the checkpoint behaved as that default does."""
    defaults = Config().to_dict()
    diffs = []
    keys = [f"{section}.{key}" for section in _MUST_MATCH for key in new.get(section, {})]
    for full in sorted(set(keys) - _MAY_DIFFER) + list(_MUST_MATCH_KEYS):
        if full == "data.tokenizer" and new["data"].get("dir") is not None:
            # An explicit data.dir's manifest names its tokenizer, which the run must name too
            # (data/cache.py), and the checkpoint's data sha256 pins that manifest. A run
            # started before that check may have recorded another name: it still resumes.
            continue
        section, key = full.split(".")
        a, b = old.get(section, {}).get(key, defaults[section][key]), new[section][key]
        if a != b:
            diffs.append(f"{full}: checkpoint {a!r}, config {b!r}")
    return diffs


def _backend_diff(old: dict, new: dict) -> list[str]:
    diffs = []
    for full in _BACKEND_KEYS:
        section, key = full.split(".")
        # Checkpoints written before the deepspeed backend existed are torch-backend ones.
        a = old.get(section, {}).get(key, {"train.backend": "torch"}.get(full))
        b = new.get(section, {}).get(key)
        if full == "train.backend" or new["train"]["backend"] == "deepspeed":
            if a != b:
                diffs.append(f"{full}: checkpoint {a!r}, config {b!r}")
    return diffs


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        # This rank's own device only: a resume with another number of visible devices, or
        # resharded onto more ranks, still restores it.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _seed_forward_rng(seed: int, rank: int, step: int = 0) -> None:
    """Every rank builds the model from the same seed (identical replicas), then draws its
    own forward randomness (model.dropout) from a stream of its own: with one seed
    everywhere, rank r's row i would get rank 0's row-i masks, the same noise `world` times
    over instead of independent draws over the global batch. Each rank's stream is saved in
    its own checkpoint extras, so resume stays exact. (Expert and cross-slice dropout draw
    from neither: train_step gives them a hash of the global row, moe/noise.py.)"""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0]))


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # written by earlier versions: one per visible device
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def verify_shards(data_dir: str, manifest: dict, layout: ParallelLayout) -> None:
    """Every shard of every split against the manifest's sha256, before any work. Rank r
    hashes shards r, r + world, ... of each split; the ranks then share what they found
    (on the wait group: hashing time grows with the corpus), so all stop with one error."""
    errors = [e for split in manifest["splits"] for e in shard_hash_errors(data_dir, manifest, split, layout.rank,
                                                                            layout.world_size)]
    errors = [e for part in layout.gather_object(errors, group=layout.wait_group) for e in part]
    if errors:
        raise DataError(errors[0] + (f" (and {len(errors) - 1} more corrupt shard(s))" if len(errors) > 1 else ""))


class Trainer:
    def __init__(self, cfg: Config, log=print):
        self.cfg = cfg
        env_from_mpi()  # under mpirun, LOCAL_RANK (the GPU) comes from MPI: read it first
        self.device = resolve_device(cfg)
        self.layout = ParallelLayout.from_env(cfg.parallel, self.device.type, cfg.parallel.timeout_s)
        self.is_main = self.layout.is_main
        self.log = log if self.is_main else (lambda *_: None)
        self.run_dir = os.path.abspath(os.path.expanduser(cfg.run.dir))
        _check_run_dir(self.run_dir)
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        # Before anything lists the checkpoints, whatever train.resume says: a fresh start or
        # a resume by path would otherwise let the first save's cleanup of .tmp-* delete it.
        if self.is_main:
            for path in ckpt.recover_interrupted_resave(self.ckpt_dir):
                self.log(f"restored {path}: a re-save of that step was interrupted")
        if self.layout.distributed:
            import torch.distributed as dist

            dist.barrier()  # the others list the checkpoints after rank 0's repair
        self._refuse_to_overwrite()
        use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.ds_config = None
        if cfg.train.backend == "deepspeed":  # a bad DeepSpeed JSON fails here, before any work
            from moe_dist.trainer.deepspeed_backend import deepspeed_config

            self.ds_config = deepspeed_config(cfg, self.layout.world_size, use_bf16)

        # Resume point first: a bad checkpoint must fail before any data or model work.
        self.resume_path, resume_meta, resume_state, old_yaml = self._open_resume()
        if self.resume_path is not None:
            diffs = _config_diff(yaml.safe_load(old_yaml), cfg.to_dict()) + _backend_diff(
                yaml.safe_load(old_yaml), cfg.to_dict()
            )
            if diffs:
                raise CheckpointError(
                    f"checkpoint {self.resume_path} was written by a different config (these keys must match "
                    "to resume): " + "; ".join(diffs)
                )
            self._check_reshard(resume_meta)
            self._set_aside_later_checkpoints(resume_meta["step"])

        self.data_dir, self.manifest = self._prepare_data()
        if cfg.data.verify_shards:
            verify_shards(self.data_dir, self.manifest, self.layout)
        # The data's identity, beside the data.* keys that must match: an edited corpus
        # under the same data.source is prepared anew, and must not resume a position
        # counted in the old shards.
        manifest_path = os.path.join(self.data_dir, MANIFEST)
        self.data_sha256 = sha256_file(manifest_path)
        if self.resume_path is not None and resume_meta.get("data_sha256", self.data_sha256) != self.data_sha256:
            raise CheckpointError(
                f"checkpoint {self.resume_path} was trained on other data: {manifest_path} differs from the "
                f"manifest it was written with (did the files of data.source={cfg.data.source} change?)"
            )
        vocab = self.manifest["vocab_size"]
        if cfg.model.vocab_size is not None:
            if cfg.model.vocab_size < vocab:
                raise ConfigError(
                    f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab} "
                    f"({self.data_dir})"
                )
            vocab = cfg.model.vocab_size
        self.vocab_size = vocab
        n_val = val_windows(self.manifest, cfg.data.seq_len)
        global_batch = cfg.train.micro_batch_size * self.layout.world_size
        if cfg.train.eval_every > 0 and n_val < global_batch:
            raise ConfigError(
                f"train.micro_batch_size={cfg.train.micro_batch_size} x {self.layout.world_size} rank(s) exceeds "
                f"the {n_val} validation sequences in {self.data_dir}; lower it, or raise data.val_fraction"
            )

        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        self.model = LM(cfg, vocab, self.layout).to(self.device)
        if cfg.train.compile:
            # Per block, as torchtitan does: one compiled graph serves every block of the
            # same structure (MoEUT's repeats included), and in place, so parameter names
            # and checkpoints are those of the eager model.
            for block in self.model.blocks:
                block.compile(backend=cfg.train.compile_backend)
            self.log(f"train.compile: {len(self.model.blocks)} block(s) compiled with {cfg.train.compile_backend} "
                     "(compiled on the first step); phase timing off")
        if cfg.train.activation_checkpoint == "full":
            self.log(f"train.activation_checkpoint=full: {cfg.model.n_layers} block application(s) keep only their "
                     "input; the backward runs each forward again")
        self.backend = build_backend(self.model, cfg, self.layout, self.device, self.ds_config)
        _seed_forward_rng(cfg.run.seed, self.layout.rank)
        if getattr(self.backend, "summary", None):
            self.log(self.backend.summary)
        # rank_split=shards: each rank streams its own shards (webdataset's split_by_node).
        # rank_split=batch: every rank streams the same global batches and keeps its rows,
        # so the data order does not depend on the layout (ep=1 and ep=4 see the same batches).
        by_batch = cfg.data.rank_split == "batch"
        self.train_loader = build_loader(
            self.data_dir,
            self.manifest,
            "train",
            cfg.data.seq_len,
            cfg.train.micro_batch_size * (self.layout.world_size if by_batch else 1),
            rank=0 if by_batch else self.layout.rank,
            world=1 if by_batch else self.layout.world_size,
            seed=cfg.run.seed,
            shuffle=cfg.data.shuffle,
            num_workers=cfg.data.num_workers,
            verify=False,  # verify_shards above, split across the ranks
        )
        self.step = 0
        self.tokens = 0
        """Training tokens so far, summed step by step (metrics' `tokens`; kept in checkpoints)."""
        self._pending_save = None
        self.saving: Optional[int] = None
        """The step whose checkpoint is being written, while a save runs."""
        # checkpoint.async_save: DCP's background writer coordinates over its own gloo group.
        self._async_group = None
        if cfg.checkpoint.async_save:
            import torch.distributed as dist

            # One-process DeepSpeed runs have a (one-rank) default group too: keep DCP off it.
            self._async_group = (
                dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s))
                if dist.is_initialized() else True
            )  # timeout: a stalled peer's background write fails in timeout_s, not torch's 30 min
        if resume_state is not None:
            self._load_state(resume_state, resume_meta)
            self.log(f"resumed from {self.resume_path} (step {resume_meta['step']})")
        self.traffic = self._traffic_monitor()
        self.metrics = None
        if self.is_main:
            dump_config(cfg, os.path.join(self.run_dir, "config.yaml"))
            self.metrics = MetricsLogger(
                self.run_dir, cfg.logging.tensorboard, self.step if self.resume_path else None,
                keep_dropped=self._resume_by_path(),  # a rollback's rows: kept aside (see below)
            )
            if self.metrics.dropped_to is not None:
                self.log(f"metrics.jsonl: the rows after step {self.step} moved to {self.metrics.dropped_to}")
            if self.metrics.unreadable_rows:
                self.log(f"warning: dropped {self.metrics.unreadable_rows} unreadable row(s) of "
                         f"{self.metrics.path} (a write cut short by the crash)")

    def _traffic_monitor(self) -> Optional[TrafficMonitor]:
        """The expert-traffic window (logging.moe_stats_every), on every rank: it is collective."""
        c = self.cfg
        routed = c.model.ffn != "dense" or c.model.attention == "switchhead"
        if c.logging.moe_stats_every == 0 or not routed:
            return None
        # Under train.compile a lap inside a compiled block would time the tracing, not the
        # kernels: phase timing stays off (the window's timing rows read zero).
        set_timing(self.model, c.logging.expert_timing and not c.train.compile)
        sized = dataclasses.replace(c, model=dataclasses.replace(c.model, vocab_size=self.vocab_size))
        # Training FLOPs per token: 2 per MAC forward, twice that backward.
        flops = 6.0 * count_macs(sized).macs_total
        return TrafficMonitor(self.layout, self.device, flops, peak_tflops(self.device, c.logging.peak_tflops))

    def _prepare_data(self) -> tuple[str, dict]:
        """Rank 0 prepares (or finds) the data; the others wait and read it. An error on
        rank 0 reaches every rank, so none waits for data that will never come."""
        if not self.layout.distributed:
            return ensure_prepared(self.cfg.data, log=self.log)
        import torch.distributed as dist

        error = [None]
        if self.is_main:
            try:
                ensure_prepared(self.cfg.data, log=self.log)
            except MoeDistError as e:
                error = [str(e)]
        dist.broadcast_object_list(error, src=0, group=self.layout.wait_group)  # rank 0 may take long
        if error[0] is not None:
            raise DataError(error[0])
        return ensure_prepared(self.cfg.data, log=self.log)

    # -- setup -------------------------------------------------------------------------

    def _refuse_to_overwrite(self) -> None:
        """train.resume=none in a run.dir that holds checkpoints would write its own among
        them, and a later train.resume=auto would resume whichever is newest, of either
        run: refused. Without checkpoints, a fresh start only starts the logs over. The
        ranks decide together."""
        found = None
        if self.cfg.train.resume == "none":
            steps = ckpt.list_checkpoints(self.ckpt_dir)
            if len(steps) > 1:
                found = f"checkpoints of steps {steps[0]}-{steps[-1]}"
            elif steps:
                found = f"a checkpoint of step {steps[0]}"
        found = next((f for f in self.layout.gather_object(found) if f is not None), None)
        if found is not None:
            raise LaunchError(
                f"run.dir={self.cfg.run.dir} already holds a run ({found}), which train.resume=none would "
                f"write over: set train.resume=auto to continue it, or use another run.dir, or delete {self.run_dir}"
            )

    def _resume_by_path(self) -> bool:
        return self.cfg.train.resume not in ("none", "auto")

    def _set_aside_later_checkpoints(self, step: int) -> None:
        """train.resume=<path> of step s, in a run.dir holding checkpoints after s, rolls
        the run back (past a loss spike, say). The later ones are the abandoned branch's:
        left in place, keep_last would prune the new branch's checkpoints in their favour and
        a later train.resume=auto would continue the abandoned run. They are renamed
        step_N.abandoned (never deleted), before any work; all ranks hear of a failure."""
        if not self._resume_by_path():
            return
        error = None
        if self.is_main:
            for s in ckpt.list_checkpoints(self.ckpt_dir):
                if s <= step:
                    continue
                path = os.path.join(self.ckpt_dir, ckpt.step_dir_name(s))
                try:
                    aside = ckpt.set_aside(path, "abandoned")
                except OSError as e:
                    error = (f"train.resume={self.cfg.train.resume} rolls {self.run_dir} back to step {step}, but its "
                             f"later checkpoint {path} could not be moved aside ({e.strerror or e}); move it yourself")
                    break
                self.log(f"train.resume rolls the run back to step {step}: moved its later checkpoint {path} "
                         f"aside to {aside}")
        error = next((e for e in self.layout.gather_object(error) if e is not None), None)
        if error is not None:
            raise CheckpointError(error)

    def _open_resume(self) -> tuple[Optional[str], Any, Any, Any]:
        """(path, meta, this rank's state, config yaml) of the checkpoint to resume, or Nones.
        A damaged checkpoint is an error naming the file; with train.resume=auto and
        checkpoint.fallback=true, the newest complete one before it is used instead, with a
        warning, and the damaged ones are renamed out of the checkpoint list: neither a later
        resume nor keep_last's pruning (which would delete the good one) counts them. Every
        rank checks its own files and all take the same decision."""
        resume, L = self.cfg.train.resume, self.layout
        if resume == "none":
            return None, None, None, None
        if resume != "auto":
            paths = [os.path.abspath(os.path.expanduser(resume))]
        else:
            paths = [os.path.join(self.ckpt_dir, ckpt.step_dir_name(s)) for s in ckpt.list_checkpoints(self.ckpt_dir)]
            paths.reverse()
        fallback = resume == "auto" and self.cfg.checkpoint.fallback
        for i, path in enumerate(paths):
            loaded, error = None, None
            try:
                loaded = ckpt.load_checkpoint(path, L.rank, L.world_size, L.ep)
            except CheckpointError as e:
                error = str(e)
            errors = L.gather_object(error)
            first = next((f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None), None)
            if first is None:
                if self.is_main:  # the others go on to collectives: a failed rename only warns
                    for damaged in paths[:i]:
                        try:
                            self.log(f"moved the damaged {damaged} aside to {ckpt.set_aside(damaged)}")
                        except OSError as e:
                            self.log(f"warning: could not move the damaged {damaged} aside ({e.strerror or e}): "
                                     "checkpoint.keep_last still counts it")
                return (path, *loaded)
            if not fallback or i == len(paths) - 1:
                raise CheckpointError(error or first)
            self.log(f"warning: {first}; checkpoint.fallback=true: trying the checkpoint before it")
        return None, None, None, None

    def _tokens_per_step(self) -> int:
        return self._global_batch() * self.cfg.data.seq_len

    def _global_batch(self) -> int:
        return self.cfg.train.micro_batch_size * self.cfg.train.grad_accum_steps * self.layout.world_size

    def _check_reshard(self, meta: dict) -> None:
        """A format-3 checkpoint may resume under another world size and ep, if the data
        position carries over: the same global batch, read as global batches."""
        if meta["format"] != 3 or meta["world_size"] == self.layout.world_size:
            return
        where = f"checkpoint {self.resume_path} (world size {meta['world_size']}, ep {meta['ep']})"
        if self.cfg.data.rank_split != "batch" or meta.get("rank_split") != "batch":
            raise CheckpointError(
                f"{where} cannot resume on world size {self.layout.world_size}: resharding needs "
                "data.rank_split=batch in both runs (with rank_split=shards each rank's data position "
                "belongs to its old rank)"
            )
        if meta["global_batch"] != self._global_batch():
            raise CheckpointError(
                f"{where} was trained with a global batch of {meta['global_batch']} sequences; this run has "
                f"{self._global_batch()} (train.micro_batch_size x grad_accum_steps x world size): keep it equal"
            )

    def _load_state(self, state: dict[str, Any], meta: dict) -> None:
        try:
            if meta["format"] == 3:
                self.backend.load_sharded(self.resume_path)
                for scheduler in [self.backend.scheduler, *getattr(self.backend, "extra_schedulers", [])]:
                    load_scheduler(scheduler, state["scheduler"])
            else:
                self.backend.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, CheckpointException) as e:
            # DCP's CheckpointException (a BaseException) carries a missing key or a shape.
            raise CheckpointError(f"{self.resume_path}: state does not fit this model: {e}") from None
        self.train_loader.load_state_dict(state["train_loader"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        # Counted, not step x tokens per step: the batch may change on resume. A checkpoint
        # from before the count assumes this run's batch for its steps.
        self.tokens = int(state.get("tokens", self.step * self._tokens_per_step()))
        if meta["world_size"] != self.layout.world_size:
            # Resharded: every rank read rank 0's extras; give each its own stream again.
            _seed_forward_rng(self.cfg.run.seed, self.layout.rank, self.step)

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # -- loop --------------------------------------------------------------------------

    def save(self) -> str:
        """Write a checkpoint of this step (collective); returns its final directory. With
        checkpoint.async_save the files are written in the background and the directory
        appears when finish_pending_save() runs (at the next save or the end of fit)."""
        self.finish_pending_save()
        self.saving = self.step  # for the failure message, until the save returns
        before = (lambda _tmp: _kill_self()) if _fault("kill_in_save", self.step) else None
        config_yaml = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        L, c = self.layout, self.cfg.checkpoint
        extras = {
            "step": self.step,
            "tokens": self.tokens,
            "scheduler": self.backend.scheduler.state_dict(),
            "rng": _rng_state(),
            "train_loader": self.train_loader.state_dict(),
        }

        def write(tmp: str):
            ckpt.write_rank_file(tmp, ckpt.extra_file(L.rank), extras)
            return self.backend.save_sharded(tmp, self._async_group)

        meta = {
            "format": 3,
            "dp": L.dp,
            "global_batch": self._global_batch(),
            "rank_split": self.cfg.data.rank_split,
            "data_sha256": self.data_sha256,
            "experts": self._expert_layout(),
            "config_sha256": hashlib.sha256(config_yaml.encode()).hexdigest(),
            "code_version": moe_dist.__version__,
        }
        step = self.step  # bound now: an asynchronous save finishes after later steps
        tmp, future = ckpt.start_save(self.ckpt_dir, step, write, L)
        finish = lambda: ckpt.finish_save(  # noqa: E731
            self.ckpt_dir, step, tmp, config_yaml, c.keep_last, before, L, meta, c.keep_every
        )
        if future is None:
            path = finish()
            self.saving = None
            return path
        self._pending_save = (future, finish, step)
        self.saving = None
        return os.path.join(self.ckpt_dir, ckpt.step_dir_name(step))

    def finish_pending_save(self) -> None:
        """Wait for this rank's background write, then make the checkpoint visible (collective)."""
        if self._pending_save is None:
            return
        future, finish, self.saving = self._pending_save
        self._pending_save = None
        future.result()  # re-raises a failed write
        finish()
        self.saving = None

    def _expert_layout(self) -> dict[str, list[list[int]]]:
        """Per stacked expert tensor, [first global id, rows] on each ep rank (for meta.json)."""
        mine = {name: [off, p.shape[0]] for name, (p, off) in expert_stacks(self.model).items()}
        z3 = getattr(self.backend, "zero3_experts", None)  # ZeRO-3: experts outside the module tree
        if z3 is not None:
            mine.update({name: [getattr(p, "_moe_expert_offset", 0), p.shape[0]] for name, p in z3.named_params()})
        every = self.layout.gather_object(mine)
        return {name: [every[r][name] for r in range(self.layout.ep)] for name in mine}

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """values averaged over the ranks, on the training device (an nccl group has no CPU
        backend): a collective, no host read."""
        if not self.layout.distributed:
            return values
        import torch.distributed as dist

        values = values.to(self.device, torch.float64)
        dist.all_reduce(values)
        return values / self.layout.world_size

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over the first train.eval_batches global batches of the val split, read
        in chunks of micro_batch_size x world sequences. Every rank reads the same chunks and
        evaluates its rows (the forward is collective under ep), so the result does not
        depend on how the global batch is split over ranks and micro-batches."""
        c, B, r = self.cfg, self.cfg.train.micro_batch_size, self.layout.rank
        loader = build_loader(
            self.data_dir, self.manifest, "val", c.data.seq_len, B * self.layout.world_size,
            shuffle=False, verify=False, loop=False,
        )
        self.backend.module.eval()
        losses = []
        for i, batch in enumerate(loader):
            if i >= c.train.eval_batches * c.train.grad_accum_steps:
                break
            batch = batch[r * B : (r + 1) * B].to(self.device)
            with self._autocast():
                out = self.backend.module(batch[:, :-1])
            losses.append(lm_loss(out.logits, batch[:, 1:]).double())  # kept on the device
        self.backend.module.train()
        # NOTE: device-to-host sync: one per evaluation, not one per batch.
        val_loss = self._mean_over_ranks(torch.stack(losses).mean()).item()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def _routing_noise(self, keys: Optional[list[int]], micro: int, tokens: int) -> dict[str, torch.Tensor]:
        """The forward's noise_L2 (moe/noise.py): this step's keys, and the global index of this
        micro-batch's first token. The step's global batch is micro-batch after micro-batch,
        each split over the ranks in rank order (data.rank_split=batch takes rank r's rows
        so), which makes the index, and with it every mask, the same under any layout."""
        if keys is None:
            return {}
        row0 = (micro * self.layout.world_size + self.layout.rank) * tokens
        return {"noise_L2": noise_for(keys, row0, self.device)}

    def train_step(self, batches) -> dict[str, Any]:
        """One optimizer step over grad_accum_steps micro-batches."""
        c = self.cfg
        accum = c.train.grad_accum_steps
        summed = None  # [lm, aux, loss] summed over the micro-batches, on the device
        B, r = c.train.micro_batch_size, self.layout.rank
        routed_dropout = c.model.ffn != "dense" and (c.moe.expert_dropout > 0 or c.moe.slice_dropout > 0)
        keys = step_keys(c.run.seed, self.step, c.model.n_layers) if routed_dropout else None
        for i, batch in enumerate(batches):
            if c.data.rank_split == "batch" and self.layout.distributed:
                batch = batch[r * B : (r + 1) * B]  # this rank's rows of the global batch
            batch = batch.to(self.device, non_blocking=True)
            noise = self._routing_noise(keys, i, batch.shape[0] * (batch.shape[1] - 1))
            with self.backend.micro_batch(last=i == accum - 1):
                with self._autocast():
                    out = self.backend.module(batch[:, :-1], **noise)
                lm = lm_loss(out.logits, batch[:, 1:])
                aux = out.aux_loss
                loss = lm + aux
                self.backend.backward(loss)
            losses = torch.stack([lm.detach(), aux.detach(), loss.detach()]).double()
            summed = losses if summed is None else summed + losses
            if self.traffic is not None:
                self.traffic.observe(out.moe)  # references only: no sync
        lr = self.backend.lr
        grad_norm = self.backend.step()
        self.model.update_balance_biases()
        self.step += 1
        # The logged losses, averaged over micro-batches and ranks, and the gradient norm (the
        # same on every rank) in one read. NOTE: device-to-host sync: one per step, not one
        # (plus an all-reduce) per micro-batch: each sync lets the GPU run dry while the host
        # queues the next micro-batch.
        mean_3 = self._mean_over_ranks(summed / accum)
        lm_loss_, aux_loss_, loss_, norm = torch.cat([mean_3, grad_norm.reshape(1).to(mean_3)]).tolist()
        return {"step": self.step, "loss": loss_, "lm_loss": lm_loss_, "aux_loss": aux_loss_, "lr": lr,
                "grad_norm": norm}  # fmt: skip

    def fit(self) -> None:
        c = self.cfg
        tokens_per_step = self._tokens_per_step()
        progress = None
        if c.logging.progress and self.is_main:
            from tqdm import tqdm

            progress = tqdm(total=c.train.max_steps, initial=self.step, unit="step", dynamic_ncols=True)
        log = progress.write if progress is not None else self.log
        if self.step >= c.train.max_steps:
            log(f"nothing to train: the run is at step {self.step} and train.max_steps={c.train.max_steps}")
        data = iter(self.train_loader)
        recomputes = recompute_count()
        while self.step < c.train.max_steps:
            t0 = time.perf_counter()
            row = self.train_step(next(data) for _ in range(c.train.grad_accum_steps))
            seconds = time.perf_counter() - t0
            row["tokens_per_s"] = tokens_per_step / seconds
            self.tokens += tokens_per_step
            row["tokens"] = self.tokens
            last = self.step == c.train.max_steps
            save_due = (c.checkpoint.every > 0 and self.step % c.checkpoint.every == 0) or (last and c.checkpoint.save_final)
            window = None
            if self.traffic is not None:
                self.traffic.end_step(tokens_per_step, seconds)
                # A window also closes at every checkpoint: a run resumed from it then logs
                # the same windows as an uninterrupted one.
                if self.step % c.logging.moe_stats_every == 0 or save_due:
                    window = self.traffic.collect(self.step)  # collective, one host sync
                    row.update(window.summary())
            if self.metrics is not None and (self.step % c.logging.log_every == 0 or window is not None):
                self.metrics.log(row)
            if self.metrics is not None and window is not None:
                self.metrics.log_traffic(window)
            if progress is not None:
                progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
                progress.update(1)
            if c.train.eval_every > 0 and (self.step % c.train.eval_every == 0 or last):
                ev = self.evaluate()
                if self.metrics is not None:
                    self.metrics.log({"step": self.step, **ev})
                log(f"step {self.step}: val_loss {ev['val_loss']:.4f}  val_ppl {ev['val_ppl']:.2f}")
            if _fault("kill_at_step", self.step) or _fault("kill_rank", self.step, self.layout.rank):
                _kill_self()
            if _fault("hang_rank", self.step, self.layout.rank):
                while True:
                    time.sleep(60)
            if save_due:
                path = self.save()
                log(f"step {self.step}: {'saving' if self._pending_save else 'saved'} checkpoint {path}")
        self.finish_pending_save()
        if progress is not None:
            progress.close()
        if c.train.activation_checkpoint == "full" and not c.train.compile:
            log(f"train.activation_checkpoint=full: {recompute_count() - recomputes} block forward(s) ran again "
                "in the backward on rank 0")

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()

"""Typed configuration: one dataclass per component, loaded from YAML, overridden by key=value.

    cfg = load_config("configs/quickstart.yaml", ["train.max_steps=50", "run.dir=/tmp/r1"])

Every field has a type and a one-line docstring. Loading checks, before any work starts:
unknown keys (with the closest known key), wrong types, impossible values and values that
contradict each other; each error names the key (and the file it came from).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from moe_dist.errors import ConfigError


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, tb/ and checkpoints/ are written here."""
    seed: int = 0
    """Seed of parameter init, data order and dropout."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available, else cpu."""

    def validate(self) -> None:
        _require(self.dir != "", "run.dir", "must not be empty")
        _require(0 <= self.seed < 2**32, "run.seed", "must be in [0, 2**32 - 1]")  # numpy's range


@dataclass
class ModelConfig:
    vocab_size: Optional[int] = None
    """Vocabulary size; null = take it from the prepared data's tokenizer."""
    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads (per layer; SwitchHead uses few, e.g. 2-4)."""
    head_dim: Optional[int] = None
    """Per-head width; null = d_model / n_heads (which must then divide)."""
    d_ff: int = 512
    """Hidden size of the dense FFN (layers without MoE, and model.ffn=dense)."""
    ffn: Literal["dense", "moe", "sigma_moe", "slice_moe"] = "moe"
    """FFN slot: dense; moe = softmax token-choice (Switch/GShard); sigma_moe = sigmoid
    top-k, no renormalisation (sigma-MoE/MoEUT); slice_moe = SliceMoE. See moe.*."""
    attention: Literal["mha", "switchhead"] = "mha"
    """Attention: multi-head, or SwitchHead (MoE value/output projections, see attention.*)."""
    norm: Literal["pre", "peri"] = "pre"
    """pre = layernorm before every sublayer; peri = MoEUT's peri-layernorm: layernorm only
    on the inputs of sigmoid/softmax (routers, Q and K, readout), never on values or FFN inputs."""
    group_size: Optional[int] = None
    """MoEUT layer grouping: G distinct layers repeated n_layers/G times (A B A B ...);
    null = every layer distinct."""
    activation: Literal["swiglu", "relu", "gelu"] = "swiglu"
    """FFN and expert activation: swiglu = W_down(silu(W_gate x) * W_up x)."""
    positions: Literal["rope", "learned"] = "rope"
    """Position encoding: rotary (rope) or learned absolute embeddings."""
    rope_base: float = 10000.0
    """Rotary base frequency."""
    dropout: float = 0.0
    """Dropout on attention output, FFN output and embeddings."""
    tie_embeddings: bool = True
    """Share the token-embedding matrix with the readout."""
    init: Optional[Literal["scaled_normal", "fan_in"]] = None
    """Weight init (models/init.py): scaled_normal = N(0, init_std), residual output
    projections init_std/sqrt(2*n_layers) (GPT-2); fan_in = every block matrix
    N(0, sqrt(2/n_layers)/sqrt(fan_in)) (the MoEUT authors'), embeddings N(0, init_std).
    null = fan_in under norm=peri (whose residual path is never normalised), scaled_normal
    otherwise."""
    init_std: float = 0.02
    """Std of the embeddings, and of the scaled_normal init."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon."""

    @property
    def init_scheme(self) -> str:
        return self.init or ("fan_in" if self.norm == "peri" else "scaled_normal")

    def validate(self) -> None:
        _require(self.vocab_size is None or self.vocab_size >= 2, "model.vocab_size", ">= 2")
        for key in ("d_model", "n_layers", "n_heads", "d_ff"):
            _require(getattr(self, key) >= 1, f"model.{key}", "must be >= 1")
        _require(
            self.head_dim is not None or self.d_model % self.n_heads == 0,
            "model.d_model",
            f"d_model={self.d_model} is not divisible by model.n_heads={self.n_heads} (or set model.head_dim)",
        )
        _require(self.head_dim is None or self.head_dim >= 1, "model.head_dim", "must be >= 1")
        head_dim = self.head_dim or self.d_model // self.n_heads
        _require(
            self.positions != "rope" or head_dim % 2 == 0,
            "model.n_heads",
            f"rotary positions need an even head dim, got d_model/n_heads={head_dim}",
        )
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _require(self.init_std > 0, "model.init_std", "must be > 0")
        _require(self.rope_base > 1, "model.rope_base", "must be > 1")
        _require(self.norm_eps > 0, "model.norm_eps", "must be > 0")
        _require(
            self.group_size is None or (self.group_size >= 1 and self.n_layers % self.group_size == 0),
            "model.group_size",
            f"G={self.group_size} must be >= 1 and divide model.n_layers={self.n_layers}",
        )


@dataclass
class MoEConfig:
    num_experts: int = 8
    """Routed experts per MoE layer."""
    top_k: int = 2
    """Experts per token; 1 = Switch. For k >= 2 the k weights are renormalised to sum 1."""
    d_expert: int = 256
    """Hidden size of each expert FFN."""
    capacity_factor: Optional[float] = 1.25
    """Expert capacity = ceil(tokens * top_k / num_experts * cf); 0 or null = dropless."""
    eval_capacity_factor: Optional[float] = None
    """The capacity factor in evaluation (model.eval()); null = capacity_factor, 0 = dropless.
    Switch Transformer trains at 1.0-1.25 and evaluates at 2.0 (DeepSpeed-MoE's
    eval_capacity_factor)."""
    every: int = 1
    """MoE FFN in every `every`-th block (blocks every-1, 2*every-1, ...); dense elsewhere."""
    num_shared_experts: int = 0
    """Shared experts (each of width d_expert) that every token passes through."""
    lb_loss_weight: float = 0.01
    """alpha of the Switch load-balancing loss alpha * E * sum_i f_i P_i."""
    z_loss_weight: float = 0.001
    """beta of the router z-loss beta * mean(logsumexp(logits)^2)."""
    expert_init_scale: float = 1.0
    """Multiplies the init std of the routed experts' weights only (Switch Transformer's
    smaller init, 0.1, applies to every weight; docs/architectures.md)."""
    grouped_mm: Literal["auto", "triton", "torch", "loop"] = "auto"
    """Local expert compute: our Triton kernels (CUDA), torch._grouped_mm, a per-expert loop,
    or auto (see ops/grouped_mm)."""
    entropy_loss_weight: float = 0.0
    """sigma-MoE/MoEUT entropy regulariser weight: sum_e p_e log p_e of the mean router
    softmax, pooled over all repeats of a shared layer."""
    entropy_scope: Literal["batch", "sequence"] = "batch"
    """batch: one p, the mean over the global batch. sequence: one p per sequence, the
    terms averaged over sequences (the MoEUT authors' code): it also penalises sequences
    that each use few experts, which one batch-level p can hide."""
    expert_dropout: float = 0.0
    """Training only: each (token, expert) is excluded from selection with this probability
    (sigma-MoE's expert dropout; not Switch's dropout inside the experts)."""
    bias_update_rate: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the selection scores
    only, moved by this rate toward balance after every step; 0 = off."""
    num_slices: int = 8
    """SliceMoE: S contiguous slices of the hidden vector, each routed on its own."""
    slice_router_hidden: int = 256
    """SliceMoE: hidden width of the shared slice router MLP (d/S -> hidden -> E)."""
    slice_cap_loss_weight: float = 0.01
    """SliceMoE: alpha of the slice capacity loss alpha * CV^2 of per-expert slice loads."""
    slice_dropout: float = 0.0
    """SliceMoE cross-slice dropout: training only, drop each of a slice's top-k weights with
    this probability (never all) and renormalise the survivors to sum 1."""

    def capacity_factor_for(self, training: bool) -> Optional[float]:
        """The capacity factor of a training or an evaluation forward; None = dropless."""
        cf = self.capacity_factor if training or self.eval_capacity_factor is None else self.eval_capacity_factor
        return None if cf == 0 else cf

    def validate(self) -> None:
        _require(self.num_experts >= 1, "moe.num_experts", "must be >= 1")
        _require(self.top_k >= 1, "moe.top_k", "must be >= 1")
        _require(
            self.top_k <= self.num_experts,
            "moe.top_k",
            f"top_k={self.top_k} exceeds moe.num_experts={self.num_experts}",
        )
        _require(self.d_expert >= 1, "moe.d_expert", "must be >= 1")
        _require(
            self.capacity_factor is None or self.capacity_factor >= 0,
            "moe.capacity_factor",
            f"must be >= 0 (0 or null = dropless), got {self.capacity_factor}",
        )
        _require(
            self.eval_capacity_factor is None or self.eval_capacity_factor >= 0,
            "moe.eval_capacity_factor",
            f"must be >= 0 (0 = dropless, null = moe.capacity_factor), got {self.eval_capacity_factor}",
        )
        _require(self.every >= 1, "moe.every", "must be >= 1")
        _require(self.num_shared_experts >= 0, "moe.num_shared_experts", "must be >= 0")
        _require(self.lb_loss_weight >= 0, "moe.lb_loss_weight", "must be >= 0")
        _require(self.z_loss_weight >= 0, "moe.z_loss_weight", "must be >= 0")
        _require(self.expert_init_scale > 0, "moe.expert_init_scale", "must be > 0")
        _require(self.entropy_loss_weight >= 0, "moe.entropy_loss_weight", "must be >= 0")
        _require(0 <= self.expert_dropout < 1, "moe.expert_dropout", "must be in [0, 1)")
        _require(self.bias_update_rate >= 0, "moe.bias_update_rate", "must be >= 0")
        _require(self.num_slices >= 1, "moe.num_slices", "must be >= 1")
        _require(self.slice_router_hidden >= 1, "moe.slice_router_hidden", "must be >= 1")
        _require(self.slice_cap_loss_weight >= 0, "moe.slice_cap_loss_weight", "must be >= 0")
        _require(0 <= self.slice_dropout < 1, "moe.slice_dropout", "must be in [0, 1)")


@dataclass
class AttentionConfig:
    num_experts: int = 4
    """SwitchHead: value and output experts per head."""
    top_k: int = 2
    """SwitchHead: experts selected per head, on the source and on the destination side."""
    entropy_loss_weight: float = 0.0
    """Entropy regulariser on the gates (the SwitchHead paper uses none; MoEUT may)."""
    entropy_scope: Literal["batch", "sequence"] = "batch"
    """As moe.entropy_scope, for the gates; either way the heads' terms are averaged."""
    bias_update_rate: float = 0.0
    """Aux-loss-free balancing of the gates (see moe.bias_update_rate); 0 = off."""

    def validate(self) -> None:
        _require(self.num_experts >= 1, "attention.num_experts", "must be >= 1")
        _require(self.top_k >= 1, "attention.top_k", "must be >= 1")
        _require(
            self.top_k <= self.num_experts,
            "attention.top_k",
            f"top_k={self.top_k} exceeds attention.num_experts={self.num_experts}",
        )
        _require(self.entropy_loss_weight >= 0, "attention.entropy_loss_weight", "must be >= 0")
        _require(self.bias_update_rate >= 0, "attention.bias_update_rate", "must be >= 0")


@dataclass
class DataConfig:
    source: str = "sotu"
    """Text source: 'sotu' (the embedded corpus), a directory of .txt files, or a .jsonl file."""
    dir: Optional[str] = None
    """Prepared shards; null = a cache directory derived from source, tokenizer and seq_len."""
    tokenizer: Literal["bpe", "gpt2", "bytes"] = "bpe"
    """bpe = byte-level BPE trained on the corpus; gpt2 = GPT-2's BPE (offline); bytes = raw."""
    vocab_size: int = 8192
    """Vocabulary of the trained BPE tokenizer (tokenizer=bpe only)."""
    seq_len: int = 128
    """Tokens per training sequence."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation."""
    text_field: str = "text"
    """Field that holds the text in a .jsonl source."""
    max_docs: Optional[int] = None
    """Use only the first max_docs documents of the source (small experiments, tests)."""
    samples_per_shard: int = 2048
    """Sequences per webdataset tar shard."""
    num_workers: int = 0
    """DataLoader worker processes; shards are split over ranks, then workers."""
    shuffle: bool = True
    """Shuffle shard order and sample order within a shard, per epoch, from run.seed."""
    verify_shards: bool = True
    """Check every shard's sha256 against the manifest before training (the ranks share the work)."""
    rank_split: Literal["shards", "batch"] = "shards"
    """How ranks share the data: shards = each rank streams its own shards (webdataset's
    split_by_node); batch = every rank streams the same global batches and keeps its rows,
    so the data order is the same whatever the layout (exact ep=1 vs ep=N parity)."""

    def validate(self) -> None:
        _require(self.source != "", "data.source", "must not be empty")
        _require(self.vocab_size >= 260, "data.vocab_size", "must be >= 260 (256 bytes + specials)")
        _require(self.seq_len >= 2, "data.seq_len", "must be >= 2")
        _require(0.0 < self.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
        _require(self.max_docs is None or self.max_docs >= 2, "data.max_docs", "must be >= 2")
        _require(self.samples_per_shard >= 1, "data.samples_per_shard", "must be >= 1")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """After warmup: cosine decay to min_lr at train.max_steps, or constant."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not norms, biases or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 = no clipping."""

    def validate(self) -> None:
        _require(self.lr > 0, "optim.lr", "must be > 0")
        _require(0 <= self.min_lr <= self.lr, "optim.min_lr", "must be in [0, optim.lr]")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _require(0 <= self.beta1 < 1, "optim.beta1", "must be in [0, 1)")
        _require(0 <= self.beta2 < 1, "optim.beta2", "must be in [0, 1)")
        _require(self.eps > 0, "optim.eps", "must be > 0")
        _require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")


@dataclass
class TrainConfig:
    max_steps: int = 300
    """Optimizer steps to train."""
    micro_batch_size: int = 16
    """Sequences per forward/backward."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute dtype: auto = bf16 autocast on CUDA, fp32 on CPU. Router math is always fp32."""
    eval_every: int = 100
    """Evaluate on the val split every N steps (and at the end); 0 = never."""
    eval_batches: int = 8
    """Global batches per evaluation: eval_batches x micro_batch_size x grad_accum_steps x
    world size sequences, from the start of the val split each time, so a resharded run
    that keeps the global batch evaluates the same sequences."""
    resume: str = "none"
    """none = fresh run; auto = latest complete checkpoint in run.dir if any; or a path."""
    backend: Literal["torch", "deepspeed"] = "torch"
    """torch = AdamW with DDP for dense gradients (or FSDP2, train.fsdp) and our expert-group
    reduction; deepspeed = a DeepSpeed engine (deepspeed.zero_stage; see docs/backends.md)."""
    fsdp: bool = False
    """torch backend: shard dense parameters, gradients and optimizer state over the world with
    FSDP2 (fully_shard per block); expert shards stay with expert parallelism."""
    compile: bool = False
    """torch backend: torch.compile every transformer block (nn.Module.compile, in place, so
    checkpoint keys do not change). An MoE block at ep=1 on the bf16 torch._grouped_mm path
    compiles to one graph, routing, capacity drops and balancing statistics included; host
    syncs (the all-to-all split sizes at ep>1, the CPU loop backend) split it in pieces.
    Phase timing (logging.expert_timing) is off under compile."""
    compile_backend: str = "inductor"
    """torch.compile backend for train.compile (a name from torch._dynamo.list_backends)."""
    activation_checkpoint: Literal["none", "full"] = "none"
    """full = every block application keeps only its input for the backward, which runs its
    forward again (all-to-alls included): less activation memory for about one more forward
    of compute (moe/recompute.py). Any backend; may change across a resume."""

    def validate(self) -> None:
        _require(self.max_steps >= 1, "train.max_steps", "must be >= 1")
        _require(self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        _require(self.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
        _require(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        _require(self.eval_batches >= 1, "train.eval_batches", "must be >= 1")
        _require(self.resume != "", "train.resume", "must be none, auto or a checkpoint path")
        _require(not (self.fsdp and self.backend == "deepspeed"), "train.fsdp",
                 "is a torch-backend option; with train.backend=deepspeed use deepspeed.zero_stage=3")
        _require(not (self.compile and self.backend == "deepspeed"), "train.compile",
                 "is a torch-backend option (DeepSpeed's engine has its own compile)")
        if self.compile:
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            _require(self.compile_backend in known, "train.compile_backend",
                     f"{self.compile_backend!r} is not a torch.compile backend; known: {', '.join(known)}")


@dataclass
class ParallelConfig:
    ep: int = 1
    """Expert-parallel degree: the experts of each MoE layer are sharded over ep ranks;
    world = dp x ep."""
    attention_experts: Literal["sharded", "replicated"] = "replicated"
    """SwitchHead V/O experts: sharded over the ep group like FFN experts (all-to-all), or
    replicated on every rank (no attention all-to-all; see docs/expert_parallel.md)."""
    timeout_s: float = 300.0
    """Collective timeout: a rank that waits longer for its peers fails with an error."""
    wait_timeout_s: float = 3600.0
    """How long the other ranks wait for rank 0's one-rank work, whose length grows with the
    corpus or the checkpoint, not the step: preparing the data, checksumming a checkpoint.
    A rank that dies is still seen at once (its connections close); a hung one after this."""

    def validate(self) -> None:
        _require(self.ep >= 1, "parallel.ep", "must be >= 1")
        _require(self.timeout_s > 0, "parallel.timeout_s", "must be > 0")
        _require(self.wait_timeout_s > 0, "parallel.wait_timeout_s", "must be > 0")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    """ZeRO stage with train.backend=deepspeed: 0 (plain data parallel), 1 (optimizer state
    sharded), 2 (+ gradients), 3 (+ dense parameters; expert parameters stay sharded by ep)."""
    offload_optimizer: bool = False
    """ZeRO-1/2/3: keep optimizer state and the optimizer step on the CPU."""
    config: Optional[str] = None
    """A DeepSpeed JSON file merged into the generated config; a value that contradicts this
    YAML (batch sizes, ZeRO stage, bf16, clipping, optimizer) is an error."""

    def validate(self) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
        _require(
            not (self.offload_optimizer and self.zero_stage == 0),
            "deepspeed.offload_optimizer",
            "needs deepspeed.zero_stage >= 1 (DeepSpeed offloads ZeRO optimizer state only)",
        )


@dataclass
class LoggingConfig:
    log_every: int = 1
    """Write a metrics.jsonl row and TensorBoard scalars every N steps."""
    moe_stats_every: int = 10
    """Expert-traffic window: every N steps, gather the routing statistics, all-to-all bytes
    and phase timings of the last N steps (one collective) and log them; 0 = off."""
    expert_timing: bool = True
    """Time the forward phases of every routed call (route, dispatch, all-to-all, compute,
    combine) for the traffic window."""
    peak_tflops: Optional[float] = None
    """Peak TFLOP/s of one device for the MFU estimate; null = known GPUs' dense bf16 peak
    (CPU: no MFU, model TFLOP/s only)."""
    progress: bool = True
    """Show a progress bar (loss, tokens/s, ETA) on stderr."""
    tensorboard: bool = True
    """Write TensorBoard events under run.dir/tb."""

    def validate(self) -> None:
        _require(self.log_every >= 1, "logging.log_every", "must be >= 1")
        _require(self.moe_stats_every >= 0, "logging.moe_stats_every", "must be >= 0 (0 = off)")
        _require(self.peak_tflops is None or self.peak_tflops > 0, "logging.peak_tflops", "must be > 0 or null")


@dataclass
class CheckpointConfig:
    every: int = 100
    """Save a checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_last: int = 3
    """Keep the newest N complete checkpoints; 0 = keep all."""
    async_save: bool = False
    """Write checkpoints in a background thread: the state is copied to CPU memory at the
    save step and training goes on; the checkpoint becomes visible (renamed into place) at
    the next save or at the end of training."""
    fallback: bool = False
    """train.resume=auto: when the newest checkpoint is damaged, resume from the newest
    complete one before it, with a warning, instead of stopping with the error."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of N (0 = none), beyond keep_last."""
    save_final: bool = True
    """Save a checkpoint after the last step."""

    def validate(self) -> None:
        _require(self.every >= 0, "checkpoint.every", "must be >= 0")
        _require(self.keep_last >= 0, "checkpoint.keep_last", "must be >= 0")
        _require(self.keep_every >= 0, "checkpoint.keep_every", "must be >= 0")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        m, moe = self.model, self.moe
        if self.train.backend != "deepspeed":  # symmetric with train.fsdp under deepspeed
            _require(self.deepspeed.config is None, "deepspeed.config",
                     "is a deepspeed-backend option; set train.backend=deepspeed or remove it")
            _require(not self.deepspeed.offload_optimizer, "deepspeed.offload_optimizer",
                     "is a deepspeed-backend option; set train.backend=deepspeed or remove it")
        if m.group_size is not None and m.ffn != "dense":
            # Blocks are shared per position in the group: the MoE pattern repeats with the
            # group, so "every every-th applied layer" needs every | group_size.
            _require(
                m.group_size % moe.every == 0,
                "moe.every",
                f"every={moe.every} does not divide model.group_size={m.group_size} (MoEUT groups repeat the pattern)",
            )
        if m.ffn == "slice_moe":
            _require(
                m.d_model % moe.num_slices == 0,
                "moe.num_slices",
                f"S={moe.num_slices} does not divide model.d_model={m.d_model}",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# ---------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks.
# ---------------------------------------------------------------------------------------


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches no type")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            # YAML 1.1 reads yes/no/on/off unquoted as booleans: say so, or the message names
            # a value the user never typed.
            hint = " (YAML reads yes, no, on and off as booleans)" if isinstance(value, bool) else ""
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}{hint}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; accept what Python reads as a float.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this file


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown key '{full}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of {tp.__name__} keys, got {value!r}")
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _check_value(value, tp, full)
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.max_steps=50' -> ('train.max_steps', 50); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or "." not in key:
        raise ConfigError(f"override '{text}': the key must be section.key (e.g. train.max_steps)")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML: {e}") from None
    return key, value


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Build and validate a Config; errors are prefixed with `source` (a file name)."""
    try:
        cfg = _build(Config, data, "")
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load keeps the last of two equal keys: a second `train:` section would
    replace the first whole, its keys back at their defaults without a word. Refused."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {line} (first at line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_config(path: Optional[str], overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply key=value overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path) as f:
                loaded = yaml.load(f, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        data = loaded
    if overrides:
        source += " + command-line overrides"
        for text in overrides:
            key, value = parse_override(text)
            _set_dotted(data, key, value)
    return config_from_dict(data, source)


def dump_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)

"""The DeepSpeed backend: the one module that imports DeepSpeed or touches its globals.

ZeRO 0/1/2. Expert parameters are DeepSpeed expert parameters: DeepSpeed recognises them by
`param.allreduce = False` and `param.group_name`, reduces their gradients over
deepspeed.utils.groups' expert-data-parallel group of that name and shards their ZeRO state
within it. We put OUR process groups (parallel/layout.py, ep innermost) into those dicts
instead of letting DeepSpeed build its own, so both sides agree on the layout by
construction. DeepSpeed turns its MoE gradient path on only when the model contains an
instance of its MoE class (engine.has_moe_layers); `_ExpertGroups` is such an instance that
owns no parameters and exists to flip that switch and to register the groups.

ZeRO-3. DeepSpeed refuses its own MoE under stage 3 ("Native DeepSpeed MoE is not supported
with ZeRO Stage 3") because stage 3 partitions every parameter over the whole data-parallel
group, and an expert shard must not be partitioned or averaged across ranks that hold other
experts. Here the expert modules are hidden from the engine (detached from the module tree
it walks; the owning layers still call them) and trained by a second AdamW with the torch
backend's reduction over the expert-data-parallel group; ZeRO-3 partitions only the dense
parameters. Gradient clipping uses one global norm over both: the dense norm DeepSpeed
computes plus the expert norm, fed into the stage-3 optimizer's norm (see _Zero3Experts).

Gradient scale. DeepSpeed divides dense and expert gradients by the data-parallel world
(_reduce_expert_gradients: "utilize dp_world_size for allreduce average"), which is our
1/world rule (parallel/grads.py), so all backends compute the one-process gradient.

ZeRO-0 clipping is ours: DeepSpeed's fp32 stage-0 clip_grad_norm_ averages the per-rank
norms over ranks ("to consider MoE params"), which is not the global norm when ranks hold
different experts; clipping before engine.step() with the true norm keeps parity.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist

from moe_dist.config import Config
from moe_dist.errors import ConfigError, LaunchError
from moe_dist.moe.experts import is_expert_param
from moe_dist.parallel.expert_parallel import ExpertParallel
from moe_dist.parallel.grads import clip_grad_norm, reduce_expert_gradients
from moe_dist.parallel.layout import ParallelLayout
from moe_dist.trainer import sharded_state
from moe_dist.trainer.backends import build_adamw, build_scheduler, param_groups

# DeepSpeed config keys that this YAML decides; a user JSON may repeat them only with the same value.
_OWNED_HINT = {
    "train_batch_size": "train.micro_batch_size x grad_accum_steps x world size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer.device": "deepspeed.offload_optimizer",
    "bf16.enabled": "train.dtype",
    "fp16.enabled": "train.dtype (fp16 is not supported; use bf16)",
    "optimizer": "optim.* (moe_dist builds the AdamW)",
    "scheduler": "optim.* (moe_dist steps the warmup + cosine schedule)",
}


def generate_config(cfg: Config, world_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config implied by our YAML (one source of truth)."""
    t, d = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        # Our client torch.optim.AdamW: ZeRO may shard it, and may offload it without
        # DeepSpeed's compiled CPUAdam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def merge_user_config(generated: dict[str, Any], path: str) -> dict[str, Any]:
    """Merge a user's DeepSpeed JSON into the generated config. Keys we do not decide pass
    through; a key we decide must agree, else a ConfigError names the file and both keys."""
    try:
        with open(path) as f:
            user = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config: file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {e}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"deepspeed.config: {path} must hold a JSON object")
    ours = _flatten(generated)
    for key, value in _flatten(user).items():
        if key in ("optimizer", "scheduler") or key.startswith(("optimizer.", "scheduler.")):
            raise ConfigError(f"{path}: '{key.split('.')[0]}' contradicts {_OWNED_HINT[key.split('.')[0]]}; remove it")
        if key == "fp16.enabled" and value:
            raise ConfigError(f"{path}: fp16.enabled=true is not supported; set train.dtype=bf16")
        if key in _OWNED_HINT and key in ours and ours[key] != value:
            raise ConfigError(
                f"{path}: {key}={value!r} contradicts {_OWNED_HINT[key]} (which gives {ours[key]!r}); "
                "remove it from the JSON or change the YAML"
            )
        if key == "zero_optimization.offload_optimizer.device" and key not in ours and value != "none":
            raise ConfigError(
                f"{path}: {key}={value!r} contradicts deepspeed.offload_optimizer=false; set it in the YAML instead"
            )
    return _deep_merge(generated, user)


def _group_name(layout: ParallelLayout) -> str:
    return f"ep_size_{layout.ep}"


def _register_groups(layout: ParallelLayout) -> str:
    """Put our ep and expert-data-parallel groups into DeepSpeed's group dicts. DeepSpeed's
    groups may never be None (None means the world group there), so a size-1 group is made
    a real one-rank group; new_group is collective, so every rank creates every one."""
    from deepspeed.utils import groups

    def group_of(size: int, ours) -> Any:
        if size > 1:
            return ours
        mine = None
        for r in range(layout.world_size):
            g = dist.new_group([r])
            if r == layout.rank:
                mine = g
        return mine

    name = _group_name(layout)
    groups._EXPERT_PARALLEL_GROUP[name] = group_of(layout.ep, layout.ep_group)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = group_of(layout.dp, layout.edp_group)
    first = layout.rank - layout.ep_rank
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(range(first, first + layout.ep))
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(range(layout.ep_rank, layout.world_size, layout.ep))
    return name


def _expert_groups_marker(num_experts: int, num_local: int, ep: int, name: str) -> torch.nn.Module:
    from deepspeed.moe.layer import MoE

    class _ExpertGroups(MoE):
        """Owns no parameters. Its class tells the engine the model has MoE layers; its
        set_deepspeed_parallelism (called by the engine) finds our groups registered."""

        def __init__(self):
            torch.nn.Module.__init__(self)  # not MoE.__init__: no DeepSpeed gate or experts
            self.num_experts, self.ep_size, self.expert_group_name = num_experts, ep, name
            self.num_local_experts = num_local  # this rank's, of an uneven placement too

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            from deepspeed.utils import groups

            assert self.expert_group_name in groups._get_expert_parallel_group_dict()

        def forward(self, *args, **kwargs):
            raise RuntimeError("_ExpertGroups is a marker and is never called")

    return _ExpertGroups()


def _hide_expert_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Detach every module that owns expert parameters from the module tree (its parent keeps
    it as a plain attribute, so forward is unchanged). Returns them by qualified name."""
    hidden = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            own = list(child.parameters(recurse=False))
            if own and any(is_expert_param(p) for p in own):
                if not all(is_expert_param(p) for p in child.parameters()):
                    raise ConfigError(f"{parent_name}.{child_name} mixes expert and dense parameters")
                del parent._modules[child_name]
                object.__setattr__(parent, child_name, child)
                hidden[f"{parent_name}.{child_name}".lstrip(".")] = child
    return hidden


def skip_cpu_shm_comm_build() -> None:
    """Mark DeepSpeed's CPU shared-memory all-reduce op unavailable, so its comm backend
    does not JIT-compile it (g++ and ninja; ~70 s cold on the 2-core CI machine, once per
    TORCH_EXTENSIONS_DIR) when deepspeed.initialize starts it. The op serves only
    inference_all_reduce, which training never calls; our collectives go through
    torch.distributed either way. deepspeed.ops keeps this dict so that edits persist."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def deepspeed_config(cfg: Config, world_size: int, bf16: bool) -> dict[str, Any]:
    """The config handed to deepspeed.initialize, checked before any data or model work."""
    if cfg.deepspeed.zero_stage == 0 and bf16:
        # Stage 0 + bf16 wraps our AdamW in DeepSpeed's FP16_UnfusedOptimizer, which has no
        # per-parameter (hp-param) state to save: the first checkpoint would crash after
        # training. Measured too: 2 ranks, ep=2, 10 steps: ZeRO-1 bf16 stays within 6e-5 of
        # the fp32 torch-backend losses, stage 0 bf16 drifts to 4e-3.
        raise ConfigError(
            "deepspeed.zero_stage=0 with bf16 is not supported: DeepSpeed's stage-0 bf16 optimizer "
            "cannot be checkpointed per parameter and does not reproduce the reference gradients "
            "with expert parameters; use deepspeed.zero_stage>=1, train.dtype=fp32, or train.backend=torch"
        )
    ds_cfg = generate_config(cfg, world_size, bf16)
    if cfg.deepspeed.config:
        ds_cfg = merge_user_config(ds_cfg, cfg.deepspeed.config)
    if cfg.deepspeed.zero_stage == 0 and not bf16:
        ds_cfg["gradient_clipping"] = 0.0  # we clip with the true global norm (module docstring)
    return ds_cfg


class DeepSpeedBackend:
    def __init__(
        self, model: torch.nn.Module, cfg: Config, layout: ParallelLayout, device: torch.device, ds_cfg: dict[str, Any]
    ):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        os.environ.setdefault("LOCAL_RANK", str(layout.local_rank))  # DeepSpeed asserts it is set
        try:
            import deepspeed
        except ImportError as e:
            raise LaunchError(f"train.backend=deepspeed but DeepSpeed cannot be imported: {e}") from None
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        if device.type == "cpu":
            skip_cpu_shm_comm_build()
        self.model, self.cfg, self.layout = model, cfg, layout
        self.stage = cfg.deepspeed.zero_stage
        if not dist.is_initialized():  # one process: DeepSpeed still wants a process group
            from moe_dist.parallel.layout import init_single_process_group

            init_single_process_group(device.type, cfg.parallel.timeout_s)
        bf16 = bool(ds_cfg["bf16"]["enabled"])
        self.fp32_stage0 = self.stage == 0 and not bf16
        self.ds_config = ds_cfg
        experts = [p for p in model.parameters() if is_expert_param(p)]
        self.zero3_experts = None
        wd = cfg.optim.weight_decay
        if experts and self.stage == 3:
            hidden = _hide_expert_modules(model)
            named = [(f"{m}.{n}", p) for m, mod in hidden.items() for n, p in mod.named_parameters()]
            self.zero3_experts = _Zero3Experts(hidden, named, cfg, layout)
        groups = param_groups(model.named_parameters(), wd)
        if experts and self.stage < 3:
            name = _register_groups(layout)
            for p in experts:
                p.allreduce, p.group_name = False, name
            lo, hi = ExpertParallel(layout).local_range(cfg.moe.num_experts)
            model.add_module("_ds_expert_groups", _expert_groups_marker(cfg.moe.num_experts, hi - lo, layout.ep, name))
            groups = split_params_into_different_moe_groups_for_optimizer(groups)
        groups = [g for g in groups if g["params"]]
        client = build_adamw(groups, cfg)
        self.scheduler = build_scheduler(client, cfg)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=client, config=ds_cfg, dist_init_required=False
        )
        self.module = self.engine
        if self.zero3_experts is not None:
            self.zero3_experts.attach(self.optimizer)
        self.summary = self._summary(experts, bf16)

    def _summary(self, experts: list[torch.Tensor], bf16: bool) -> str:
        """One line for the log: what ZeRO holds on this rank, as the engine reports it (not
        the config that asked for it)."""
        n_expert = sum(p.numel() for p in experts)
        stage = self.engine.zero_optimization_stage()
        text = f"deepspeed: ZeRO stage {stage}, {'bf16' if bf16 else 'fp32'}, world {self.layout.world_size}"
        if self.engine.zero_offload_optimizer():
            text += ", optimizer state on the CPU"
        # ZeRO-1/2: this rank's slice of the fp32 master weights (and so of AdamW's moments).
        master = getattr(self.optimizer, "single_partition_of_fp32_groups", None)
        if stage in (1, 2) and master is not None:
            text += f"; fp32 master partition of {sum(t.numel() for t in master)} elements on rank {self.layout.rank}"
        if stage == 3:
            dense = list(self.model.parameters())
            local = sum(p.ds_tensor.numel() for p in dense)
            total = sum(p.ds_numel for p in dense)
            text += f"; dense parameters partitioned: {local} of {total} elements on rank {self.layout.rank}"
        if experts:
            where = "outside ZeRO, trained by their own AdamW" if stage == 3 else "DeepSpeed expert parameters"
            text += f"; expert shard of {n_expert} elements (ep={self.layout.ep}, {where})"
        return text

    def micro_batch(self, last: bool):
        return nullcontext()  # the engine tracks its own micro-steps

    def backward(self, loss: torch.Tensor) -> None:
        # The engine scales by 1/gradient_accumulation_steps and reduces at the boundary.
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed counts micro-steps here; no optimizer step

    def step(self) -> torch.Tensor:
        assert self.engine.is_gradient_accumulation_boundary()
        norm = None
        if self.fp32_stage0:
            norm = clip_grad_norm(self.model, self.layout, self.cfg.optim.grad_clip)
        if self.zero3_experts is not None:
            self.zero3_experts.before_step()
        self.engine.step()
        if self.zero3_experts is not None:
            self.zero3_experts.after_step(self.engine.get_global_grad_norm())
        self.scheduler.step()
        if norm is None:
            norm = torch.tensor(float(self.engine.get_global_grad_norm()))
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # -- state ---------------------------------------------------------------------------

    # Checkpoints (trainer/sharded_state.py): experts by global id, dense state per parameter,
    # at every ZeRO stage, so they load under any layout.

    @property
    def extra_schedulers(self) -> list:
        return [self.zero3_experts.scheduler] if self.zero3_experts is not None else []

    def _client_adamw(self) -> bool:
        """ZeRO-0 fp32: the engine steps our AdamW itself (no ZeRO wrapper)."""
        return isinstance(self.optimizer, torch.optim.Optimizer) and not hasattr(self.optimizer, "optimizer")

    def save_sharded(self, path: str, async_group=None):
        if self._client_adamw():
            return sharded_state.save(path, self.model, self.optimizer, async_group)
        return sharded_state.save_deepspeed(path, self.model, self.optimizer, self.zero3_experts, self.stage == 3, async_group)

    def load_sharded(self, path: str) -> None:
        if self._client_adamw():
            return sharded_state.load(path, self.model, self.optimizer)
        sharded_state.load_deepspeed(path, self.model, self.optimizer, self.zero3_experts, self.stage == 3)


class _Zero3Experts:
    """Expert parameters under ZeRO-3: outside the engine, trained by their own AdamW."""

    def __init__(self, hidden: dict[str, torch.nn.Module], named, cfg: Config, layout: ParallelLayout):
        self.hidden, self.cfg, self.layout = hidden, cfg, layout
        self.params = [p for _, p in named]
        self.optimizer = build_adamw(param_groups(named, cfg.optim.weight_decay), cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self._expert_norm = None

    def named_params(self):
        """(name in the one-process model, parameter) of every hidden expert tensor."""
        for m, mod in self.hidden.items():
            for n, p in mod.named_parameters():
                yield f"{m}.{n}", p

    def attach(self, zero3_optimizer) -> None:
        """Make the stage-3 optimizer's gradient norm the global one: its norm groups (dense,
        already reduced over the world) plus one entry for the expert norm."""
        original = zero3_optimizer._get_norm_groups

        def norm_groups_with_experts():
            groups = original()
            if self._expert_norm is not None:
                groups = list(groups) + [self._expert_norm.to(groups[0].device, groups[0].dtype)]
            return groups

        zero3_optimizer._get_norm_groups = norm_groups_with_experts

    def before_step(self) -> None:
        reduce_expert_gradients(self.params, self.layout)
        sq = torch.stack([p.grad.float().square().sum() for p in self.params]).sum()
        if self.layout.ep > 1:
            dist.all_reduce(sq, group=self.layout.ep_group)
        self._expert_norm = sq.sqrt()

    def after_step(self, global_norm: float) -> None:
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            coef = min(1.0, clip / (float(global_norm) + 1e-6))
            for p in self.params:
                p.grad.mul_(coef)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

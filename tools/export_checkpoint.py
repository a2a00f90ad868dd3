"""Consolidate a sharded (format 3) checkpoint into one safetensors file plus its config.

    python tools/export_checkpoint.py runs/quickstart/checkpoints/step_00000300 exported/

writes exported/model.safetensors (every parameter and buffer under the names of a
one-process model: expert rows stacked back into [E, ...] by global id) and
exported/config.yaml. Load it in one process with:

    cfg = load_config("exported/config.yaml"); weights = safetensors.torch.load_file(...)
    model = LM(cfg, weights["embed.weight"].shape[0], ParallelLayout.single())
    model.load_state_dict(weights)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile

import torch

from moe_dist.errors import CheckpointError
from moe_dist.trainer.checkpoint import CONFIG, verify_checkpoint

_EXPERT_KEY = re.compile(r"^(.*)@(\d+)$")


def consolidate(path: str) -> dict[str, torch.Tensor]:
    """The one-process model state dict of a verified format-3 checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    meta = verify_checkpoint(path)
    if meta["format"] != 3:
        raise CheckpointError(f"{path}: format {meta['format']} (an earlier version's) cannot be exported; format 3 only")
    with tempfile.TemporaryDirectory() as tmp:
        flat_path = os.path.join(tmp, "flat.pt")
        dcp_to_torch_save(path, flat_path)  # the whole DCP state dict, in this one process
        flat = torch.load(flat_path, weights_only=False)
    model = flat["model"] if isinstance(flat.get("model"), dict) else {
        k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")
    }
    out: dict[str, torch.Tensor] = {}
    rows: dict[str, dict[int, torch.Tensor]] = {}
    for key, t in model.items():
        m = _EXPERT_KEY.match(key)
        if m:
            rows.setdefault(m.group(1), {})[int(m.group(2))] = t
        else:
            out[key] = t.contiguous()
    for name, by_id in rows.items():
        if sorted(by_id) != list(range(len(by_id))):
            raise CheckpointError(f"{path}: experts of {name} are not 0..{len(by_id) - 1}: {sorted(by_id)}")
        out[name] = torch.stack([by_id[g] for g in range(len(by_id))])
    if "readout.weight" not in out and "embed.weight" in out:
        # Tied embeddings: the DeepSpeed backends save the shared parameter once.
        out["readout.weight"] = out["embed.weight"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="a checkpoint directory (checkpoints/step_NNNNNNNN)")
    p.add_argument("out", help="output directory (model.safetensors, config.yaml)")
    args = p.parse_args(argv)
    from safetensors.torch import save_file

    try:
        weights = consolidate(args.path)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    # safetensors stores each tensor once: tied weights (embed/readout) are separate copies here.
    save_file({k: v.clone() for k, v in weights.items()}, os.path.join(args.out, "model.safetensors"))
    shutil.copy(os.path.join(args.path, CONFIG), os.path.join(args.out, CONFIG))
    n = sum(v.numel() for v in weights.values())
    print(f"wrote {os.path.join(args.out, 'model.safetensors')}: {len(weights)} tensors, {n:,} elements")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Print a checkpoint's step, layout, files and tensors, and verify every file's checksum.

    python tools/inspect_checkpoint.py runs/quickstart/checkpoints/step_00000300 [--tensors]

Exit status 0 when every file matches meta.json, 2 (with the file named) otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys

from moe_dist.errors import CheckpointError
from moe_dist.trainer.checkpoint import verify_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="a checkpoint directory (checkpoints/step_NNNNNNNN)")
    p.add_argument("--tensors", action="store_true", help="list every tensor with its global shape")
    args = p.parse_args(argv)
    try:
        meta = verify_checkpoint(args.path)  # sha256 of every file
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"checkpoint {os.path.abspath(args.path)}")
    print(f"  format {meta['format']}, step {meta['step']}, code version {meta.get('code_version', '?')}")
    print(f"  layout: world {meta['world_size']}, ep {meta['ep']}, dp {meta.get('dp', meta['world_size'] // meta['ep'])}")
    if "global_batch" in meta:
        print(f"  global batch {meta['global_batch']} sequences, data.rank_split={meta['rank_split']}")
    for name, placement in sorted(meta.get("experts", {}).items()):
        total = sum(rows for _, rows in placement)
        print(f"  experts {name}: {total} over ep={len(placement)}: " + ", ".join(f"[{a},{a + n})" for a, n in placement))
    total_bytes = sum(f["bytes"] for f in meta["files"].values())
    print(f"  {len(meta['files'])} files, {total_bytes / 2**20:.2f} MiB, all sha256 verified")
    if meta["format"] == 3:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        md = FileSystemReader(args.path).read_metadata().state_dict_metadata
        tensors = {k: v for k, v in md.items() if isinstance(v, TensorStorageMetadata)}
        n = sum(v.size.numel() for k, v in tensors.items() if k.startswith("model."))
        print(f"  {len(tensors)} tensors; model elements {n:,} (experts counted once, by global id)")
        if args.tensors:
            for k, v in sorted(tensors.items()):
                print(f"    {k:70s} {tuple(v.size)} {str(v.properties.dtype).replace('torch.', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

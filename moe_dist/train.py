"""Entry point: python -m moe_dist.train --config configs/quickstart.yaml [section.key=value ...]

Parses the config, builds the trainer, trains, closes. User errors (config, data,
checkpoint, launch environment) print one `error: ...` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from moe_dist.errors import MoeDistError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moe_dist.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML config file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=50")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from moe_dist.config import load_config
        from moe_dist.trainer.trainer import Trainer

        from moe_dist.parallel.layout import destroy

        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg)
        try:
            trainer.fit()
        finally:
            trainer.close()
            destroy(trainer.layout)
    except MoeDistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not trainer.is_main:
        return 0
    run = trainer.run_dir
    print(f"done: step {trainer.step}")
    print(f"  checkpoints: {os.path.join(run, 'checkpoints')}")
    print(f"  metrics:     {os.path.join(run, 'metrics.jsonl')}")
    print(f"  tensorboard: tensorboard --logdir {os.path.join(run, 'tb')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

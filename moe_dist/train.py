"""Entry point: python -m moe_dist.train --config configs/quickstart.yaml [section.key=value ...]

Parses the config, builds the trainer, trains, closes. User errors (config, data,
checkpoint, launch environment) print one `error: ...` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from moe_dist.errors import MoeDistError

# A distributed trainer is kept alive until os._exit (below). Freed at main()'s return,
# DDP's Reducer was the last owner of the default gloo group (destroy_process_group had
# dropped the registry's reference), and ~ProcessGroupGloo joins its worker thread while
# holding the GIL; a worker still releasing a finished all-reduce's tensors needs the GIL:
# deadlock (py-spy, dp2 x ep2 on 4 processes: 2 of 4 runs hung after "done").
_KEEP_ALIVE: list = []


def _is_peer_failure(e: RuntimeError) -> bool:
    """A collective that failed because another rank died or hangs (gloo and nccl wording)."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistBackendError", ())):
        return True
    text = str(e).lower()
    return any(s in text for s in ("timed out", "timeout", "connection closed", "connection reset", "peer", "broken pipe"))


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
        except RuntimeError as e:
            if not (trainer.layout.distributed and _is_peer_failure(e)):
                raise
            # gloo/nccl report a dead peer ("Connection closed by peer") or a hung one (a
            # timeout after parallel.timeout_s) as RuntimeError/DistBackendError.
            where, bound = f"at step {trainer.step + 1}", f"parallel.timeout_s={cfg.parallel.timeout_s:g}"
            if trainer.saving is not None:  # rank 0's checksums are waited for longer
                where = f"in the save of step {trainer.saving}"
                bound += f", or parallel.wait_timeout_s={cfg.parallel.wait_timeout_s:g} for rank 0's checksums"
            print(
                f"error: rank {trainer.layout.rank}: a collective failed {where}; another "
                f"rank died or hangs (waits are bounded by {bound}): "
                f"{str(e).splitlines()[0][:300]}",
                file=sys.stderr,
                flush=True,
            )
            trainer.close()  # flush metrics.jsonl and TensorBoard
            sys.stdout.flush()
            os._exit(3)  # no process-group teardown: it cannot shut down cleanly without its peers
        finally:
            trainer.close()
            destroy(trainer.layout)
            if trainer.layout.distributed:
                _KEEP_ALIVE.append(trainer)
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
    try:
        rc = main()
    except SystemExit as e:  # argparse's usage errors
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:  # a crash: report it, then the same os._exit (see _KEEP_ALIVE)
        traceback.print_exc()
        rc = 1
    # A finished run ends here, without the interpreter teardown: DeepSpeed ZeRO-1/2 on CPU
    # (../shared/FACTS.md) and FSDP2 on gloo (measured: 2 of 8 runs) sometimes abort in it
    # ("terminate called without an active exception", exit -6) after all work is done.
    # Metrics, TensorBoard and checkpoints are closed and flushed by now (docs/backends.md).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)

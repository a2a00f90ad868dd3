"""Blocking time of Trainer.save() in one process, synchronous against checkpoint.async_save.

    python tools/bench_checkpoint_save.py [CONFIG]   (default configs/quickstart.yaml)

Each mode is built twice, alternating (sync, async, sync, async), and saves 5 times. The
previous asynchronous write is finished, untimed, before each timed save(): that write
overlaps with training steps in a real run.
"""
import argparse
import statistics
import tempfile
import time

from moe_dist.config import load_config
from moe_dist.trainer.trainer import Trainer

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("config", nargs="?", default="configs/quickstart.yaml")
config = p.parse_args().config
res: dict[str, list[float]] = {}
with tempfile.TemporaryDirectory() as root:
    for i, mode in enumerate(("false", "true", "false", "true")):
        cfg = load_config(config, [  # each build its own fresh run
            f"run.dir={root}/{mode}{i}", "train.resume=none", "train.max_steps=1", "logging.progress=false",
            "checkpoint.every=0",
            "checkpoint.save_final=false", "train.eval_every=0", f"checkpoint.async_save={mode}",
            "checkpoint.keep_last=2",
        ])
        t = Trainer(cfg, log=lambda *_: None)
        t.fit()
        times = []
        for _ in range(5):
            t.step += 1
            t.finish_pending_save()  # untimed: the previous write, done while training would run
            t0 = time.perf_counter()
            t.save()
            times.append(time.perf_counter() - t0)
        t.finish_pending_save()
        t.close()
        res.setdefault(mode, []).extend(times)
        print(f"async_save={mode}: " + " ".join(f"{x * 1000:.0f}" for x in times) + " ms", flush=True)
for m, v in res.items():
    print(f"async_save={m}: median blocking save() {statistics.median(v) * 1000:.0f} ms over {len(v)} saves")

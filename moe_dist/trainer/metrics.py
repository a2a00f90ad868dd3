"""metrics.jsonl (one JSON object per logged step or evaluation) and TensorBoard events.

On resume from step s, rows after s (written by the run that crashed after its last
checkpoint) are removed from metrics.jsonl and TensorBoard is told to purge events after s,
so the files read as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np


class MetricsLogger:
    def __init__(self, run_dir: str, tensorboard: bool, resume_step: Optional[int]):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb_dir = os.path.join(run_dir, "tb")
        if resume_step is None:
            open(self.path, "w").close()
        else:
            self._truncate_after(resume_step)
        self._file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(self.tb_dir, purge_step=purge)

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                if line.strip() and json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        with open(self.path, "w") as f:
            f.writelines(kept)

    def log(self, row: dict[str, Any]) -> None:
        """Append a row (must hold 'step') and mirror its numbers as TensorBoard scalars."""
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.tb is not None:
            step = row["step"]
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    group = "eval" if key.startswith("val_") else "train"
                    self.tb.add_scalar(f"{group}/{key}", value, step)

    def log_moe(self, step: int, per_call: list[tuple[str, list[int], float]]) -> None:
        """Per routed call (label like L03_ffn or L03_attn_src): tokens-per-expert histogram,
        dropped fraction and max/mean load."""
        if self.tb is None:
            return
        for label, counts, dropped in per_call:
            counts_E = np.asarray(counts, dtype=np.float64)
            # Histogram over expert ids, weighted by tokens: bucket e holds expert e's count.
            self.tb.add_histogram_raw(
                f"moe/{label}/tokens_per_expert",
                min=0.0,
                max=float(len(counts_E) - 1),
                num=int(counts_E.sum()),
                sum=float((np.arange(len(counts_E)) * counts_E).sum()),
                sum_squares=float((np.arange(len(counts_E)) ** 2 * counts_E).sum()),
                bucket_limits=[e + 0.5 for e in range(len(counts_E))],
                bucket_counts=counts_E.tolist(),
                global_step=step,
            )
            self.tb.add_scalar(f"moe/{label}/dropped_frac", dropped, step)
            mean = counts_E.mean()
            self.tb.add_scalar(f"moe/{label}/max_over_mean", float(counts_E.max() / mean) if mean > 0 else 0.0, step)

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()

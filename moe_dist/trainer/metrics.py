"""metrics.jsonl (one JSON object per logged step or evaluation) and TensorBoard events.

On resume from step s, rows after s (written by the run that crashed after its last
checkpoint) are removed from metrics.jsonl and TensorBoard is told to purge events after s,
so the files read as one uninterrupted run. A resume by path that rolls a run back
(keep_dropped) keeps the abandoned branch's rows in metrics.jsonl.abandoned. A fresh start
in a used run directory empties metrics.jsonl and removes the old TensorBoard event files.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from moe_dist.files import aside_name

# Row fields measured with the wall clock: the only ones a resumed run does not repeat bit for bit.
WALL_CLOCK_FIELDS = frozenset({"tokens_per_s", "window_tokens_per_s", "model_tflops", "mfu"})
# Window fields that log_traffic already writes as perf/* scalars: not mirrored under train/.
_WRITTEN_AS_PERF = frozenset({"window_tokens_per_s", "model_tflops", "mfu"})


class MetricsLogger:
    def __init__(self, run_dir: str, tensorboard: bool, resume_step: Optional[int], keep_dropped: bool = False):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb_dir = os.path.join(run_dir, "tb")
        self.unreadable_rows = 0
        """Rows dropped on resume because they were not JSON (a crash mid-append)."""
        self.dropped_to: Optional[str] = None
        """Where the rows after the resumed step went (keep_dropped), if there were any."""
        if resume_step is None:  # a fresh run: the run directory's logs start over
            open(self.path, "w").close()
            if os.path.isdir(self.tb_dir):  # or TensorBoard would draw both runs on one axis
                for name in os.listdir(self.tb_dir):
                    if name.startswith("events.out.tfevents."):
                        os.remove(os.path.join(self.tb_dir, name))
        else:
            self._truncate_after(resume_step, keep_dropped)
        self._file = open(self.path, "a")
        self.tb = None
        self._layout_written = False
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(self.tb_dir, purge_step=purge)

    def _truncate_after(self, step: int, keep_dropped: bool) -> None:
        if not os.path.exists(self.path):
            return
        kept, dropped = [], []
        with open(self.path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row_step = json.loads(line)["step"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    # A partial row from a crash (or full disk) during the append: it comes
                    # after the checkpoint by construction, so it goes like the other rows
                    # after it. Counted, and the trainer warns.
                    self.unreadable_rows += 1
                    continue
                (kept if row_step <= step else dropped).append(line if line.endswith("\n") else line + "\n")
        if dropped and keep_dropped:
            aside = aside_name(self.path, "abandoned")
            with open(aside, "w") as f:
                f.writelines(dropped)
            self.dropped_to = aside
        with open(self.path, "w") as f:
            f.writelines(kept)

    def log(self, row: dict[str, Any]) -> None:
        """Append a row (must hold 'step') and mirror its numbers as TensorBoard scalars."""
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.tb is not None:
            step = row["step"]
            for key, value in row.items():
                if key != "step" and key not in _WRITTEN_AS_PERF and isinstance(value, (int, float)):
                    group = "eval" if key.startswith("val_") else "train"
                    self.tb.add_scalar(f"{group}/{key}", value, step)

    def log_traffic(self, window) -> None:
        """Expert-traffic window (trainer/traffic.py) as TensorBoard scalars, histograms and
        images; the first window also writes the "Experts" custom-scalars layout."""
        if self.tb is None:
            return
        from moe_dist.trainer import traffic_board

        if not self._layout_written:
            self.tb.add_custom_scalars(traffic_board.experts_layout(window))
            self._layout_written = True
        traffic_board.log_window(self.tb, window)
        self.tb.flush()

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()

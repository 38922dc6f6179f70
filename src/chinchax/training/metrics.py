"""What a run shows and records: metrics.jsonl, TensorBoard events, a progress bar, summary.json.

Only the writing process (`distributed.is_writer`, process 0) shows or records anything.
"""

from __future__ import annotations

import json
import pathlib
import sys

import tensorboardX
import tqdm

from chinchax import atomic
from chinchax.parallel import distributed


class RunLog:
    """Appends one JSON object per log step to metrics.jsonl, mirrors it to TensorBoard and the bar.

    On resume, records past the restored step (written after the checkpoint the run resumes from) are
    dropped first, so metrics.jsonl reads as one uninterrupted run. In the other processes of a multi-process
    run every method does nothing.
    """

    def __init__(self, workdir: pathlib.Path, total_steps: int, start_step: int, show_progress: bool = True):
        self.workdir = workdir
        self.path = workdir / "metrics.jsonl"
        self.writer = distributed.is_writer()
        self.bar = tqdm.tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            dynamic_ncols=True,
            disable=not (show_progress and self.writer),
        )
        if self.writer:
            self._keep_records_up_to(start_step)
            self.file = self.path.open("a")
            self.tensorboard = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))

    def _keep_records_up_to(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        atomic.write_text(self.path, "".join(line + "\n" for line in kept))

    def record(self, record: dict) -> None:
        """One log step: {'step', 'tokens', 'loss', ...} to the file, TensorBoard and the bar's postfix."""
        if not self.writer:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, record["step"])
        postfix = {"loss": f"{record['loss']:.3f}"}
        if "tokens_per_second" in record:
            postfix["tok/s"] = f"{record['tokens_per_second']:.3g}"
            postfix["MFU"] = f"{record['mfu']:.1%}"
        if "density" in record:  # a sparse run: the kept fraction of the prunable weights
            postfix["density"] = f"{record['density']:.3f}"
        self.bar.set_postfix(postfix, refresh=False)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def note(self, text: str) -> None:
        """A line printed above the bar (evaluations, checkpoints, warnings)."""
        if self.writer:
            self.bar.write(text, file=sys.stderr)

    def write_summary(self, summary: dict) -> None:
        """workdir/summary.json, written atomically: the run is finished."""
        if self.writer:
            atomic.write_json(self.workdir / "summary.json", summary)

    def close(self) -> None:
        self.bar.close()
        if self.writer:
            self.file.close()
            self.tensorboard.close()

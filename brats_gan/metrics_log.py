"""The run's own record, one row per step: ``RUN/metrics.csv`` and TensorBoard, written by rank 0."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.csv"
METRICS = ("step", "epoch", "critic_loss", "generator_loss", "wasserstein", "gradient_penalty",
           "step_s", "images_per_s", "swd", "time")


class MetricsLog:
    """``RUN/metrics.csv`` and TensorBoard (``RUN/tensorboard``), rank 0 only, one row per step.

    ``critic_loss``, ``wasserstein`` (the critic's estimate ``D(real) - D(fake)``) and
    ``gradient_penalty`` are means over the step's ``n_critic`` critic updates; every value is the
    mean over ranks. ``images_per_s`` counts the real images all ranks' critics consumed per second
    of the step (``micro-batch x ranks x n_critic / step_s``); the trainer reads the figures back every
    ``--log-every`` steps, so ``step_s`` is the mean over the steps of that read.

    On resume both drop what a killed run wrote after the checkpoint it resumes from, so the logs
    read as one uninterrupted run.
    """

    def __init__(self, run_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        path = run_dir / METRICS_FILE
        kept: list[dict[str, str]] = []
        if path.exists():
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= start_step]
        self.file = open(path, "w", newline="", buffering=1)  # noqa: SIM115  (open for the whole run)
        self.csv = csv.DictWriter(self.file, fieldnames=METRICS)
        self.csv.writeheader()
        self.csv.writerows(kept)
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict[str, Any]) -> None:
        self.csv.writerow(row)
        step = row["step"]
        for key, tag in (("critic_loss", "loss/critic"), ("generator_loss", "loss/generator"),
                         ("wasserstein", "wasserstein_estimate"), ("gradient_penalty", "loss/gradient_penalty"),
                         ("images_per_s", "throughput/images_per_s"), ("step_s", "throughput/step_s")):
            self.tb.add_scalar(tag, row[key], step)
        if row.get("swd") is not None:
            self.tb.add_scalar("quality/swd", row["swd"], step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()

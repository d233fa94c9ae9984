"""``benchmarks/end_to_end.py`` for a few seconds, so that the whole job as a user runs it cannot rot:
phantoms, two preprocessing runs, training under the DeepSpeed launcher stopped by a signal,
generation from ``best`` and ``latest``, evaluation against held-out subjects, the baseline. Marked ``benchmark``:
outside the default run (``python -m pytest -m benchmark``), which it would take past 10 minutes on 2 cores."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shm_buffers
from training_runs import REPO


@pytest.mark.benchmark  # 37-40 s on the 2-core VM: outside the default run, `python -m pytest -m benchmark`
def test_the_whole_job_runs_time_boxed_and_reports_one_json_line(tmp_path: Path, deepspeed_op: Path) -> None:
    work = tmp_path / "work"
    leftovers_before = shm_buffers()
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "end_to_end.py"), "--preset", "tiny", "--seconds", "4",
         "--checkpoint-every", "3", "--phantoms", "6", "--train-subjects", "1-4", "--heldout-subjects", "5-6",
         "--slices", "16", "--phantom-shape", "96", "96", "60", "--num", "32", "--baseline-steps", "3",
         "--workers", "1", "--work", str(work)],
        capture_output=True, text=True, timeout=600, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "one JSON line on stdout, progress on stderr"
    summary = json.loads(lines[0])
    assert summary["device"] == "cpu" and summary["dtype"] == "fp32"
    (tiny,) = summary["presets"]
    training = tiny["training"]
    assert training["stopped_by"] in ("SIGTERM", "SIGKILL") and training["steps"] >= 3
    for key in ("step_images_per_s", "end_to_end_images_per_s", "train_step_images_per_s"):
        assert training[key] > 0, key
    assert 0 < training["end_to_end_share_of_train_step"] <= 2 * training["step_share_of_train_step"]
    assert [step for step, _ in training["swd_by_step"]] == list(range(3, training["steps"] + 1, 3))
    launched = re.search(r"--master_port[= ](\d+)", (work / "train-tiny.log").read_text())
    assert launched, "the launcher's command line names its master port"
    assert not shm_buffers(int(launched[1])), "the killed run's DeepSpeed buffers are swept"
    assert shm_buffers() <= leftovers_before, "the baseline's one-process run freed its buffer"
    for which in ("best", "latest"):
        figures = tiny["checkpoints"][which]
        assert figures["step"] % 3 == 0 and Path(figures["grid"]).stat().st_size > 0
        for key in ("swd", "swd_floor", "checkerboard", "checkerboard_real", "ms_ssim_fake", "ms_ssim_real",
                    "memorisation_share"):
            assert figures[key] is not None and math.isfinite(figures[key]), (which, key)
        assert figures["swd_over_floor"] == pytest.approx(figures["swd"] / figures["swd_floor"], rel=1e-2)
    assert tiny["checkpoints"]["latest"]["step"] >= tiny["checkpoints"]["best"]["step"]
    assert all(Path(p).exists() for p in tiny["samples"]) and tiny["samples"]

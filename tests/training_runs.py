"""Launching real training runs from tests: the DeepSpeed command lines and what a finished run holds.

Shared by ``test_train.py`` (two ranks on one node) and ``test_multinode.py`` (two "nodes" on this
machine), which compare their runs with the same reference run (``uninterrupted`` in conftest.py).
"""

from __future__ import annotations

import csv
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--recipe", "poster", "--seed", "0", "--checkpoint-every", "3"]  # five critic steps a step
UNINTERRUPTED_STEPS = 12
LAUNCH_TIMEOUT = 300


def free_port() -> int:
    """A port free now: other suites may be running launchers on this machine too."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command() -> list[str]:
    exe = shutil.which("deepspeed")
    return [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]


def launcher(*args: str | Path, ranks: int = 2) -> list[str]:
    """``deepspeed --num_gpus N --master_port P --module brats_gan.train ARGS`` on a free port."""
    return [*deepspeed_command(), "--num_gpus", str(ranks), "--master_port", str(free_port()),
            "--module", "brats_gan.train", *map(str, args)]


def launch(*args: str | Path, ranks: int = 2) -> subprocess.CompletedProcess:
    proc = subprocess.run(launcher(*args, ranks=ranks), check=False, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT, cwd=REPO)
    proc.output = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    return proc


def metric_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def metric_steps(run: Path) -> list[int]:
    return [int(row["step"]) for row in metric_rows(run)]


def model_states(run: Path, step: int) -> dict[str, dict]:
    import torch  # here, not at the top: conftest.py imports this module for every test session

    from brats_gan.checkpoints import ENGINES, ema_weights_path, model_states_path

    states = {tag: torch.load(model_states_path(run, step, tag), weights_only=True) for tag in ENGINES}
    if ema_weights_path(run, step).exists():  # the averaged generator (on by default)
        states["generator_ema"] = torch.load(ema_weights_path(run, step), weights_only=True)
    return states


def assert_same_weights(run: Path, reference: Path, step: int) -> None:
    """The generator, the critic and the averaged generator of ``run`` at ``step`` hold the reference run's
    weights there, to 1e-6."""
    import torch

    got, expected = model_states(run, step), model_states(reference, step)
    assert got.keys() == expected.keys()
    for tag in expected:
        assert got[tag]["module"].keys() == expected[tag]["module"].keys(), tag
        for name, tensor in expected[tag]["module"].items():
            torch.testing.assert_close(got[tag]["module"][name], tensor, rtol=0, atol=1e-6,
                                       msg=f"{tag}.{name} at step {step} of {run} differs from {reference}")

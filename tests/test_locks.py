"""One writer at a time: a second preprocess, generate or training run on the same output is refused,
naming the first; a writer killed with SIGKILL leaves nothing stuck."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from brats_gan.locks import lock_path

HOLD = ("import sys, time\nfrom brats_gan.locks import exclusive\n"
        "with exclusive(sys.argv[1], 'another brats-gan run'):\n    print('held', flush=True)\n    time.sleep(600)\n")


def hold(target: Path) -> subprocess.Popen:
    """Another process that holds ``target``'s lock, as a running writer does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("command", ["preprocess", "train"])
def test_a_second_writer_is_refused_by_name_and_a_killed_one_blocks_nothing(
        command: str, phantoms_2020: Path, store_factory, tmp_path: Path) -> None:
    out = tmp_path / ("s.zarr" if command == "preprocess" else "run")
    argv = (["preprocess", phantoms_2020, "--out", out, "--slices", "4", "--size", "64", "--workers", "1",
             "--dashboard-port", "0", "--no-progress"] if command == "preprocess" else
            ["train", "--store", store_factory(subjects=2, slices=8), "--out", out, "--preset", "tiny",
             "--steps", "1", "--checkpoint-every", "1", "--sample-every", "0", "--swd-images", "0"])
    holder = hold(out)
    try:
        refused = run_cli(*argv, env={"OMP_NUM_THREADS": "1"})
        assert refused.returncode == 2, refused.output
        assert f"is being written by another process (another brats-gan run: pid {holder.pid}" in refused.stderr
        assert "Traceback" not in refused.output
    finally:
        holder.send_signal(signal.SIGKILL)  # the lock goes with it
        holder.wait()
    assert lock_path(out).exists(), "a killed holder cannot remove its file, and need not"
    run_cli(*argv, env={"OMP_NUM_THREADS": "1"}, ok=True)
    assert not lock_path(out).exists(), "a finished writer removes its lock file"
    assert (out / "zarr.json").exists() if command == "preprocess" else (out / "metrics.csv").exists()

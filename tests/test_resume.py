"""Resuming a run the ways a user gets it wrong: on another store, on its store changed in place, with a
file or a read-only folder as --out, or with every checkpoint damaged. Each is refused in one line that
names the flag and the path, before any rank starts, and leaves the run as it was; a moved copy of the
run's store is the same store and resumes. The runs are real one-process runs of one tiny step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli
from store_factory import write_store
from training_runs import metric_steps

from brats_gan.checkpoints import CHECKPOINTS, OPTIONS_FILE, read_latest
from brats_gan.commands import main as cli_main

ENV = {"OMP_NUM_THREADS": "1"}
ONE_STEP = ["--preset", "tiny", "--seed", "0", "--checkpoint-every", "1", "--sample-every", "0", "--swd-images", "0",
            "--num-workers", "0"]


def train(store: Path, out: Path) -> None:
    """One step of a new run on ``store``, checkpointed."""
    run_cli("train", "--store", store, "--out", out, "--steps", "1", *ONE_STEP, env=ENV, ok=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A one-channel store and a run of one step on it; read-only (tests resume copies of the run)."""
    base = tmp_path_factory.mktemp("resume")
    store = write_store(base / "flair.zarr", subjects=2, slices=8)
    train(store, base / "run")
    return store, base / "run"


@pytest.fixture
def run(trained: tuple[Path, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained[1], copy)
    return copy


def snapshot(folder: Path) -> dict[Path, tuple[int, bytes | None]]:
    """Every file and folder under ``folder``: modification time and content."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def refused(capsys: pytest.CaptureFixture, *argv: str | Path) -> str:
    """`brats-gan train ARGV` in this process exits 2 with one error line (returned) and no traceback."""
    assert cli_main(["train", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("brats-gan train: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_resume_on_another_store_is_refused_naming_both_and_the_run_is_untouched(
        trained: tuple[Path, Path], run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store, _ = trained
    other = write_store(tmp_path / "other.zarr", subjects=2, slices=8, seed=1)  # same shape and channel, other pixels
    before = snapshot(run)
    line = refused(capsys, "--out", run, "--resume", "--store", other, "--steps", "2")
    assert f"--store {other} is not the run's store {store}" in line and "other pixels" in line
    assert "leave --store out" in line and "start a new run in a new --out folder" in line
    assert snapshot(run) == before, "a refused resume must not rewrite training_options.json"

    # a run written before runs recorded their store's checksums: compared with the store at its path
    options = json.loads((run / OPTIONS_FILE).read_text())
    del options["store_identity"]
    (run / OPTIONS_FILE).write_text(json.dumps(options))
    assert f"--store {other} is not the run's store {store}" in refused(capsys, "--out", run, "--resume", "--store",
                                                                        other, "--steps", "2")
    options["data"]["store"] = str(tmp_path / "gone.zarr")  # ... and when that store is gone, it cannot tell
    (run / OPTIONS_FILE).write_text(json.dumps(options))
    line = refused(capsys, "--out", run, "--resume", "--store", store, "--steps", "2")
    assert f"put it back at {tmp_path / 'gone.zarr'}" in line
    assert json.loads((run / OPTIONS_FILE).read_text()) == options


def test_a_one_channel_run_is_refused_on_a_three_channel_store_given_or_in_its_place(
        trained: tuple[Path, Path], run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    three = write_store(tmp_path / "three.zarr", subjects=2, slices=8, channels=("flair", "t1ce", "t2"))
    before = snapshot(run)
    line = refused(capsys, "--out", run, "--resume", "--store", three, "--steps", "2")
    assert "the run trained on a store of 1 channel (flair)" in line and "holds 3 channels (flair, t1ce, t2)" in line
    assert snapshot(run) == before

    own_store, own_run = tmp_path / "mine.zarr", tmp_path / "mine"
    train(write_store(own_store, subjects=2, slices=8), own_run)
    shutil.rmtree(own_store)  # preprocessed again in its place, with three modalities
    write_store(own_store, subjects=2, slices=8, channels=("flair", "t1ce", "t2"))
    before = snapshot(own_run)
    line = refused(capsys, "--out", own_run, "--resume", "--steps", "2")
    assert f"the run's store {own_store} has changed since the run started" in line
    assert "1 channel (flair)" in line and "3 channels (flair, t1ce, t2)" in line
    assert snapshot(own_run) == before


def test_a_moved_copy_of_the_runs_store_resumes_and_is_recorded(trained: tuple[Path, Path], run: Path,
                                                                 tmp_path: Path) -> None:
    moved = tmp_path / "moved.zarr"
    shutil.copytree(trained[0], moved)
    proc = run_cli("train", "--out", run, "--resume", "--store", moved, "--steps", "2", *ONE_STEP, env=ENV, ok=True)
    assert f"--store {moved} holds the run's store {trained[0]}" in proc.stderr
    assert "resumed from step 1" in proc.stderr
    assert json.loads((run / OPTIONS_FILE).read_text())["data"]["store"] == str(moved)
    assert metric_steps(run) == [1, 2] and read_latest(run) == 2


def test_a_file_as_out_is_refused_by_name_and_kept(trained: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    store, _ = trained
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert f"--resume auto: --out {notes} is a file, not a training run folder" in refused(
        capsys, "--out", notes, "--resume", "auto", "--store", store, "--steps", "1")
    assert f"--resume: {notes} is a file, not a training run folder" in refused(capsys, "--out", notes, "--resume")
    assert f"--out {notes} is a file, not a run folder" in refused(capsys, "--out", notes, "--store", store)
    assert f"{notes} is a file, so {notes / 'run'} cannot be made" in refused(capsys, "--out", notes / "run",
                                                                               "--store", store)
    assert notes.read_text() == "my notes\n" and sorted(tmp_path.iterdir()) == [notes]


@pytest.fixture
def read_only(run: Path):
    """``run`` made read-only for this process: a read-only bind mount of it as root (whom no file mode
    stops), its write permissions removed otherwise."""
    if os.geteuid() != 0:
        for path in [run, *run.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        yield "no write permission"
        for path in [run, *run.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
        return
    bind = subprocess.run(["mount", "--bind", run, run], capture_output=True, text=True, check=False)
    if bind.returncode != 0:
        pytest.skip(f"root, but cannot bind-mount here to make a read-only folder: {bind.stderr.strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,bind,ro", run], capture_output=True, text=True, check=False)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount a bind mount read-only here: {ro.stderr.strip()}")
        yield "a read-only file system"
    finally:
        subprocess.run(["umount", run], check=True)


def test_resume_on_a_read_only_run_folder_is_refused_and_changes_nothing(
        trained: tuple[Path, Path], run: Path, read_only: str, capsys: pytest.CaptureFixture) -> None:
    before = snapshot(run)
    for resume in (["--resume"], ["--resume", "auto", "--store", trained[0]]):
        line = refused(capsys, "--out", run, *resume, "--steps", "2")
        assert f"--resume: cannot write {run} ({read_only})" in line
        assert "copy the run to a writable folder and resume the copy" in line
    line = refused(capsys, "--out", run / "inside", "--store", trained[0], "--steps", "1")
    assert f"--out {run / 'inside'}: cannot write {run} ({read_only}); choose a folder you can write" in line
    assert snapshot(run) == before


def test_resume_auto_refuses_a_run_whose_checkpoints_are_all_damaged_and_names_them(
        trained: tuple[Path, Path], run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for path in (run / CHECKPOINTS).rglob("*.pt"):  # a copy cut short
        path.write_bytes(path.read_bytes()[:1000])
    before = snapshot(run)
    line = refused(capsys, "--out", run, "--resume", "auto", "--store", trained[0], "--steps", "2")
    assert f"--resume auto: none of the checkpoints of {run} can be loaded" in line
    assert f"checkpoint 1 ({run / CHECKPOINTS / '1'})" in line
    for name in ("generator/mp_rank_00_model_states.pt", "critic/mp_rank_00_model_states.pt", "rng_rank0.pt"):
        assert f"{name} is cut short or corrupt" in line
    assert "before its first" not in line and f"move {run} away to start a new run" in line
    line = refused(capsys, "--out", run, "--resume", "--steps", "2")
    assert "--resume: none of the checkpoints" in line and "generator/mp_rank_00_model_states.pt" in line
    assert snapshot(run) == before and sorted(tmp_path.iterdir()) == [run], "nothing moved aside"

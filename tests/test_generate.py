"""`brats-gan generate` on real tiny training runs: the synthetic store follows the real store's schema,
images are reproducible from their seed, channels match the training data, and bad requests are
refused before anything is written.

The runs are trained once per module from a store preprocessed from phantoms (flair, t1ce, t2 at
64x64, the tiny preset's size): one on flair alone (repeated to 3 channels, checkpoints at steps
2 and 4) and one on all three modalities (a checkpoint at step 2), in parallel subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from conftest import cli, run_cli
from PIL import Image
from store_factory import read_without_brats_gan

from brats_gan import open_store
from brats_gan.checkpoints import model_states_path, read_latest
from brats_gan.commands import main as cli_main
from brats_gan.discover import discover_subjects
from brats_gan.generate import find_checkpoint
from brats_gan.preprocess import PreprocessConfig, run_preprocess
from brats_gan.schema import SOURCE_ARRAYS

MODALITIES = ("flair", "t1ce", "t2")

@pytest.fixture(scope="module")
def real_store(phantoms_2020: Path, dask_client, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("generate") / "real.zarr"
    config = PreprocessConfig(modalities=MODALITIES, slices=4, size=64)
    report = run_preprocess(discover_subjects(phantoms_2020), store, config, dask_client, progress=False)
    assert report.complete
    return store


@pytest.fixture(scope="module")
def runs(real_store: Path) -> dict[str, Path]:
    """``flair``: trained on flair repeated to 3 channels; ``three``: on flair, t1ce and t2, with the
    tiny preset's upsampling changed to bilinear resize on the command line."""
    root = real_store.parent
    common = ["--store", str(real_store), "--preset", "tiny", "--seed", "0", "--checkpoint-every", "2",
              "--sample-every", "0"]
    plans = {"flair": ["--out", str(root / "flair"), "--steps", "4", "--channels", "flair"],
             "three": ["--out", str(root / "three"), "--steps", "2", "--upsample", "resize",
                       "--resize-mode", "bilinear"]}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two runs share the cores; more threads only stall
    procs = {name: subprocess.Popen(cli("train", *common, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env=env) for name, args in plans.items()}
    for proc in procs.values():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
    return {name: root / name for name in plans}


def generated(run: Path, out: Path, *args: str) -> np.ndarray:
    assert cli_main(["generate", "--checkpoint", str(run), "--out", str(out), *args]) == 0
    return xr.open_zarr(out).image.values.astype(np.float32)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal to float16 rounding (a few steps in, the generator's outputs are still ~1e-3, so the
    tolerance scales with them)."""
    return np.allclose(a, b, rtol=0, atol=2e-3 * np.abs(b).max())


def test_a_hundred_images_in_the_real_stores_schema_read_without_brats_gan(
        runs: dict[str, Path], real_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, grid = tmp_path / "synthetic.zarr", tmp_path / "grid.png"
    done = run_cli("generate", "--checkpoint", runs["three"], "--num", "100", "--out", out, "--grid", grid,
                   watch_imports=True)
    assert done.returncode == 0, done.stderr
    assert "deepspeed" not in done.imported, "generate imported deepspeed"
    assert f"{out}: 100 synthetic slices 3x64x64 (flair, t1ce, t2)" in done.stdout
    synthetic, real = read_without_brats_gan(out, real_store)
    assert not synthetic["brats_gan_imported"]
    assert synthetic["sizes"] == {**{d: real["sizes"][d] for d in synthetic["sizes"]}, "sample": 100}
    for key in ("dims", "dtype", "channels"):
        assert synthetic[key] == real[key], key
    for key in ("coords", "zarr_types"):  # the real store has its per-source provenance arrays besides
        assert {k: v for k, v in real[key].items() if k in synthetic[key]} == synthetic[key], key
        assert set(real[key]) - set(synthetic[key]) == set(SOURCE_ARRAYS), key
    assert synthetic["chunks"] == [8, 3, 64, 64], "8 samples per chunk (the real store's 4 slices allow only 4)"
    assert synthetic["zarr_types"]["subject"].startswith("Int32"), "subjects: int32 codes into subject_names"
    assert -1 <= synthetic["min"] < synthetic["max"] <= 1
    assert len(synthetic["subjects"]) == 100 and set(synthetic["slice_index"]) == {-1}
    assert synthetic["tumour_fraction_nan"]
    attrs = synthetic["attrs"]
    assert attrs["synthetic"] is True and attrs["complete"] is True and real["attrs"]["synthetic"] is False
    assert attrs["checkpoint"]["step"] == 2 and attrs["checkpoint"]["preset"] == "tiny"
    assert attrs["checkpoint"]["run"] == str(runs["three"].resolve())
    weights = runs["three"] / attrs["checkpoint"]["weights_file"]
    assert attrs["checkpoint"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert attrs["checkpoint"]["model"]["image_size"] == 64 and attrs["params"]["device"] == "cpu"
    assert synthetic["subjects"][0] == "synthetic-step2-seed0-000000"
    assert attrs["seed"] == 0 and attrs["params"]["size"] == 64 and attrs["params"]["modalities"] == list(MODALITIES)
    for key in ("format", "format_version", "tool_version", "created"):
        assert attrs[key] == real["attrs"][key] or key == "created", key
    with Image.open(grid) as png:
        assert png.size == (10 * 66 - 2, 10 * 66 - 2) and png.mode == "RGB"  # 10 x 10 tiles, 2-pixel gaps
    assert cli_main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["synthetic"] is True and info["complete"] is True and info["samples"] == 100


def test_the_upsampling_given_to_train_is_the_one_generate_rebuilds(runs: dict[str, Path]) -> None:
    import torch

    shapes = {}
    for name, run in runs.items():
        checkpoint = find_checkpoint(run)
        shapes[name] = {tuple(w.shape[-2:]) for k, w in torch.load(model_states_path(run, checkpoint.step),
                                                                     weights_only=True)["module"].items()
                        if k.startswith("up.") and w.ndim == 4}
        shapes[name, "model"] = (checkpoint.model.upsample, checkpoint.model.resize_mode)
    assert shapes["flair"] == {(3, 3)} and shapes["flair", "model"] == ("resize", "nearest")  # the tiny recipe's
    assert shapes["three"] == {(3, 3)} and shapes["three", "model"] == ("resize", "bilinear")


def test_one_repeated_modality_is_stored_as_the_mean_of_the_generators_three_channels(
        runs: dict[str, Path], tmp_path: Path) -> None:
    flair = generated(runs["flair"], tmp_path / "flair.zarr", "--num", "8")
    assert flair.shape == (8, 1, 64, 64) and open_store(tmp_path / "flair.zarr").channel.values.tolist() == ["flair"]
    # The three-modality run's weights, as if they had been trained on flair alone.
    as_flair = tmp_path / "as_flair"
    shutil.copytree(runs["three"], as_flair)
    options = json.loads((as_flair / "training_options.json").read_text())
    options["data"]["channels"] = ["flair"]
    (as_flair / "training_options.json").write_text(json.dumps(options))
    three = generated(runs["three"], tmp_path / "three.zarr", "--num", "8")
    mean = generated(as_flair, tmp_path / "mean.zarr", "--num", "8")
    assert close(mean[:, 0], three.mean(1)) and not close(mean[:, 0], three[:, 0])


def test_same_seed_same_images_other_seed_or_step_other_images(runs: dict[str, Path], tmp_path: Path) -> None:
    run, out = runs["flair"], tmp_path / "s.zarr"
    first = generated(run, out, "--num", "70", "--seed", "3")
    assert xr.open_zarr(out).attrs["checkpoint"]["step"] == 4, "the newest checkpoint by default"
    again = generated(run, out, "--num", "70", "--seed", "3", "--overwrite")
    assert np.array_equal(first, again)
    other_batches = generated(run, out, "--num", "70", "--seed", "3", "--batch-size", "7", "--overwrite")
    assert close(other_batches, first)
    prefix = generated(run, out, "--num", "5", "--seed", "3", "--overwrite")
    assert close(prefix, first[:5])
    other_seed = generated(run, out, "--num", "70", "--seed", "4", "--overwrite")
    assert not close(other_seed, first)
    earlier = generated(run, out, "--num", "70", "--seed", "3", "--step", "2", "--overwrite")
    assert xr.open_zarr(out).attrs["checkpoint"]["step"] == 2 and not close(earlier, first)
    best_step = read_latest(run, "best")  # the lower SWD of the checkpoints at steps 2 and 4
    best = generated(run, out, "--num", "70", "--seed", "3", "--which", "best", "--overwrite")
    assert xr.open_zarr(out).attrs["checkpoint"]["step"] == best_step
    assert close(best, {2: earlier, 4: first}[best_step])


def test_the_averaged_generator_by_default_the_trained_one_on_request(
        runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = runs["flair"]
    averaged = generated(run, tmp_path / "ema.zarr", "--num", "16")
    assert "(tiny, averaged generator)" in capsys.readouterr().out
    assert xr.open_zarr(tmp_path / "ema.zarr").attrs["checkpoint"]["weights"] == "ema"
    assert np.array_equal(generated(run, tmp_path / "ema2.zarr", "--num", "16", "--weights", "ema"), averaged)
    trained = generated(run, tmp_path / "raw.zarr", "--num", "16", "--weights", "raw")
    assert xr.open_zarr(tmp_path / "raw.zarr").attrs["checkpoint"]["weights"] == "raw"
    assert not np.array_equal(trained, averaged)  # 4 steps in, the ramped-up average is still near the weights

    without = tmp_path / "without"  # trained with --ema-images 0, or before the average existed
    shutil.copytree(run, without)
    for folder in (without / "checkpoints").glob("[0-9]*"):
        (folder / "generator_ema.pt").unlink()
        state = json.loads((folder / "trainer_state.json").read_text())
        (folder / "trainer_state.json").write_text(json.dumps({**state, "ema": False}))
    assert np.array_equal(generated(without, tmp_path / "fallback.zarr", "--num", "16"), trained)
    argv = ["generate", "--checkpoint", str(without), "--out", str(tmp_path / "no.zarr"), "--weights", "ema"]
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "holds no averaged generator" in err and "--weights raw" in err and not (tmp_path / "no.zarr").exists()


def test_refusals_exit_2_with_their_reason_and_write_nothing(
        runs: dict[str, Path], real_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, grid = tmp_path / "out.zarr", tmp_path / "grid.png"
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    unstarted = tmp_path / "unstarted"  # killed before its first checkpoint
    unstarted.mkdir()
    shutil.copy(runs["flair"] / "training_options.json", unstarted)
    moved = tmp_path / "moved"  # its training store is gone and it never named its channels
    shutil.copytree(runs["three"], moved)
    options = json.loads((moved / "training_options.json").read_text())
    options["data"]["store"] = str(tmp_path / "gone.zarr")
    (moved / "training_options.json").write_text(json.dumps(options))

    (tmp_path / "notes.txt").write_text("not ours\n")

    def refused(run: Path, message: str, *args: str, target: Path = out, png: Path = grid) -> str:
        argv = ["generate", "--checkpoint", str(run), "--out", str(target), "--grid", str(png), *args]
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not grid.exists()
        return err

    refused(not_a_run, "not a training run folder")
    refused(unstarted, "names no complete checkpoint")
    refused(runs["flair"], "no complete checkpoint at step 3 (complete: 2, 4)", "--step", "3")
    refused(runs["flair"], "--num must be at least 1, got 0", "--num", "0")
    refused(runs["flair"], "--batch-size must be at least 1, got 0", "--batch-size", "0")
    refused(runs["flair"], "--seed must be at least 0, got -1", "--seed", "-1")
    refused(moved, "cannot tell which modalities the run was trained on")
    before = {p: p.stat().st_mtime_ns for p in real_store.rglob("*")}
    refused(runs["flair"], "already exists; pass --overwrite", target=real_store)
    refused(runs["flair"], "is not a synthetic store brats_gan wrote", "--overwrite", target=real_store)
    refused(runs["flair"], "holds the input", "--overwrite", target=runs["flair"].parent)
    refused(runs["flair"], "is a file", "--overwrite", target=grid.parent / "notes.txt")
    refused(runs["flair"], f"--out {real_store / 'synthetic.zarr'} is inside the Zarr store {real_store}",
            target=real_store / "synthetic.zarr")  # `preprocess --overwrite` of the store would delete it
    refused(runs["flair"], f"--grid {real_store / 'grid.png'} is inside the Zarr store", png=real_store / "grid.png")
    assert {p: p.stat().st_mtime_ns for p in real_store.rglob("*")} == before
    notes, sheets = tmp_path / "notes.txt", tmp_path / "sheets"
    sheets.mkdir()
    kept = sorted(tmp_path.iterdir())
    refused(runs["flair"], f"--grid {notes}: not a .png name", png=notes)
    refused(runs["flair"], f"--grid {sheets} is a folder", png=sheets)
    refused(runs["flair"], f"--grid {out / 'grid.png'} is inside --out {out}", png=out / "grid.png")
    assert notes.read_text() == "not ours\n" and sorted(tmp_path.iterdir()) == kept and not any(sheets.iterdir())
    err = refused(runs["flair"], "--num 1000000000000: 1000000000000 images of 1x64x64 need 7508.8 TiB on disk",
                  "--num", "1000000000000")  # at once, instead of growing in memory until killed
    assert f"{tmp_path} has" in err and "free: at most --num " in err

    named = generated(moved, out, "--num", "4", "--channels", *MODALITIES)
    assert named.shape == (4, 3, 64, 64)


def test_a_full_disk_is_one_line_keeps_an_incomplete_store_and_the_advised_command_finishes(
        runs: dict[str, Path], real_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import resource

    def small_files() -> None:  # every file this process writes stops at 256 KiB, as on a nearly full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**18, 2**18))

    out = tmp_path / "synthetic.zarr"
    command = cli("generate", "--checkpoint", runs["three"], "--out", out, "--num", "64")  # a 1.5 MiB shard
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=small_files, env=env)
    assert full.returncode == 5, full.stderr
    assert "Traceback" not in full.stderr
    (line,) = [line for line in full.stderr.splitlines() if line.startswith("brats-gan generate:")]
    assert line.startswith(f"brats-gan generate: error: cannot write {out} (OSError: File too large; ")
    assert "GiB free there): it is kept incomplete" in line and "run the same command with --overwrite" in line

    assert cli_main(["evaluate", "--real", str(real_store), "--fake", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"`brats-gan generate --checkpoint {runs['three'].resolve()} --out {out} --overwrite" in err
    assert "preprocess" not in err, "the advice of the writer that made the store"
    subprocess.run([*command, "--overwrite"], check=True, capture_output=True, timeout=300, env=env)
    assert xr.open_zarr(out).attrs["complete"] is True


def test_a_corrupt_or_missing_newest_checkpoint_falls_back_to_the_previous_one(
        runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "copied"
    shutil.copytree(runs["flair"], run)  # checkpoints 2 and 4; latest names 4
    reference = generated(runs["flair"], tmp_path / "step2.zarr", "--step", "2", "--num", "8")
    weights = model_states_path(run, 4)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    with caplog.at_level("WARNING"):
        fell_back = generated(run, tmp_path / "truncated.zarr", "--num", "8")
    assert np.array_equal(fell_back, reference), "the previous complete checkpoint's images"
    assert "checkpoint 4" in caplog.text and "generator/mp_rank_00_model_states.pt is cut short" in caplog.text
    assert cli_main(["generate", "--checkpoint", str(run), "--out", str(tmp_path / "named.zarr"), "--step", "4"]) == 2
    assert "checkpoint 4 of" in capsys.readouterr().err

    shutil.rmtree(run / "checkpoints" / "4")  # latest names a folder that is gone
    assert np.array_equal(generated(run, tmp_path / "deleted.zarr", "--num", "8"), reference)
    (model_states_path(run, 2, "critic")).write_bytes(b"not a zip")
    assert cli_main(["generate", "--checkpoint", str(run), "--out", str(tmp_path / "none.zarr")]) == 2
    err = capsys.readouterr().err
    assert "none of its checkpoints can be loaded" in err and "critic/mp_rank_00_model_states.pt" in err

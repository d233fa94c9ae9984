"""`brats-gan evaluate` end to end on small stores on disk, and its refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from store_factory import phantoms, write_store

from brats_gan import metrics as M
from brats_gan.commands import main
from brats_gan.models import build_models

pytestmark = pytest.mark.usefixtures("one_thread")


def subject_ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


N_COPIES = 8


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``real`` (held out) and ``train``: 24 phantom slices each at 128 px, different subjects; ``fake``: 24 at
    64 px, 8 exact (downsampled) copies of training slices and 16 from an untrained transposed-conv generator."""
    root = tmp_path_factory.mktemp("evaluate")
    real = phantoms(24, size=128, seed=20)
    train = phantoms(24, size=128, seed=21)
    torch.manual_seed(0)
    generator, _ = build_models("tiny")
    generator.eval()
    with torch.no_grad():
        generated = generator(torch.randn(16, generator.config.latent_dim)).mean(dim=1, keepdim=True).numpy()
    copies = F.interpolate(torch.from_numpy(train[:N_COPIES]), size=64, mode="area").numpy()
    fake = np.concatenate([copies, generated])
    return {  # real and train: 3 subjects of 8 slices each; fake: one slice per "subject", as generate writes
        "real": write_store(root / "heldout.zarr", images=real, subjects=subject_ids("BraTS-HELD", 3), synthetic=False),
        "train": write_store(root / "train.zarr", images=train, subjects=subject_ids("BraTS-TRAIN", 3),
                             synthetic=False),
        "fake": write_store(root / "fake.zarr", images=fake, subjects=[f"synthetic-{i:06d}" for i in range(24)],
                            slices=1),
    }


@pytest.mark.slow
def test_evaluate_end_to_end_prints_the_figures_and_writes_the_report(stores, tmp_path) -> None:
    report = tmp_path / "report"
    done = run_cli("evaluate", "--real", stores["real"], "--fake", stores["fake"], "--train", stores["train"],
                   "--json", "--report", report, timeout=300, ok=True,
                   env={"OMP_NUM_THREADS": "1"})  # two threads stall when other jobs share the cores
    out = json.loads(done.stdout)
    for key in ("swd", "swd_floor", "checkerboard", "checkerboard_real", "ms_ssim_fake", "ms_ssim_real",
                "memorisation_share", "fid", "kid"):
        assert key in out, key
    assert (out["n_real"], out["n_fake"], out["n_train"], out["image_size"]) == (24, 24, 24, 64)
    assert out["swd"] > out["swd_floor"] > 0
    assert out["checkerboard"] > out["checkerboard_real"] + 3
    assert 0 < out["ms_ssim_real"] <= 1 and 0 < out["ms_ssim_fake"] <= 1
    assert out["memorisation_share"] == pytest.approx(N_COPIES / 24)
    assert {p["train_sample"] for p in out["closest_pairs"]} == set(range(N_COPIES))
    assert out["fid"] is None and out["kid"] is None
    notes = " ".join(out["notes"])
    assert "area-downsampled to 64 px" in notes and "--inception-weights" in notes and "3 scales" in notes
    assert "pt_inception-2015-12-05" in done.stderr

    assert json.loads((report / "metrics.json").read_text()) == out
    for name in ("swd", "checkerboard", "ms_ssim", "memorisation"):
        lines = (report / f"metric-{name}.jsonl").read_text().splitlines()
        assert len(lines) == 1
        line = json.loads(lines[0])
        assert line["metric"] == name and line["fake"] == str(stores["fake"]) and line["results"]
    assert not (report / "metric-inception.jsonl").exists()
    from PIL import Image

    for png in ("grids", "histograms", "spectra", "closest_pairs"):
        with Image.open(report / f"{png}.png") as image:
            assert image.width > 200 and image.height > 100


def test_the_table_names_the_floor_and_a_second_report_appends(stores, tmp_path, capsys) -> None:
    args = ["evaluate", "--real", str(stores["real"]), "--fake", str(stores["real"]), "--report", str(tmp_path),
            "--metrics", "swd,checkerboard"]
    for _ in range(2):
        assert main(args) == 0
    printed = capsys.readouterr().out
    assert "floor (real half vs real half)" in printed and "checkerboard" in printed
    assert "not marked synthetic" in printed
    assert len((tmp_path / "metric-swd.jsonl").read_text().splitlines()) == 2


def _refused(capsys, *args: str) -> str:
    assert main(["evaluate", *args]) == 2
    return capsys.readouterr().err


def test_refuses_incomplete_or_foreign_stores(stores, tmp_path, capsys) -> None:
    unfinished = write_store(tmp_path / "unfinished.zarr", subjects=2, slices=8, size=64, complete=False)
    assert "not marked complete" in _refused(capsys, "--real", str(unfinished), "--fake", str(stores["fake"]))
    (tmp_path / "empty").mkdir()
    err = _refused(capsys, "--real", str(stores["real"]), "--fake", str(tmp_path / "empty"))
    assert "--fake" in err and "Zarr" in err


def test_refuses_incompatible_channels_and_too_few_slices(stores, tmp_path, capsys) -> None:
    two = write_store(tmp_path / "two.zarr", subjects=3, slices=8, size=64, channels=("flair", "t1"))
    three = write_store(tmp_path / "three.zarr", subjects=3, slices=8, size=64, channels=("flair", "t1ce", "t2"))
    err = _refused(capsys, "--real", str(two), "--fake", str(three))
    assert f"the stores hold different modalities (--real {two} has flair,t1; --fake {three} has flair,t1ce,t2)" in err
    small = write_store(tmp_path / "small.zarr", subjects=1, slices=8, size=64)
    assert "too few slices for the SWD floor" in _refused(capsys, "--real", str(small), "--fake", str(stores["fake"]))
    assert "--max-images" in _refused(capsys, "--real", str(stores["real"]), "--fake", str(stores["fake"]),
                                      "--max-images", "4")


def test_refuses_a_training_store_that_is_not_disjoint_from_the_held_out_one(stores, tmp_path, capsys) -> None:
    same = _refused(capsys, "--real", str(stores["train"]), "--fake", str(stores["fake"]), "--train", str(stores["train"]))
    assert "same store" in same and "held-out" in same
    copy_of_train = write_store(tmp_path / "train-copy.zarr", images=phantoms(16, size=128, seed=3),
                                subjects=subject_ids("BraTS-TRAIN", 2), synthetic=False)
    shared = _refused(capsys, "--real", str(copy_of_train), "--fake", str(stores["fake"]), "--train", str(stores["train"]))
    assert "shares 2 subject(s)" in shared


def test_refuses_unusable_inception_weights_before_reading_pixels(stores, tmp_path, capsys) -> None:
    err = _refused(capsys, "--real", str(stores["real"]), "--fake", str(stores["fake"]),
                   "--inception-weights", str(tmp_path / "missing.pth"))
    assert "no such file" in err and "pt_inception-2015-12-05-6726825d.pth" in err
    assert "unknown" in _refused(capsys, "--real", str(stores["real"]), "--fake", str(stores["fake"]),
                                 "--metrics", "swd,fid")


def _torch_fidelity_importable() -> bool:
    try:
        M._torch_fidelity()
    except M.MetricUnavailable:
        return False
    return True


def test_weights_without_the_fid_extra_say_how_to_install_it(stores, tmp_path, capsys) -> None:
    if _torch_fidelity_importable():
        pytest.skip("torch-fidelity is importable here")
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not used")
    err = _refused(capsys, "--real", str(stores["real"]), "--fake", str(stores["fake"]),
                   "--inception-weights", str(weights))
    assert '.[fid]' in err and "download.pytorch.org/whl/cpu" in err


@pytest.mark.slow
def test_inception_metrics_with_the_real_weights(stores, tmp_path) -> None:
    """Runs only where the [fid] extra works and BRATS_GAN_INCEPTION_WEIGHTS names the FID weights file."""
    weights = os.environ.get("BRATS_GAN_INCEPTION_WEIGHTS")
    if not (weights and Path(weights).is_file() and _torch_fidelity_importable()):
        pytest.skip("needs the [fid] extra and BRATS_GAN_INCEPTION_WEIGHTS=pt_inception-2015-12-05-6726825d.pth")
    done = run_cli("evaluate", "--real", stores["real"], "--fake", stores["fake"], "--json",
                   "--inception-weights", weights, "--metrics", "inception", ok=True)
    out = json.loads(done.stdout)
    assert out["fid"] > 0 and np.isfinite(out["kid"]) and 0 <= out["precision"] <= 1 and 0 <= out["recall"] <= 1


def test_stores_too_small_for_one_metric_get_the_others_and_a_note(tmp_path: Path) -> None:
    real = write_store(tmp_path / "real.zarr", subjects=2, slices=8, size=8, seed=1, synthetic=False)
    fake = write_store(tmp_path / "fake.zarr", subjects=1, slices=8, size=8, seed=2)
    proc = run_cli("evaluate", "--real", real, "--fake", fake, "--json", "--metrics", "swd,ms_ssim,checkerboard",
                   ok=True)
    figures = json.loads(proc.stdout)
    assert figures["ms_ssim_fake"] is None and figures["swd"] is not None and figures["checkerboard"] is not None
    assert "MS-SSIM not computed: 8 px images are smaller than its 11 px window" in figures["notes"]
    assert "Traceback" not in proc.stderr

"""Where brats_gan writes its outputs: PNGs replace only a PNG brats_gan drew, nothing is written inside a
Zarr store (whose rewrite would delete it), a report goes to a folder, and every refusal comes before any
work, naming the path and flag, with nothing lost. (generate's own outputs are in test_generate.py, which
has a trained run.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from store_factory import phantoms, write_store

from brats_gan.commands import main
from brats_gan.images import save_grid


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(tmp_path_factory.mktemp("outputs") / "store.zarr", subjects=2, slices=8, size=32)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (names include the hidden ones, e.g. a temporary PNG) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys: pytest.CaptureFixture, *argv: str | Path) -> str:
    assert main([str(a) for a in argv]) == 2, argv
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_preview_replaces_only_a_png_it_drew_and_refuses_anything_else_untouched(
        store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    photo = tmp_path / "photo.png"  # a PNG of someone else's
    Image.fromarray(np.full((4, 4), 7, dtype=np.uint8)).save(photo)
    folder = tmp_path / "sheets"
    folder.mkdir()
    before = snapshot(tmp_path)

    err = refused(capsys, "preview", store, "--out", notes)
    assert f"--out {notes}: not a .png name" in err
    err = refused(capsys, "preview", store, "--out", photo)
    assert f"--out {photo} exists and is not a PNG brats_gan drew" in err and "move it away" in err
    err = refused(capsys, "preview", store, "--out", folder)
    assert f"--out {folder} is a folder" in err
    err = refused(capsys, "preview", store, "--out", notes / "sheet.png")
    assert f"{notes} is a file, not a folder" in err
    assert snapshot(tmp_path) == before, "nothing written, replaced or left behind (no temporary PNG)"

    sheet = tmp_path / "sheet.png"
    for _ in range(2):  # the second run replaces the PNG the first one drew
        assert main(["preview", str(store), "--out", str(sheet), "--num", "4"]) == 0
    with Image.open(sheet) as png:
        assert png.size == (2 * 32 + 2, 2 * 32 + 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "photo.png", "sheet.png", "sheets"]


def test_a_png_that_cannot_be_written_leaves_no_temporary_file(tmp_path: Path) -> None:
    in_the_way = tmp_path / "grid.png"
    in_the_way.mkdir()
    with pytest.raises(IsADirectoryError):
        save_grid(np.zeros((4, 1, 8, 8), dtype=np.float32), in_the_way)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"] and not any(in_the_way.iterdir())


def test_no_output_goes_inside_a_store_whose_rewrite_would_delete_it(
        store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`preprocess --overwrite STORE` deletes the folder: a run, a PNG or a report inside it would go with it."""
    before = snapshot(store)
    link = tmp_path / "link"
    link.symlink_to(store)
    err = refused(capsys, "preview", store, "--out", store / "preview.png")
    assert f"--out {store / 'preview.png'} is inside the Zarr store {store}" in err
    assert "inside the Zarr store" in refused(capsys, "preview", store, "--out", link / "sub" / "preview.png")
    err = refused(capsys, "evaluate", "--real", store, "--fake", store, "--report", store / "image" / "report")
    assert f"--report {store / 'image' / 'report'} is inside the Zarr store {store / 'image'}" in err
    train = run_cli("train", "--store", store, "--out", store / "run", "--preset", "tiny", "--steps", "1",
                    env={"OMP_NUM_THREADS": "1"})
    assert train.returncode == 2, train.output
    assert f"--out {store / 'run'} is inside the Zarr store {store}" in train.stderr
    assert snapshot(store) == before


def test_evaluate_report_must_be_a_folder_whose_pngs_brats_gan_drew(
        store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a_file = tmp_path / "report.txt"
    a_file.write_text("results of last week\n")
    err = refused(capsys, "evaluate", "--real", store, "--fake", store, "--report", a_file, "--metrics", "swd")
    assert f"--report {a_file} exists and is not a folder" in err and "Errno" not in err
    assert "SWD" not in capsys.readouterr().out, "refused before the figures"
    report = tmp_path / "report"
    report.mkdir()
    (report / "grids.png").write_bytes(b"not a PNG of ours")
    err = refused(capsys, "evaluate", "--real", store, "--fake", store, "--report", report, "--metrics", "swd")
    assert f"--report {report / 'grids.png'} exists and is not a PNG brats_gan drew" in err
    assert a_file.read_text() == "results of last week\n"
    assert snapshot(report) == {"grids.png": b"not a PNG of ours"}


def _store_of(path: Path, images: np.ndarray, channels: tuple[str, ...], prefix: str) -> Path:
    return write_store(path, images=images, channels=channels, subjects=[f"{prefix}-{i}" for i in range(3)],
                       synthetic=prefix == "fake")


def test_evaluate_compares_channels_by_name_and_refuses_other_modalities(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    flair, t1ce, t2 = phantoms(24, size=32, seed=1), phantoms(24, size=32, seed=2), phantoms(24, size=32, seed=3)
    fake = _store_of(tmp_path / "fake.zarr", phantoms(24, size=32, seed=4), ("flair",), "fake")
    real_flair = _store_of(tmp_path / "flair.zarr", flair, ("flair",), "real")
    real_three = _store_of(tmp_path / "three.zarr", np.concatenate([t1ce, flair, t2], axis=1),
                           ("t1ce", "flair", "t2"), "real")
    real_t1_t2 = _store_of(tmp_path / "t1t2.zarr", np.concatenate([t1ce, t2], axis=1), ("t1ce", "t2"), "real")

    err = refused(capsys, "evaluate", "--real", real_t1_t2, "--fake", fake, "--metrics", "swd")
    assert "the stores hold different modalities" in err
    assert f"--real {real_t1_t2} has t1ce,t2; --fake {fake} has flair" in err

    def swd(real: Path) -> tuple[float, str]:
        assert main(["evaluate", "--real", str(real), "--fake", str(fake), "--metrics", "swd", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        return out["swd"], " ".join(out["notes"])

    alone, _ = swd(real_flair)
    picked, notes = swd(real_three)  # the synthetic FLAIR against the real store's FLAIR, not its T1ce
    assert picked == pytest.approx(alone)
    assert "--real has t1ce,flair,t2: compared on flair, picked by name" in notes

    unnamed = _store_of(tmp_path / "unnamed.zarr", flair, ("flair",), "real")  # a store that names no channel
    meta = json.loads((unnamed / "zarr.json").read_text())
    del meta["attributes"]["channel_names"]
    (unnamed / "zarr.json").write_text(json.dumps(meta))
    stored_order, notes = swd(unnamed)
    assert stored_order == pytest.approx(alone) and "channel names missing" in notes

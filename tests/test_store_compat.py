"""Stores written before the core-types layout (format_version 1: subjects and a ``channel`` array as
variable-length strings, no provenance) keep working: brats_gan reads them as it reads the new ones, and
they still train, generate, evaluate, verify and `info`. The old layout is written by the tests' own small
writer (``store_factory.write_store(format_version=1)``), never by brats_gan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import run_cli
from store_factory import write_store

from brats_gan import open_store, schema
from brats_gan.commands import main as cli_main
from brats_gan.discover import discover_subjects
from brats_gan.preprocess import PreprocessConfig, PreprocessError, run_preprocess
from brats_gan.train_config import store_identity

SUBJECTS = ["BraTS20_Training_002", "BraTS20_Training_001"]  # not in ID order: codes follow the store's order


def both_formats(tmp_path: Path, **kwargs) -> tuple[Path, Path]:
    """The same store written in format 1 and in format 2."""
    args = {"subjects": SUBJECTS, "slices": 8, "size": 32, "channels": ("flair", "t2"), "synthetic": False, **kwargs}
    return (write_store(tmp_path / "v1.zarr", format_version=1, **args),
            write_store(tmp_path / "v2.zarr", **args))


def zarr_data_types(store: Path) -> dict[str, str]:
    return {p.parent.name: json.loads(p.read_text())["data_type"] for p in store.glob("*/zarr.json")}


def test_a_format_1_store_is_read_as_the_same_store(tmp_path: Path) -> None:
    old, new = both_formats(tmp_path)
    assert zarr_data_types(old)["subject"] == "string" and "channel" in zarr_data_types(old)
    assert zarr_data_types(new)["subject"] == "int32" and "channel" not in zarr_data_types(new)
    before, after = schema.read_summary(str(old)), schema.read_summary(str(new))
    assert before.attrs["format_version"] == 1 and after.attrs["format_version"] == 2
    for field in ("channels", "n_subjects", "n_samples", "image_shape", "chunks", "shards", "complete"):
        assert getattr(before, field) == getattr(after, field), field
    identity = {k: v for k, v in store_identity(before).items() if k != "created"}
    assert identity == {k: v for k, v in store_identity(after).items() if k != "created"}, "a run sees the same store"

    a, b = open_store(old), open_store(new)
    for name in ("subject", "subject_code", "channel", "slice_index", "tumour_fraction", "image"):
        assert a[name].values.tolist() == b[name].values.tolist(), name
    assert a.subject.values[::8].tolist() == SUBJECTS and a.subject_code.values[::8].tolist() == [0, 1]
    assert a.sel(channel=["t2"]).image.shape == (16, 1, 32, 32)
    assert schema.sample_subjects(zarr.open_group(old, mode="r")).tolist() == a.subject.values.tolist()


def test_info_verify_and_sample_on_a_format_1_store(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    old, _ = both_formats(tmp_path)
    assert cli_main(["info", str(old), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "format: brats_gan.slices v1" in text and "channels: ['flair', 't2']" in text and "subjects: 2" in text
    assert "provenance: none: written before brats_gan recorded it (format_version 1)" in text
    assert "verify: ok" in text
    assert cli_main(["info", str(old), "--sample", "9"]) == 0
    text = capsys.readouterr().out
    assert f"sample 9 of {old}: subject {SUBJECTS[1]}, slice_index 61" in text
    assert "no provenance: this store was written before brats_gan recorded it" in text

    zarr.open_group(old, mode="r+")["image"][8] = 0.5  # damage the second subject's shard
    assert cli_main(["info", str(old), "--verify"]) == 1
    assert f"subject {SUBJECTS[1]} (shard 1): pixels differ from those written" in capsys.readouterr().err


def test_an_unfinished_format_1_preprocessing_store_is_not_resumed(tmp_path: Path, phantoms_2020: Path,
                                                                  dask_client) -> None:
    subjects = discover_subjects(phantoms_2020)
    config = PreprocessConfig(slices=8, size=32)
    store = write_store(tmp_path / "old.zarr", subjects=[s.id for s in subjects], slices=8, size=32, synthetic=False,
                        complete=False, format_version=1)
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    with pytest.raises(PreprocessError, match="started by an older brats_gan .*format_version 1.*--overwrite"):
        run_preprocess(subjects, store, config, dask_client, resume=True, progress=False)
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before, "nothing written"
    report = run_preprocess(subjects, store, config, dask_client, overwrite=True, progress=False)
    assert report.complete and schema.read_summary(str(store)).attrs["format_version"] == schema.FORMAT_VERSION


def test_a_format_1_store_trains_generates_and_evaluates(tmp_path: Path, deepspeed_op: Path) -> None:
    """One training step on an old store, 16 images generated from it (named like its channel), and
    those evaluated against it: each command as a user runs it."""
    old = write_store(tmp_path / "old.zarr", subjects=2, slices=8, size=64, synthetic=False, format_version=1)
    run, fake = tmp_path / "run", tmp_path / "fake.zarr"
    env = {"OMP_NUM_THREADS": "1"}
    run_cli("train", "--store", old, "--out", run, "--preset", "tiny", "--steps", "1", "--checkpoint-every", "1",
            "--sample-every", "0", "--swd-images", "0", env=env, ok=True)
    made = run_cli("generate", "--checkpoint", run, "--out", fake, "--num", "16", env=env, ok=True)
    assert "(flair)" in made.stdout, made.stdout
    assert open_store(fake).channel.values.tolist() == ["flair"]
    done = run_cli("evaluate", "--real", old, "--fake", fake, "--json", "--metrics", "swd,checkerboard", env=env,
                   ok=True)
    figures = json.loads(done.stdout)
    assert np.isfinite(figures["swd"]) and figures["checkerboard"] is not None

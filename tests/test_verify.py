"""A store marked complete is checked, not trusted: every shard present, decodable, finite, in range and
equal to the checksums its writer recorded (``brats-gan info --verify``, and every training start)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import run_cli

from brats_gan.discover import discover_subjects
from brats_gan.preprocess import PreprocessConfig, run_preprocess


@pytest.fixture(scope="module")
def sound(phantoms_2020: Path, dask_client, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six phantom subjects x 8 slices at 64 px, as `brats-gan preprocess` writes them (checksums recorded)."""
    store = tmp_path_factory.mktemp("verify") / "sound.zarr"
    run_preprocess(discover_subjects(phantoms_2020), store, PreprocessConfig(slices=8, size=64), dask_client,
                   progress=False)
    return store


def damaged_copy(sound: Path, tmp_path: Path) -> tuple[Path, zarr.Array, list[str]]:
    store = tmp_path / "copy.zarr"
    shutil.copytree(sound, store)
    group = zarr.open_group(store, mode="r+")
    return store, group["image"], list(group.attrs["subject_names"])


def verify(store: Path) -> tuple[int, dict]:
    proc = run_cli("info", store, "--verify", "--json")
    return proc.returncode, json.loads(proc.stdout)["verify"]


def test_a_sound_store_verifies_with_its_checksums(sound: Path) -> None:
    assert len(zarr.open_group(sound, mode="r").attrs["shard_crc32"]) == 6, "one CRC-32 per subject's shard"
    status, result = verify(sound)
    assert status == 0 and result["ok"] and result["checksums"] and result["shards"] == 6
    shown = run_cli("info", sound, "--verify", ok=True)
    assert "verify: ok, 6 shards read, pixels and checksums" in shown.stdout


@pytest.mark.parametrize("damage", ["missing shard", "nan pixels", "changed pixels", "out of range", "cut short"])
def test_damage_is_found_and_named_by_subject(sound: Path, tmp_path: Path, damage: str) -> None:
    store, image, subjects = damaged_copy(sound, tmp_path)
    shard = store / "image" / "c" / "2" / "0" / "0" / "0"
    if damage == "missing shard":
        shard.unlink()
        expected = "not finite (the shard file is probably missing"
    elif damage == "cut short":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        expected = ""
    else:
        rows = image[16:24]
        rows[3, 0, 10, 10] = {"nan pixels": np.nan, "changed pixels": rows[3, 0, 10, 10] + np.float16(0.25),
                              "out of range": np.float16(1.5)}[damage]
        image[16:24] = rows
        expected = {"nan pixels": "1 of", "changed pixels": "CRC-32 mismatch", "out of range": "outside [-1, 1]"}[damage]
    status, result = verify(store)
    assert status == 1 and not result["ok"]
    assert [p["where"] for p in result["problems"]] == [f"subject {subjects[2]} (shard 2)"]
    assert expected in result["problems"][0]["problem"]


def test_training_refuses_a_damaged_store_before_its_first_step(sound: Path, tmp_path: Path) -> None:
    store, _, subjects = damaged_copy(sound, tmp_path)
    (store / "image" / "c" / "4" / "0" / "0" / "0").unlink()  # a partial copy
    run = tmp_path / "run"
    proc = run_cli("train", "--store", store, "--out", run, "--preset", "tiny", "--steps", "2",
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.output
    assert f"subject {subjects[4]} (shard 4)" in proc.stderr and "brats-gan info --verify" in proc.stderr
    assert "Traceback" not in proc.output
    assert not (run / "metrics.csv").exists(), "refused before any step"


@pytest.mark.parametrize("damage", ["image deleted", "subject deleted", "image changed"])
def test_an_array_metadata_document_deleted_or_changed_is_named(sound: Path, tmp_path: Path, damage: str) -> None:
    """zarr itself reads the copy consolidated in the group's zarr.json, so it still sees the array; readers
    without consolidated metadata do not, or see another array."""
    store, _, _ = damaged_copy(sound, tmp_path)
    name = damage.split()[0]
    document = store / name / "zarr.json"
    if damage.endswith("deleted"):
        document.unlink()
        expected = f"missing: readers without consolidated metadata cannot see {name!r}"
    else:
        meta = json.loads(document.read_text())
        meta["shape"][0] -= 8
        document.write_text(json.dumps(meta))
        expected = f"differs from the copy consolidated in copy.zarr/zarr.json, so readers disagree on {name!r}"
    status, result = verify(store)
    assert status == 1 and not result["ok"], result
    assert [(p["where"], p["problem"].split(";")[0]) for p in result["problems"]] == [(f"{name}/zarr.json", expected)]
    shown = run_cli("info", store, "--verify")
    assert shown.returncode == 1 and "verify: DAMAGED" in shown.stdout
    assert f"  {name}/zarr.json: {expected}" in shown.stderr and "Traceback" not in shown.output

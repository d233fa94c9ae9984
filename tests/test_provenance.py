"""Provenance: every stored slice can be traced to its source file and put back onto its voxel grid.

The phantoms are stored as BraTS stores them (LPS, 1 mm) and, for the second subject, re-stored with the
same anatomy permuted and flipped (voxel axes pointing A, I, R), with 0.9 x 1.1 x 2.5 mm voxels and a
7-degree rotation: a non-identity, non-diagonal affine whose closest canonical orientation differs from
the file's. The store is 44 px wide on a 40 x 48 RAS grid, so x is padded and y cropped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_gan import open_store
from brats_gan.commands import main as cli_main
from brats_gan.discover import discover_subjects
from brats_gan.phantoms import write_phantom_dataset
from brats_gan.preprocess import PreprocessConfig, run_preprocess

README = Path(__file__).parents[1] / "README.md"
SIZE = 44
MODALITIES = ("flair", "t2")


def restore_rotated(folder: Path) -> None:
    """Re-store each file of a phantom subject permuted, flipped, with anisotropic voxels and rotated 7
    degrees about z, its affine describing the same anatomy: ``new[i, j, k] = old[39 - k, 47 - i, 35 - j]``."""
    t = np.radians(7)
    rotation = np.array([[np.cos(t), -np.sin(t), 0, 0], [np.sin(t), np.cos(t), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    new_to_old = np.array([[0, 0, -1, 39], [-1, 0, 0, 47], [0, -1, 0, 35], [0, 0, 0, 1]], dtype=float)
    for path in sorted(folder.glob("*.nii.gz")):
        old = nib.load(path)
        data = np.asanyarray(old.dataobj)
        new = np.ascontiguousarray(data.transpose(1, 2, 0)[::-1, ::-1, ::-1])
        assert new[5, 6, 7] == data[39 - 7, 47 - 5, 35 - 6]
        affine = rotation @ np.diag([0.9, 1.1, 2.5, 1]) @ old.affine @ new_to_old
        image = nib.Nifti1Image(new, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        nib.save(image, path)


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory, dask_client) -> tuple[Path, Path]:
    """(input folder, store): two phantom subjects, the second re-stored rotated."""
    root = tmp_path_factory.mktemp("provenance")
    data = root / "MICCAI_BraTS2020_TrainingData"
    folders = write_phantom_dataset(data, n_subjects=2, shape=(40, 48, 36), seed=3, modalities=MODALITIES)
    restore_rotated(folders[1])
    store = root / "store.zarr"
    report = run_preprocess(discover_subjects(data), store, PreprocessConfig(modalities=MODALITIES, slices=6, size=SIZE),
                            dask_client, progress=False)
    assert report.complete
    return data, store


def readme_mapping_snippet() -> str:
    blocks = [b.split("\n", 1)[1] for b in README.read_text().split("```")[1::2] if b.startswith("python")]
    (snippet,) = [b for b in blocks if "pixel_to_voxel" in b and "nibabel" in b]
    return snippet


def test_each_source_file_is_recorded_as_nibabel_reads_it(rotated: tuple[Path, Path]) -> None:
    data, store = rotated
    ds = open_store(store)
    assert ds.attrs["input_folder"] == data.name and ds.subject.values.tolist()[::6] == ds.attrs["subject_names"]
    for k, source in enumerate(ds.attrs["sources"]):
        assert source["subject"] == ds.attrs["subject_names"][k]
        assert set(source["files"]) == {*MODALITIES, "seg"}
        for c, channel in enumerate(ds.channel.values.tolist()):
            record = source["files"][channel]
            path = data / record["path"]
            assert path.is_file() and not Path(record["path"]).is_absolute()
            assert record["bytes"] == path.stat().st_size
            assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            image = nib.load(path)
            assert record["orientation"] == "".join(nib.aff2axcodes(image.affine))
            np.testing.assert_array_equal(ds.source_affine.values[k, c], image.affine)
            np.testing.assert_array_equal(ds.voxel_spacing.values[k, c], image.header.get_zooms()[:3])
            assert ds.source_shape.values[k, c].tolist() == list(image.shape)
    orientations = [s["files"]["flair"]["orientation"] for s in ds.attrs["sources"]]
    assert orientations == ["LPS", "AIR"], "the second subject is stored in another orientation"
    assert not np.allclose(ds.source_affine.values[1, 0][:3, :3], np.diag(np.diag(ds.source_affine.values[1, 0][:3, :3])))


def test_the_readmes_snippet_puts_every_slice_back_onto_its_source_voxels(rotated: tuple[Path, Path]) -> None:
    """The README's snippet, run as written for every sample and channel: the stored pixels are exactly the
    normalised source voxels it maps them to (its own assertion); and nibabel, through its own
    reorientation (``as_closest_canonical``) and the files' affines, finds those same voxels at the
    slice's ``slice_index``, with columns running left to right and anterior at the top."""
    data, store = rotated
    snippet = readme_mapping_snippet()
    for literal in ('open_store("brats2020.zarr")', 'Path("/data/MICCAI_BraTS2020_TrainingData")', "i, c = 17, 0"):
        assert literal in snippet, literal
    ds = open_store(store)
    flipped_slices = []
    for i in range(ds.sizes["sample"]):
        for c in range(ds.sizes["channel"]):
            code = (snippet.replace('"brats2020.zarr"', repr(str(store)))
                    .replace('Path("/data/MICCAI_BraTS2020_TrainingData")', f"Path({str(data)!r})")
                    .replace("i, c = 17, 0", f"i, c = {i}, {c}"))
            seen: dict = {}
            exec(code, seen)  # noqa: S102  (the README's own code; it asserts the pixels equal the voxels)
            ijk, inside, voxels, world = seen["ijk"], seen["inside"], seen["voxels"], seen["world"]
            assert 0.3 < inside.mean() < 1, "padding and cropping both happen at 44 px"
            canonical = nib.as_closest_canonical(seen["source"])
            xyz = np.linalg.solve(canonical.affine, world)[:3]
            assert np.allclose(xyz, xyz.round(), atol=1e-6)
            xyz = xyz.round().astype(int)[:, inside]
            assert set(xyz[2]) == {int(ds.slice_index[i])}, "slice_index: the axial index in nibabel's RAS volume"
            np.testing.assert_array_equal(np.asanyarray(canonical.dataobj)[tuple(xyz)], voxels)
            rows, cols = np.indices(ds.image.shape[-2:])
            assert np.all(np.diff(xyz[0][rows.ravel()[inside] == rows.ravel()[inside][0]]) == 1), "left to right"
            assert np.all(np.diff(xyz[1][cols.ravel()[inside] == cols.ravel()[inside][0]]) == -1), "anterior on top"
            axis = ds.attrs["sources"][int(ds.subject_code[i])]["files"][str(ds.channel.values[c])]["slice_axis"]
            assert set(ijk[axis, inside]) == {int(ds.source_slice[i, c])}
            if int(ds.subject_code[i]) == 1:
                flipped_slices.append(int(ds.source_slice[i, c]))
    assert flipped_slices == sorted(flipped_slices, reverse=True), "the rotated files run inferior to superior backwards"


def test_info_says_where_a_sample_came_from(rotated: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    data, store = rotated
    sample = 8  # the second subject's third slice
    assert cli_main(["info", str(store), "--sample", str(sample)]) == 0
    text = capsys.readouterr().out
    ds = open_store(store)
    record = ds.attrs["sources"][1]["files"]["t2"]
    assert f"sample {sample} of {store}: subject {ds.subject.values[sample]}, slice_index {int(ds.slice_index[sample])}" \
        in text
    assert f"t2: {data.name}/{record['path']} ({record['bytes']} bytes, sha256 {record['sha256']})" in text
    assert f"source slice {int(ds.source_slice[sample, 1])} along voxel axis {record['slice_axis']}" in text
    assert "stored AIR, reoriented to RAS" in text and "affine: [[" in text

    assert cli_main(["info", str(store), "--sample", str(sample), "--json"]) == 0
    seen = json.loads(capsys.readouterr().out)
    assert seen["subject"] == ds.subject.values[sample] and seen["sources"][1]["path"] == record["path"]
    np.testing.assert_array_equal(seen["sources"][1]["affine"], ds.source_affine.values[1, 1])

    assert cli_main(["info", str(store), "--sample", "12"]) == 2
    assert "--sample 12: sample 12 is not in" in capsys.readouterr().err


def test_a_generated_store_records_its_checkpoint_and_has_no_source(uninterrupted: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "synthetic.zarr"
    assert cli_main(["generate", "--checkpoint", str(uninterrupted), "--out", str(out), "--num", "3"]) == 0
    capsys.readouterr()
    ds = open_store(out)
    checkpoint = ds.attrs["checkpoint"]
    weights = uninterrupted / checkpoint["weights_file"]
    assert checkpoint["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert checkpoint["weights"] == "ema" and checkpoint["model"]["latent_dim"] > 0
    assert "pixel_to_voxel" not in ds and "sources" not in ds.attrs
    assert ds.source_slice.values.tolist() == [[-1]] * 3
    assert cli_main(["info", str(out), "--sample", "2"]) == 0
    text = capsys.readouterr().out
    assert f"subject {ds.subject.values[2]}" in text and f"sha256 {checkpoint['sha256']}" in text

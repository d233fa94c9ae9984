"""The phantom dataset must look like BraTS to a reader: names, layout, dtypes, orientation, labels."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_gan.phantoms import (
    LAYOUTS,
    MODALITIES,
    make_phantom,
    modality_filename,
    subject_id,
    write_phantom_dataset,
)

SMALL = (64, 64, 40)

# Spelled out rather than derived, so a change in the naming functions cannot hide here.
EXPECTED_FILES = {
    "2020": (
        "BraTS20_Training_001",
        [
            "BraTS20_Training_001_flair.nii.gz",
            "BraTS20_Training_001_seg.nii.gz",
            "BraTS20_Training_001_t1.nii.gz",
            "BraTS20_Training_001_t1ce.nii.gz",
            "BraTS20_Training_001_t2.nii.gz",
        ],
    ),
    "2021": (
        "BraTS2021_00001",
        [
            "BraTS2021_00001_flair.nii.gz",
            "BraTS2021_00001_seg.nii.gz",
            "BraTS2021_00001_t1.nii.gz",
            "BraTS2021_00001_t1ce.nii.gz",
            "BraTS2021_00001_t2.nii.gz",
        ],
    ),
    "2023": (
        "BraTS-GLI-00001-000",
        [
            "BraTS-GLI-00001-000-seg.nii.gz",
            "BraTS-GLI-00001-000-t1c.nii.gz",
            "BraTS-GLI-00001-000-t1n.nii.gz",
            "BraTS-GLI-00001-000-t2f.nii.gz",
            "BraTS-GLI-00001-000-t2w.nii.gz",
        ],
    ),
}


def load(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img


def load_subject(folder: Path, layout: str = "2020") -> dict[str, np.ndarray]:
    return {m: load(folder / modality_filename(layout, folder.name, m))[0] for m in (*MODALITIES, "seg")}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), n_subjects=4, shape=SMALL, seed=3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_files_land_where_the_layout_says(tmp_path: Path, layout: str) -> None:
    folders = write_phantom_dataset(tmp_path, n_subjects=2, layout=layout, shape=SMALL)
    subject, files = EXPECTED_FILES[layout]
    assert folders == [tmp_path / subject_id(layout, 1), tmp_path / subject_id(layout, 2)]
    assert folders[0] == tmp_path / subject
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in folders)
    assert sorted(p.name for p in folders[0].iterdir()) == files
    for name in files:
        with open(folders[0] / name, "rb") as f:
            assert f.read(2) == b"\x1f\x8b", f"{name} is not gzip-compressed"
        data, _ = load(folders[0] / name)
        assert data.shape == SMALL


@pytest.mark.parametrize("layout", LAYOUTS)
def test_uncompressed_files_when_gz_is_false(tmp_path: Path, layout: str) -> None:
    (folder,) = write_phantom_dataset(tmp_path, n_subjects=1, layout=layout, shape=SMALL, gz=False)
    expected = [name.removesuffix(".gz") for name in EXPECTED_FILES[layout][1]]
    assert sorted(p.name for p in folder.iterdir()) == expected
    for name in expected:
        with open(folder / name, "rb") as f:
            assert int.from_bytes(f.read(4), "little") == 348, f"{name} is not a plain NIfTI-1 file"
        assert load(folder / name)[0].shape == SMALL


def test_subject_numbering_follows_start_and_layout() -> None:
    assert subject_id("2020", 5) == "BraTS20_Training_005"
    assert subject_id("2021", 123) == "BraTS2021_00123"
    assert subject_id("2023", 1666) == "BraTS-GLI-01666-000"
    assert modality_filename("2023", "BraTS-GLI-01666-000", "t1ce", gz=False) == "BraTS-GLI-01666-000-t1c.nii"
    assert modality_filename("2021", "BraTS2021_00123", "flair") == "BraTS2021_00123_flair.nii.gz"


def test_start_modalities_and_with_seg_choose_what_is_written(tmp_path: Path) -> None:
    folders = write_phantom_dataset(
        tmp_path, n_subjects=2, layout="2021", shape=SMALL, start=7, modalities=("t1", "t2"), with_seg=False
    )
    assert [f.name for f in folders] == ["BraTS2021_00007", "BraTS2021_00008"]
    assert sorted(p.name for p in folders[1].iterdir()) == ["BraTS2021_00008_t1.nii.gz", "BraTS2021_00008_t2.nii.gz"]


@pytest.mark.parametrize(
    "kwargs",
    [{"layout": "2019"}, {"modalities": ("flair", "dwi")}, {"shape": (64, 64)}, {"shape": (8, 64, 40)}],
)
def test_bad_arguments_are_refused_before_writing(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        write_phantom_dataset(tmp_path, n_subjects=1, **{"shape": SMALL, **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_volumes_are_int16_3d_lps_1mm(small_dataset: list[Path]) -> None:
    folder = small_dataset[0]
    for modality in (*MODALITIES, "seg"):
        data, img = load(folder / modality_filename("2020", folder.name, modality))
        assert data.shape == SMALL
        expected = np.uint8 if modality == "seg" else np.int16
        assert img.get_data_dtype() == expected and data.dtype == expected, modality
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        assert img.header.get_zooms() == (1.0, 1.0, 1.0)
        assert img.header["sform_code"] > 0 and img.header["qform_code"] > 0


def test_background_is_exactly_zero_and_the_brain_is_textured(small_dataset: list[Path]) -> None:
    for folder in small_dataset:
        vols = load_subject(folder)
        brain = vols["t1"] != 0
        # a brain the size of a real one relative to the grid (about 18% in BraTS-GLI-00001-000)
        assert 0.10 < brain.mean() < 0.30
        for modality in MODALITIES:
            data = vols[modality]
            assert np.array_equal(data != 0, brain), f"{modality}: brain mask differs from t1's"
            assert (data[brain] > 0).all(), modality
            inside = data[brain].astype(float)
            assert inside.std() > 0.05 * inside.mean(), f"{modality} is nearly constant inside the brain"
        # the skull is stripped: nothing touches the border of the grid
        for axis in range(3):
            assert not brain.take([0, -1], axis=axis).any()


def test_segmentation_labels_and_tumour_contrast(small_dataset: list[Path]) -> None:
    for folder in small_dataset:
        vols = load_subject(folder)
        seg, brain = vols["seg"], vols["t1"] > 0
        assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}
        assert not (seg[~brain] != 0).any(), "tumour labels outside the brain"
        normal = brain & (seg == 0)
        flair, t1ce = vols["flair"].astype(float), vols["t1ce"].astype(float)
        assert flair[seg == 2].mean() > 1.3 * flair[normal].mean(), "oedema is not bright on flair"
        assert t1ce[seg == 4].mean() > 1.3 * t1ce[normal].mean(), "enhancing rim is not bright on t1ce"
        # one compact tumour, not centred on the brain
        tumour = np.argwhere(seg > 0)
        centre = np.argwhere(brain).mean(axis=0)
        assert np.linalg.norm(tumour.mean(axis=0) - centre) > 2.0


def test_the_same_seed_writes_identical_data_and_another_seed_does_not(tmp_path: Path) -> None:
    a = write_phantom_dataset(tmp_path / "a", n_subjects=2, shape=SMALL, seed=11)
    b = write_phantom_dataset(tmp_path / "b", n_subjects=2, shape=SMALL, seed=11)
    c = write_phantom_dataset(tmp_path / "c", n_subjects=2, shape=SMALL, seed=12)
    # a subject depends on (seed, number) only: writing it alone gives the same data
    (d,) = write_phantom_dataset(tmp_path / "d", n_subjects=1, shape=SMALL, seed=11, start=2)
    for fa, fb, fc in zip(a, b, c):
        va, vb, vc = load_subject(fa), load_subject(fb), load_subject(fc)
        for m in va:
            assert np.array_equal(va[m], vb[m]), m
            assert not np.array_equal(va[m], vc[m]), m
        # the files themselves are byte-identical too (no timestamps in the gzip header)
        name = modality_filename("2020", fa.name, "flair")
        assert (fa / name).read_bytes() == (fb / name).read_bytes()
    vd = load_subject(d)
    assert all(np.array_equal(vd[m], load_subject(a[1])[m]) for m in vd)
    assert not np.array_equal(load_subject(a[0])["t1"], load_subject(a[1])["t1"]), "subjects are copies"


def test_largest_axial_brain_section_is_not_the_centre_slice(small_dataset: list[Path]) -> None:
    nz = SMALL[2]
    centre = {(nz - 1) // 2, nz // 2}
    for folder in small_dataset:
        area = (load_subject(folder)["t1"] > 0).sum(axis=(0, 1))
        peak = int(area.argmax())
        assert peak not in centre
        # grows and shrinks: the brain tapers well below its peak area at both ends
        occupied = np.flatnonzero(area)
        assert area[occupied[0]] < 0.5 * area[peak] and area[occupied[-1]] < 0.5 * area[peak]


def test_make_phantom_returns_the_documented_arrays() -> None:
    vols = make_phantom(np.random.default_rng(0), SMALL)
    assert sorted(vols) == sorted((*MODALITIES, "seg"))
    assert all(v.shape == SMALL for v in vols.values())
    assert all(vols[m].dtype == np.int16 for m in MODALITIES) and vols["seg"].dtype == np.uint8


def test_full_size_subject_matches_a_real_brats_case(tmp_path: Path) -> None:
    """One 240 x 240 x 155 subject, with numbers calibrated on BraTS-GLI-00001-000 (BraTS 2023)."""
    (folder,) = write_phantom_dataset(tmp_path, n_subjects=1, layout="2023", seed=1)
    vols = {m: load(folder / modality_filename("2023", folder.name, m))[0] for m in (*MODALITIES, "seg")}
    _, img = load(folder / modality_filename("2023", folder.name, "t1"))
    assert vols["t1"].shape == (240, 240, 155)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    brain = vols["t1"] > 0
    assert 1.2e6 < brain.sum() < 2.1e6  # real case: 1.64 M voxels, extent 140 x 190 x 137
    extent = np.ptp(np.argwhere(brain), axis=0) + 1
    assert (extent > (110, 160, 110)).all() and (extent < (175, 225, 155)).all(), extent
    assert int(brain.sum(axis=(0, 1)).argmax()) != 77  # the centre slice of 155
    # brain-voxel medians of the real case: flair 1010, t1 973, t1ce 2973, t2 571
    for modality, (lo, hi) in {"flair": (600, 1500), "t1": (600, 1500), "t1ce": (1800, 4200), "t2": (350, 900)}.items():
        assert lo < np.median(vols[modality][brain]) < hi, modality
    # CSF: dark on t1 and flair, bright on t2 (so the darkest t1 voxels are the brightest t2 ones)
    csf_like = brain & (vols["t1"] < np.percentile(vols["t1"][brain], 2))
    assert np.median(vols["t2"][csf_like]) > 2 * np.median(vols["t2"][brain])
    assert set(np.unique(vols["seg"]).tolist()) == {0, 1, 2, 4}

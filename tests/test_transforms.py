import nibabel as nib
import numpy as np
import pytest

from brats_gan.discover import Subject
from brats_gan.preprocess import PreprocessConfig, prepare_subject
from brats_gan.transforms import (
    InvalidVolume,
    brain_percentiles,
    load_volume,
    normalise_brain,
    pad_or_crop,
    select_slices,
)


def _blob(shape=(40, 48, 30), seed=0) -> np.ndarray:
    """An asymmetric int16 'brain' (so a wrong flip shows) on a zero background."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    inside = (x / 0.8) ** 2 + (y / 0.9) ** 2 + ((z - 0.1) / 0.7) ** 2 < 1
    vol = (500 + 800 * (x > 0.3) + 300 * y + rng.normal(0, 20, shape)) * inside
    return vol.astype(np.int16)


def _save(tmp_path, name, data, affine) -> Subject:
    folder = tmp_path / name
    folder.mkdir()
    path = folder / f"{name}_flair.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return Subject(name, {"flair": path})


def test_mirrored_storage_with_matching_affine_gives_identical_slices(tmp_path):
    vol = _blob()
    ras = np.eye(4)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = [vol.shape[0] - 1, vol.shape[1] - 1, 0]
    pir = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=float)  # axes permuted too
    a = _save(tmp_path, "S_001", vol, ras)
    b = _save(tmp_path, "S_002", vol[::-1, ::-1, :].copy(), lps)
    c = _save(tmp_path, "S_003", np.ascontiguousarray(vol.transpose(1, 2, 0)[::-1, ::-1, :]), pir)
    assert nib.aff2axcodes(pir) != ("R", "A", "S")
    cfg = PreprocessConfig(slices=6, size=64)
    out = [prepare_subject(s, cfg) for s in (a, b, c)]
    assert all(p.error is None for p in out), [p.error for p in out]
    assert np.array_equal(out[0].images, out[1].images)
    assert np.array_equal(out[0].images, out[2].images)
    assert np.array_equal(out[0].slice_index, out[2].slice_index)


def test_images_are_anterior_up_and_left_to_right(tmp_path):
    vol = np.zeros((32, 32, 10), dtype=np.int16)
    vol[2:6, 24:30, :] = 1000  # patient left (low x in RAS) and anterior (high y)
    vol[10:20, 10:20, :] = 100
    p = prepare_subject(_save(tmp_path, "S_001", vol, np.eye(4)), PreprocessConfig(slices=2, size=32))
    image = p.images[0, 0].astype(np.float32)
    bright = np.argwhere(image == image.max())
    assert bright[:, 0].max() < 8, "anterior must be at the top rows"
    assert bright[:, 1].max() < 8, "patient left (RAS -x) must be at the left columns"


def test_normalised_brain_spans_minus_one_to_one_with_background_minus_one(tmp_path):
    vol = _blob()
    p = prepare_subject(_save(tmp_path, "S_001", vol, np.eye(4)), PreprocessConfig(slices=8, size=64))
    img = p.images.astype(np.float32)
    assert p.images.dtype == np.float16 and p.images.shape == (8, 1, 64, 64)
    assert img.min() == -1.0 and img.max() == 1.0
    assert (img[..., :8, :] == -1).all(), "padding is background"
    brain = img[img > -1]
    assert 0.2 < np.median((brain + 1) / 2) < 0.8


def test_lookup_table_path_matches_float_arithmetic():
    vol = _blob().astype(np.int16)
    lo, hi = brain_percentiles(vol, (0.5, 99.5))
    via_lut = normalise_brain(vol, lo, hi).astype(np.float32)
    via_float = normalise_brain(vol.astype(np.float32), lo, hi).astype(np.float32)
    np.testing.assert_allclose(via_lut, via_float, atol=1e-3)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.uint8, np.float32])
def test_brain_percentiles_equal_numpys_exact_percentiles(dtype):
    vol = (_blob((64, 64, 40)) // (8 if dtype == np.uint8 else 1)).astype(dtype)
    for qs in [(0.5, 99.5), (2.0, 98.0), (33.3, 66.6)]:
        np.testing.assert_allclose(brain_percentiles(vol, qs), np.percentile(vol[vol != 0], qs), rtol=1e-12)


def test_pad_and_crop_are_centred():
    img = np.arange(240 * 240, dtype=np.float32).reshape(1, 240, 240)
    padded = pad_or_crop(img, 256)
    assert padded.shape == (1, 256, 256) and padded[0, 8, 8] == 0 and padded[0, 0, 0] == -1
    cropped = pad_or_crop(img, 200)
    assert cropped[0, 0, 0] == img[0, 20, 20]


def test_slice_policies():
    area = np.array([0, 1, 5, 9, 9, 9, 7, 3, 1, 0])
    assert select_slices(3, area) == slice(3, 6)  # centred on the middle of the widest plateau
    tumour = np.array([0, 0, 0, 0, 0, 0, 1, 4, 4, 0])
    assert select_slices(3, area, "tumour", tumour) == slice(6, 9)
    assert select_slices(0, area, "range", slice_range=(2, 7)) == slice(2, 7)
    with pytest.raises(InvalidVolume, match="needs a segmentation"):
        select_slices(3, area, "tumour", None)
    with pytest.raises(InvalidVolume, match="fewer than"):
        select_slices(20, area)


def test_tumour_fraction_from_segmentation(tmp_path):
    vol = _blob()
    seg = np.zeros(vol.shape, dtype=np.uint8)
    seg[15:25, 20:30, 12:15] = 2
    subject = _save(tmp_path, "S_001", vol, np.eye(4))
    nib.save(nib.Nifti1Image(seg, np.eye(4)), tmp_path / "S_001" / "S_001_seg.nii.gz")
    subject.files["seg"] = tmp_path / "S_001" / "S_001_seg.nii.gz"
    p = prepare_subject(subject, PreprocessConfig(slices=4, slice_policy="tumour", size=64))
    assert p.error is None
    assert list(p.slice_index) in ([11, 12, 13, 14], [12, 13, 14, 15])
    inside = (p.slice_index >= 12) & (p.slice_index < 15)
    assert (p.tumour_fraction[inside] > 0.05).all() and (p.tumour_fraction[~inside] == 0).all()


def _rescale_header(path, slope: float, inter: float) -> None:
    """Set the NIfTI scale slope and intercept of an uncompressed file in place; the stored values stay."""
    with open(path, "r+b") as f:
        header = nib.Nifti1Header.from_fileobj(f)
        header["scl_slope"], header["scl_inter"] = slope, inter
        f.seek(0)
        header.write_to(f)


@pytest.mark.parametrize("slope, inter", [(1.0, -100.0), (2.5, 30.0), (0.125, 0.0)])
def test_scale_slope_and_intercept_change_no_image_and_keep_the_background(tmp_path, slope, inter):
    plain = _save(tmp_path, "S_001", _blob(), np.eye(4))
    scaled_path = tmp_path / "S_002" / "S_002_flair.nii"
    scaled_path.parent.mkdir()
    nib.save(nib.Nifti1Image(_blob(), np.eye(4)), scaled_path)
    _rescale_header(scaled_path, slope, inter)
    assert (nib.load(scaled_path).dataobj.slope, nib.load(scaled_path).dataobj.inter) == (slope, inter)
    config = PreprocessConfig(slices=8, size=64)
    a = prepare_subject(plain, config)
    b = prepare_subject(Subject("S_002", {"flair": scaled_path}), config)
    assert a.error is None and b.error is None
    np.testing.assert_array_equal(a.slice_index, b.slice_index)  # the same brain, so the same slices
    np.testing.assert_array_equal(a.images, b.images)
    assert (b.images == -1).mean() > 0.3, "the background stays background"


def test_a_volume_without_zero_background_or_with_inverted_intensities_is_refused(tmp_path):
    unstripped = _save(tmp_path, "S_001", _blob() + np.int16(7), np.eye(4))
    assert "no background voxel (stored value 0)" in prepare_subject(unstripped, PreprocessConfig(slices=4)).error
    inverted = tmp_path / "inverted.nii"
    nib.save(nib.Nifti1Image(_blob(), np.eye(4)), inverted)
    _rescale_header(inverted, -1.0, 0.0)
    with pytest.raises(InvalidVolume, match="negative scale slope"):
        load_volume(inverted)


def test_constant_volume_is_refused(tmp_path):
    subject = _save(tmp_path, "S_001", np.full((20, 20, 12), 7, np.int16), np.eye(4))
    assert "constant (every voxel = 7)" in prepare_subject(subject, PreprocessConfig(slices=4)).error


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "unreadable or truncated"),
    (lambda p: p.write_bytes(b"not a nifti file at all"), "unreadable or truncated"),
    (lambda p: nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.int16), np.eye(4)), p), "expected a 3-D"),
    (lambda p: nib.save(nib.Nifti1Image(np.full((8, 8, 8), np.nan, np.float32), np.eye(4)), p), "non-finite"),
])
def test_unusable_files_are_refused_by_reason(tmp_path, make, reason):
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(_blob(), np.eye(4)), path)
    make(path)
    with pytest.raises(InvalidVolume, match=reason):
        load_volume(path)


def test_gzip_of_several_members_reads_like_one(tmp_path):
    """Some tools write .nii.gz as several gzip members (bgzip, concatenation): the same volume must come out."""
    import gzip

    subject = _save(tmp_path, "S_001", _blob(), np.eye(4))
    path = subject.files["flair"]
    plain = gzip.decompress(path.read_bytes())
    half = len(plain) // 2
    path.write_bytes(gzip.compress(plain[:half]) + gzip.compress(plain[half:]))
    data, _ = load_volume(path)
    np.testing.assert_array_equal(data, _blob())

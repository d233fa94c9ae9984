"""Per-volume transforms: small, named, composable numpy functions (one concern each).

Volumes stay in nibabel's Fortran order until the selected slab is transposed: in that order an
axial slab ``vol[:, :, a:b]`` is one contiguous block and per-slice reductions are cheap, while a
reshape or C-order copy of the whole volume costs more than the rest of the work together.
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

try:  # ISA-L inflates the same gzip 1.4-1.6x faster than zlib; decoding bounds preprocessing.
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - platforms without an isal wheel
    import zlib as _zlib

SLICE_POLICIES = ("brain", "tumour", "range")


class InvalidVolume(ValueError):
    """A volume that cannot be preprocessed; the message is the reason shown to the user."""


@dataclass(frozen=True)
class SourceVolume:
    """A decoded NIfTI file and what the store records of it (provenance): its bytes' size and SHA-256
    (of the file as stored, compressed or not), its affine and its voxel spacing."""

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    size: int
    sha256: str


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode a NIfTI-1 file into (data, affine), refusing what is not a usable 3-D MRI volume
    (:func:`read_volume`, without the provenance)."""
    volume = read_volume(path)
    return volume.data, volume.affine


def read_volume(path: str | Path) -> SourceVolume:
    """Decode a NIfTI-1 file, refusing what is not a usable 3-D MRI volume.

    The data is a read-only view on the inflated bytes, laid out by nibabel's header (dtype, offset,
    Fortran order): going through ``Nifti1Image.dataobj`` would copy the whole volume once more, which
    costs two thirds of the inflate itself. The SHA-256 of the file's bytes costs under 1 % of the
    decode (1.8 of 205 ms for a BraTS file).

    The values are the stored ones, without the header's scale slope and intercept: the per-volume
    normalisation (percentiles of the brain mapped to [-1, 1]) gives the same images for any positive
    slope and any intercept, and the background stays exactly 0 as BraTS stores it. Applied, an intercept
    of -100 turned the background into -100 and the whole volume into "brain" (wrong mask, wrong slices).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        size, digest = len(raw), hashlib.sha256(raw).hexdigest()
        if raw[:2] == b"\x1f\x8b":
            raw = inflate_gzip(raw)
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=True)
        shape = header.get_data_shape()
        data = np.frombuffer(raw, dtype=header.get_data_dtype(), count=int(np.prod(shape)),
                             offset=int(header.get_data_offset())).reshape(shape, order="F")
        slope, _ = header.get_slope_inter()
        spacing = tuple(float(z) for z in header.get_zooms()[:3])
    except Exception as err:  # gzip, header and size errors all mean the same to the user
        raise InvalidVolume(f"{path.name}: unreadable or truncated ({type(err).__name__}: {err})") from err
    if slope is not None and slope < 0:
        raise InvalidVolume(f"{path.name}: negative scale slope {slope} in the header (intensities inverted)")
    if data.ndim != 3:
        raise InvalidVolume(f"{path.name}: expected a 3-D volume, got shape {data.shape}")
    if data.dtype.kind not in "iuf":
        raise InvalidVolume(f"{path.name}: unsupported data type {data.dtype}")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise InvalidVolume(f"{path.name}: contains non-finite values (NaN or inf)")
    return SourceVolume(data, header.get_best_affine(), spacing, size, digest)


def inflate_gzip(raw: bytes) -> bytes:
    """Inflate a whole gzip file, member after member (bgzip and concatenated files have several).

    One ``decompressobj`` call per member is 12% faster than ``igzip.decompress``'s streamed reader.
    """
    inflater = _zlib.decompressobj(31)
    out = inflater.decompress(raw)
    if not inflater.eof:
        raise EOFError("compressed file ended before the end-of-stream marker was reached")
    rest = inflater.unused_data.lstrip(b"\0")  # gzip ignores zero padding after the last member
    return out + inflate_gzip(rest) if rest else out


def reorient_to_ras(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Flip/transpose voxel axes to the closest RAS orientation (views, no copy).

    A volume stored mirrored with a matching affine describes the same anatomy, so it must yield the
    same slices: after this, axis 0 runs left->right, axis 1 posterior->anterior, axis 2 inferior->superior.
    """
    orientation = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(data, orientation)


def axial_area(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Non-zero voxels per axial slice, in RAS inferior->superior order, from the volume as stored.

    Counting along the stored axial axis of the Fortran-ordered array is a free reshape; counting
    through the reoriented (possibly flipped) view would cost twice as much. A boolean ``data`` (the
    brain mask of ``brain_mask``) is summed instead, which is 3x faster than counting the raw voxels.
    """
    orientation = nib.orientations.io_orientation(affine)
    axis = int(np.flatnonzero(orientation[:, 0] == 2)[0])
    moved = np.moveaxis(data, axis, -1)
    if moved.flags.f_contiguous:
        moved = moved.reshape(-1, moved.shape[-1], order="F")
    reduce_axes = tuple(range(moved.ndim - 1))
    if data.dtype == bool:
        counts = np.add.reduce(moved, axis=reduce_axes, dtype=np.int64)
    else:
        counts = np.count_nonzero(moved, axis=reduce_axes)
    return counts[::-1] if orientation[axis, 1] < 0 else counts


def brain_mask(data: np.ndarray) -> np.ndarray:
    """The brain (non-zero) voxels, in the volume's own memory layout, for the area and percentiles to share."""
    return data != 0


def check_not_constant(data: np.ndarray, brain_area: np.ndarray, name: str) -> None:
    """An all-zero or constant volume has no brain to normalise."""
    brain = int(brain_area.sum())
    if brain == 0:
        raise InvalidVolume(f"{name}: volume is empty (every voxel is 0)")
    if brain == data.size and data.min() == data.max():
        raise InvalidVolume(f"{name}: volume is constant (every voxel = {data.flat[0]})")
    if brain == data.size:
        raise InvalidVolume(f"{name}: no background voxel (stored value 0) to tell the brain from; brats_gan "
                            f"needs skull-stripped volumes with a zero background, as BraTS stores them "
                            f"(the corner voxel holds {data.flat[0]})")


def select_slices(
    n: int,
    brain_area: np.ndarray,
    policy: str = "brain",
    tumour_area: np.ndarray | None = None,
    slice_range: tuple[int, int] | None = None,
) -> slice:
    """Choose ``n`` contiguous axial slices.

    - ``brain``: centred on the largest brain cross-section (the middle of the widest plateau);
    - ``tumour``: the window holding the most tumour voxels, ties broken towards the brain centre;
    - ``range``: exactly ``slice_range`` = (start, stop).
    """
    depth = len(brain_area)
    if policy == "range":
        if slice_range is None:
            raise ValueError("policy 'range' needs slice_range=(start, stop)")
        start, stop = slice_range
        if stop > depth:
            raise InvalidVolume(f"slice range {start}:{stop} lies outside the volume's {depth} axial slices")
        return slice(start, stop)
    if n > depth:
        raise InvalidVolume(f"volume has {depth} axial slices, fewer than the {n} requested")
    peak = np.flatnonzero(brain_area == brain_area.max())
    centre = int(peak[len(peak) // 2])
    centred_start = int(np.clip(centre - n // 2, 0, depth - n))
    if policy == "brain":
        return slice(centred_start, centred_start + n)
    if policy == "tumour":
        if tumour_area is None:
            raise InvalidVolume("slice policy 'tumour' needs a segmentation, and this subject has none")
        window = np.convolve(tumour_area, np.ones(n, dtype=np.int64), mode="valid")
        best = np.flatnonzero(window == window.max())
        start = int(best[np.argmin(np.abs(best - centred_start))])
        return slice(start, start + n)
    raise ValueError(f"unknown slice policy {policy!r}; choose from {SLICE_POLICIES}")


def brain_percentiles(
    data: np.ndarray, percentiles: tuple[float, float], mask: np.ndarray | None = None
) -> tuple[float, float]:
    """Robust intensity bounds from the brain (non-zero) voxels of the whole volume, exactly.

    Exact (as ``np.percentile``), not sampled: a sample drawn in memory order would change when a volume
    is stored mirrored, and mirrored storage must give identical slices. 8/16-bit volumes (all of
    BraTS) use a histogram, twice as fast as partitioning 1.5 M brain voxels. ``mask`` is
    ``brain_mask(data)`` when the caller already has it.
    """
    flat = data.reshape(-1, order="A")  # memory order: a view for any contiguous layout
    if mask is None:
        brain = flat[flat != 0]
    else:
        brain = flat[mask.reshape(-1, order="A")]
    domain = _lut_domain(data.dtype)
    if domain is None:
        lo, hi = np.percentile(brain, percentiles)
    else:
        lo, hi = _histogram_percentiles(brain, domain, percentiles)
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _histogram_percentiles(values: np.ndarray, domain, percentiles) -> tuple[float, float]:
    """np.percentile's linear interpolation, read off the cumulative histogram of integer values."""
    unsigned, code_values = domain
    order, sorted_values = _value_order(code_values.dtype)
    cumulative = np.cumsum(np.bincount(values.view(unsigned), minlength=len(code_values))[order])
    ranks = np.asarray(percentiles, dtype=np.float64) / 100 * (cumulative[-1] - 1)
    below, above = np.floor(ranks), np.ceil(ranks)
    v_below = sorted_values[np.searchsorted(cumulative, below, side="right")]
    v_above = sorted_values[np.searchsorted(cumulative, above, side="right")]
    return tuple(v_below + (v_above - v_below) * (ranks - below))


@functools.lru_cache(maxsize=8)
def _lut_domain(dtype: np.dtype) -> tuple[np.dtype, np.ndarray] | None:
    """For 8/16-bit integer volumes: the unsigned view type and the value of each of its codes."""
    if dtype.kind not in "iu" or dtype.itemsize > 2:
        return None
    unsigned = np.dtype(f"u{dtype.itemsize}")
    values = np.arange(2 ** (8 * dtype.itemsize), dtype=unsigned).view(dtype)
    values.flags.writeable = False
    return unsigned, values


@functools.lru_cache(maxsize=8)
def _value_order(dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The codes of an 8/16-bit type sorted by the value they stand for, and those values as float64."""
    values = _lut_domain(dtype)[1]
    order = np.argsort(values, kind="stable")
    return order, values[order].astype(np.float64)


def normalise_brain(images: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip the brain to [lo, hi] and scale it to [-1, 1] as float16; background (exactly 0) becomes -1.

    8/16-bit integer volumes (all of BraTS) go through a lookup table: one gather per voxel replaces
    six float passes, and it yields float16 directly.
    """
    domain = _lut_domain(images.dtype)
    if domain is not None:
        unsigned, values = domain
        table = _scale(values.astype(np.float32), lo, hi)
        table[values == 0] = -1.0
        return np.take(table.astype(np.float16), images.view(unsigned), mode="clip")  # every code has an entry; "clip" skips the bounds check
    out = _scale(images.astype(np.float32), lo, hi)
    out[images == 0] = -1.0
    return out.astype(np.float16)


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    np.clip(values, lo, hi, out=values)
    values -= lo
    values *= 2.0 / (hi - lo)
    values -= 1.0
    return values


def axial_images(slab: np.ndarray) -> np.ndarray:
    """(x, y, z) RAS slab -> (z, rows, cols) images, anterior at the top, patient left at the left."""
    return np.flip(slab.transpose(2, 1, 0), axis=1)


def pad_or_crop(images: np.ndarray, size: int, fill: float = -1.0, dtype: np.dtype = np.float16) -> np.ndarray:
    """Centre-pad or centre-crop the last two axes to size x size (BraTS 240 x 240 -> 256 x 256)."""
    out = np.full(images.shape[:-2] + (size, size), fill, dtype=dtype)
    src, dst = [], []
    for length in images.shape[-2:]:
        if length <= size:
            offset = (size - length) // 2
            src.append(slice(0, length))
            dst.append(slice(offset, offset + length))
        else:
            offset = (length - size) // 2
            src.append(slice(offset, offset + size))
            dst.append(slice(0, size))
    out[..., dst[0], dst[1]] = images[..., src[0], src[1]]
    return out


def pixel_to_voxel(affine: np.ndarray, shape: tuple[int, ...], size: int) -> np.ndarray:
    """The 4x4 map from a stored pixel ``(column, row, slice_index, 1)`` to the voxel ``(i, j, k, 1)`` of
    the source file it was read from (integer-valued): the inverse of :func:`reorient_to_ras`,
    :func:`axial_images` and :func:`pad_or_crop` together, so that a stored slice can be put back onto
    the source voxel grid (``affine @ pixel_to_voxel`` gives scanner millimetres). A pixel whose voxel lies
    outside ``shape`` is padding (-1)."""
    orientation = nib.orientations.io_orientation(affine)
    x, y, _ = nib.orientations.apply_orientation(np.empty(shape, np.int8), orientation).shape
    offsets = [(size - n) // 2 if n <= size else -((n - size) // 2) for n in (x, y)]
    pixel_to_ras = np.array([[1, 0, 0, -offsets[0]], [0, -1, 0, y - 1 + offsets[1]], [0, 0, 1, 0], [0, 0, 0, 1]],
                            dtype=np.float64)
    return nib.orientations.inv_ornt_aff(orientation, shape) @ pixel_to_ras


def source_slices(voxel_map: np.ndarray, slice_index: np.ndarray) -> tuple[int, np.ndarray]:
    """The source file's voxel axis that stored slices cut across, and each slice's index along it."""
    axis = int(np.flatnonzero(voxel_map[:3, 2])[0])
    return axis, (voxel_map[axis, 2] * np.asarray(slice_index) + voxel_map[axis, 3]).round().astype(np.int32)


def orientation_codes(affine: np.ndarray) -> str:
    """The file's voxel axes as the anatomical directions they point to (nibabel's codes, e.g. ``LPS``);
    brats_gan reorients every volume to ``RAS`` before slicing."""
    return "".join(nib.orientations.aff2axcodes(affine))

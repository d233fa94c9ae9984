"""The slice store: a Zarr v3 group that other projects read with xarray, zarr or any Zarr v3 reader alone.

The contract (also in the README, "The store"), format_version 2. Every array holds a core Zarr v3 data
type (numbers only: TensorStore and zarrs refuse zarr-python's variable-length strings); names live in the
group attributes, and :func:`open_store` puts them back as xarray coordinates.

- ``image``: float16, dims ``(sample, channel, y, x)``, values in [-1, 1], background -1.
  Rows run anterior -> posterior and columns patient left -> right (RAS +x), so ``image[i, c]``
  shows an axial slice seen from the feet, anterior at the top.
- along ``sample``: ``subject`` (int32: row of the subject table ``subject_names``; -1 until written),
  ``slice_index`` (int16, axial index in the RAS-reoriented volume), ``tumour_fraction`` (float32: tumour
  voxels / brain voxels of the slice, NaN where the subject had no segmentation), ``source_slice``
  (int32, ``(sample, channel)``: the slice's index along the cut voxel axis of that channel's source file).
- along ``source`` (one row per subject of the table; preprocessed stores only): ``pixel_to_voxel``
  (float64 4x4 per channel: stored pixel ``(column, row, slice_index, 1)`` -> source voxel ``(i, j, k, 1)``),
  ``source_affine`` (the file's NIfTI affine, ``header.get_best_affine()``), ``voxel_spacing`` (mm),
  ``source_shape`` (int32) and ``intensity_window`` (the brain percentiles mapped to -1 and 1).
- shards hold one subject's slices (the unit a preprocessing task writes, so no two tasks ever
  touch the same shard); chunks, the unit of reading, hold 8 samples (the paper's micro-batch; the
  largest divisor of the slices per subject up to 8). Measured on a 48-slice subject: one-sample
  chunks cost 2x the write time and 2.5x the time to read a subject back, for 1.1 vs 1.4 ms to read
  a single sample. Compression: zstd level 1 (level 3 costs 40% more write time for the same size).
- group attributes: ``format``, ``format_version``, ``tool_version``, ``params`` (every
  preprocessing parameter), ``subject_names`` (the subject table), ``channel_names``, ``sources`` (per
  subject: each file's path relative to the input folder, bytes, SHA-256, orientation and cut axis),
  ``input_folder`` (its name), ``subjects_planned``, ``skipped`` (``[{"subject", "reason"}]``),
  ``synthetic``, ``shard_crc32`` (each shard's CRC-32 as written; ``brats_gan.verify`` compares it) and,
  written last, ``complete: true``. ``brats_gan.store_writer`` is the one code that writes them.
- synthetic stores (`brats-gan generate`) keep the per-sample arrays and attributes, with ``synthetic:
  true``, a ``checkpoint`` attribute (run, step, preset, weights: ema or raw, the weights file's SHA-256,
  the model), one subject per image (``synthetic-step<N>-seed<S>-<i>``), ``slice_index`` and
  ``source_slice`` -1, ``tumour_fraction`` NaN, no ``source`` arrays, and shards of 64 samples.
- format_version 1 (brats_gan before issue 20) stored ``subject`` and a ``channel`` array as
  variable-length strings and no provenance; it is still read everywhere (:func:`read_summary`,
  :func:`open_store`, :func:`sample_subjects`).

Which outputs may be written where is decided here too, once for every command: a store replaces only a
store brats_gan wrote (``check_output``), a PNG only a PNG brats_gan drew (``check_png_output``), and no
output of any kind goes inside an existing Zarr store, which its writer replaces whole
(``check_outside_stores``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import xarray

FORMAT = "brats_gan.slices"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: subjects and channels as variable-length strings, no provenance
IMAGE = "image"
DIMS = ("sample", "channel", "y", "x")
SAMPLE_COORDS = ("subject", "slice_index", "tumour_fraction", "source_slice")
#: per (subject, channel) arrays of a preprocessed store: name -> (dims, dtype, sizes of the trailing dims)
SOURCE_ARRAYS: dict[str, tuple[tuple[str, ...], str, tuple[int, ...]]] = {
    "pixel_to_voxel": (("source", "channel", "matrix_row", "matrix_column"), "float64", (4, 4)),
    "source_affine": (("source", "channel", "matrix_row", "matrix_column"), "float64", (4, 4)),
    "voxel_spacing": (("source", "channel", "axis"), "float64", (3,)),
    "source_shape": (("source", "channel", "axis"), "int32", (3,)),
    "intensity_window": (("source", "channel", "bound"), "float64", (2,)),
}
LEGACY_ARRAYS = ("channel",)  # format 1's, still its writer's own files when such a store is replaced
NO_SUBJECT = -1  # the ``subject`` code of a sample not written yet
PROGRESS_GROUP = "progress"


def now_utc() -> str:
    """The ``created`` attribute's format (UTC, to the second); run files use it too."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def chunk_samples(slices_per_subject: int, most: int = 8) -> int:
    """Samples per chunk: the largest divisor of a subject's slices up to ``most``, so chunks tile shards."""
    return max(d for d in range(1, most + 1) if slices_per_subject % d == 0)


class StoreError(ValueError):
    """A store that cannot be used as asked; the message says why and what to do."""


@dataclass(frozen=True)
class StoreSummary:
    """What `brats-gan info` prints and the trainer checks before any rank starts."""

    path: str
    complete: bool
    n_samples: int
    n_subjects: int
    channels: tuple[str, ...]
    image_shape: tuple[int, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    dtype: str
    attrs: dict[str, Any]

    @property
    def shard_length(self) -> int:
        """Samples per shard (one subject's slices in a real store, 64 in a synthetic one)."""
        return self.shards[0] if self.shards else self.n_samples

    @property
    def n_shards(self) -> int:
        return -(-self.n_samples // self.shard_length) if self.n_samples else 0


@contextlib.contextmanager
def quiet_consolidated_warning() -> Iterator[None]:
    """Consolidated metadata is an extension that other v3 readers simply ignore; keep it, quietly."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        yield


def check_format(path: str | os.PathLike[str], attrs: dict[str, Any]) -> int:
    """The format_version of a slice store's attributes, or a StoreError saying why it cannot be read."""
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{path}: not a brats_gan slice store (attribute format={attrs.get('format')!r})")
    version = attrs.get("format_version")
    if version not in READABLE_VERSIONS:
        raise StoreError(
            f"{path}: store format_version {version} but this brats_gan reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; use the brats_gan that wrote it, or re-run "
            "`brats-gan preprocess` with this version"
        )
    return int(version)


def _open_group(path: str | os.PathLike[str]) -> Any:
    import zarr

    try:
        with quiet_consolidated_warning():
            return zarr.open_group(str(path), mode="r")
    except FileNotFoundError as err:
        raise StoreError(f"{path}: no Zarr store here") from err
    except Exception as err:  # zarr raises several types for "not a group"
        raise StoreError(f"{path}: not a readable Zarr v3 group ({err})") from err


def channel_names(group: Any, attrs: dict[str, Any]) -> tuple[str, ...]:
    """The stored channels' modality names: the ``channel_names`` attribute, or format 1's ``channel`` array."""
    if "channel_names" in attrs:
        return tuple(str(c) for c in attrs["channel_names"])
    return tuple(str(c) for c in group["channel"][:]) if "channel" in group else ()


def sample_subjects(group: Any, attrs: dict[str, Any] | None = None) -> np.ndarray:
    """Each sample's subject name (object array; "" for a sample not written yet), whichever format:
    format 2's codes looked up in ``subject_names``, format 1's strings as stored."""
    import numpy as np

    attrs = dict(group.attrs) if attrs is None else attrs
    if "subject" not in group:
        return np.array([], dtype=object)
    values = group["subject"][:]
    if values.dtype.kind in "iu":
        return subject_table(attrs)[values]
    return np.array([str(v) for v in values], dtype=object)


def subject_table(attrs: dict[str, Any]) -> np.ndarray:
    """``subject_names`` as an object array indexed by code, with "" at index -1 (``NO_SUBJECT``)."""
    import numpy as np

    return np.array([*(str(n) for n in attrs.get("subject_names", [])), ""], dtype=object)


def read_summary(path: str) -> StoreSummary:
    """Read the store's metadata (no pixels) and check it is a slice store of a format this version reads."""
    group = _open_group(path)
    attrs = dict(group.attrs)
    check_format(path, attrs)
    image = group[IMAGE]
    shards = image.shards if getattr(image, "shards", None) else None
    subjects = sample_subjects(group, attrs)
    return StoreSummary(
        path=str(path),
        complete=bool(attrs.get("complete", False)),
        n_samples=int(image.shape[0]),
        n_subjects=len({s for s in subjects if s}),
        channels=channel_names(group, attrs),
        image_shape=tuple(image.shape),
        chunks=tuple(image.chunks),
        shards=tuple(shards) if shards else None,
        dtype=str(image.dtype),
        attrs=attrs,
    )


def open_store(path: str | os.PathLike[str]) -> xarray.Dataset:
    """The store as a labelled ``xarray.Dataset``, whichever format wrote it (pixels stay lazy).

    ``subject`` (per sample) and ``channel`` hold names; ``subject_code`` is each sample's row of the
    subject table, which is also its row of the per-source arrays (``pixel_to_voxel``, ...), whose
    ``source`` dimension is labelled with the subject names. Without brats_gan, the same names are
    ``numpy.array(ds.attrs["subject_names"])[ds.subject.values]`` and ``ds.attrs["channel_names"]``.
    """
    import numpy as np
    import xarray as xr

    group = _open_group(path)
    attrs = dict(group.attrs)
    version = check_format(path, attrs)
    with quiet_consolidated_warning():
        ds = xr.open_zarr(str(path))
    if version == 1:
        names = np.array([str(v) for v in ds.subject.values], dtype=object)
        _, first, inverse = np.unique(names, return_index=True, return_inverse=True)
        codes = np.argsort(np.argsort(first)).astype(np.int32)[inverse]  # in order of first appearance
    else:
        codes = ds.subject.values
        names = subject_table(attrs)[codes]
    coords: dict[str, Any] = {"subject_code": ("sample", codes), "subject": ("sample", names)}
    channels = channel_names(group, attrs)
    if channels:
        coords["channel"] = ("channel", np.array(channels, dtype=object))
    if "source" in ds.dims and ds.sizes["source"] == len(attrs.get("subject_names", ())):
        coords["source"] = ("source", np.array(attrs["subject_names"], dtype=object))
    return ds.assign_coords(coords)


def sample_provenance(path: str | os.PathLike[str], sample: int) -> dict[str, Any]:
    """Where one stored sample came from, as JSON-ready data: its subject, ``slice_index`` and, per channel,
    the source file (path relative to the input folder, bytes, SHA-256), its orientation, the voxel axis
    the slice cuts and the slice's index along it, the affine, voxel spacing, shape, intensity window and
    the pixel -> voxel map. A synthetic sample names the checkpoint it was drawn from instead; a store
    written before provenance was recorded (format 1) says so (``sources`` None)."""
    group = _open_group(path)
    attrs = dict(group.attrs)
    version = check_format(path, attrs)
    n = int(group[IMAGE].shape[0])
    if not 0 <= sample < n:
        raise StoreError(f"sample {sample} is not in {path}, which holds {n} samples (0 to {n - 1})")
    code = int(group["subject"][sample]) if version >= 2 else None
    record: dict[str, Any] = {
        "store": str(path), "sample": sample, "format_version": version,
        "subject": str(sample_subjects(group, attrs)[sample]),
        "subject_code": None if code is None else int(code),
        "slice_index": int(group["slice_index"][sample]),
        "tumour_fraction": _json_float(group["tumour_fraction"][sample]),
        "synthetic": bool(attrs.get("synthetic")),
    }
    if record["synthetic"]:
        record["checkpoint"] = attrs.get("checkpoint")
        record["seed"] = attrs.get("seed")
    sources = attrs.get("sources")
    if record["synthetic"] or code is None or code < 0 or not sources or "pixel_to_voxel" not in group:
        record["sources"] = None
        return record
    record["input_folder"] = attrs.get("input_folder")
    files = sources[code]["files"]
    arrays = {name: group[name][code] for name in SOURCE_ARRAYS}
    along = group["source_slice"][sample]
    record["sources"] = [
        {"channel": channel, **files[channel], "source_slice": int(along[c]),
         "affine": arrays["source_affine"][c].tolist(), "voxel_spacing": arrays["voxel_spacing"][c].tolist(),
         "source_shape": arrays["source_shape"][c].tolist(), "intensity_window": arrays["intensity_window"][c].tolist(),
         "pixel_to_voxel": arrays["pixel_to_voxel"][c].tolist()}
        for c, channel in enumerate(channel_names(group, attrs))
    ]
    if "seg" in files:
        record["segmentation"] = files["seg"]
    return record


def _json_float(value: Any) -> float | None:
    import math

    value = float(value)
    return None if math.isnan(value) else value


def written_by_brats_gan(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The attributes of a store brats_gan wrote at ``path`` (complete or not), read from the group's own
    ``zarr.json``; None for anything else. Only such a store may ever be replaced."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    attrs = meta.get("attributes") if isinstance(meta, dict) and meta.get("node_type") == "group" else None
    return attrs if isinstance(attrs, dict) and attrs.get("format") == FORMAT else None


def check_output(out: str | os.PathLike[str], *, overwrite: bool, resume: bool = False,
                 keep: Sequence[str | os.PathLike[str]] = (), synthetic_only: bool = False,
                 flag: str = "--out") -> None:
    """Refuse, before any work, an ``out`` that cannot be written or must not be replaced.

    ``--overwrite`` deletes only a store brats_gan wrote itself (by its attributes; with
    ``synthetic_only``, only a synthetic one), never a folder holding one of ``keep`` (the inputs),
    never anything else; a path that is a file, inside another store, or whose folder is not writable
    is refused too.
    """
    path = Path(out)
    if path.is_file():
        raise StoreError(f"{flag} {path} is a file, not a store folder; choose a new folder name")
    resolved = path.resolve()
    for precious in keep:
        precious = Path(precious).resolve()
        if resolved == precious or resolved in precious.parents:
            raise StoreError(f"{flag} {path} holds the input {precious}; a store is never written over its "
                             "input: choose another --out")
    check_outside_stores(path, flag)
    if path.exists():
        if not (overwrite or resume):
            return  # the caller refuses an existing store in its own words (resume, overwrite)
        attrs = written_by_brats_gan(path)
        what = "a synthetic store" if synthetic_only else "a store"
        if resume and not overwrite and attrs is None:
            raise StoreError(f"{flag} {path} exists and is not a store brats_gan wrote; --resume continues only "
                             "a store that `brats-gan preprocess` started")
        if overwrite and (attrs is None or (synthetic_only and attrs.get("synthetic") is not True)):
            raise StoreError(f"{flag} {path} exists and is not {what} brats_gan wrote; --overwrite only replaces "
                             f"{what} brats_gan wrote, never anything else: move it away or choose another --out")
        _check_writable(path, path, flag)
    else:
        _check_writable(path, nearest_existing(path), flag)


ZARR_NODE_FILES = ("zarr.json", ".zgroup", ".zarray")  # a Zarr v3 node, or a v2 group or array


def enclosing_store(path: str | os.PathLike[str]) -> Path | None:
    """The nearest folder above ``path`` (links resolved) that is a Zarr store, group or array, or None."""
    for parent in Path(path).resolve().parents:
        if any((parent / name).is_file() for name in ZARR_NODE_FILES):
            return parent
    return None


def check_outside_stores(out: str | os.PathLike[str], flag: str = "--out",
                         error: type[Exception] = StoreError) -> None:
    """Refuse (with ``error``) an output inside an existing Zarr store: a store belongs to its writer,
    which replaces it whole (`preprocess --overwrite` deletes the folder), so a run, a synthetic store or
    a PNG put there would be deleted with it without a word."""
    store = enclosing_store(out)
    if store is not None:
        raise error(f"{flag} {out} is inside the Zarr store {store}, which is replaced whole when it is "
                    "rewritten (everything inside is deleted with it): choose a path outside the store")


PNG_SOFTWARE = "brats_gan"  # the start of the ``Software`` text chunk of every PNG brats_gan draws


def drawn_by_brats_gan(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a PNG whose ``Software`` text chunk names brats_gan, as ``brats_gan.images`` marks
    every PNG it writes: only such a file may ever be replaced. Pillow reads the chunks before the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path, formats=["PNG"]) as image:
            return str(image.info.get("Software", "")).startswith(PNG_SOFTWARE)
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def check_png_output(out: str | os.PathLike[str], flag: str) -> None:
    """Refuse, before any work, a PNG output that is not a ``.png`` name, is a folder, would replace a
    file brats_gan did not draw, lies inside a Zarr store or cannot be written."""
    path = Path(out)
    if path.is_dir():
        raise StoreError(f"{flag} {path} is a folder; name the PNG file to write, e.g. {path / 'image.png'}")
    if path.suffix.lower() != ".png":
        raise StoreError(f"{flag} {path}: not a .png name; this output is a PNG image: choose a name ending in .png")
    if (path.exists() or path.is_symlink()) and not (path.is_file() and drawn_by_brats_gan(path)):
        raise StoreError(f"{flag} {path} exists and is not a PNG brats_gan drew; brats_gan replaces only its own "
                         "PNGs: move it away or choose another name")
    check_outside_stores(path, flag)
    _check_writable(path, nearest_existing(path.parent), flag)


def check_folder_output(out: str | os.PathLike[str], flag: str) -> None:
    """Refuse, before any work, an output folder that is a file, lies inside a Zarr store or cannot be
    written (files are then added to it: the caller decides which of them it may replace)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{flag} {path} exists and is not a folder; choose a folder name")
    check_outside_stores(path, flag)
    _check_writable(path, nearest_existing(path), flag)


def nearest_existing(path: str | os.PathLike[str]) -> Path:
    """``path`` if it exists, else the nearest folder above it that does (where it would be written)."""
    path = Path(path)
    return next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())


def _check_writable(path: Path, folder: Path, flag: str) -> None:
    """``folder`` (``path`` itself or the nearest existing folder above it) must be a writable folder."""
    if not folder.is_dir():
        raise StoreError(f"{flag} {path}: {folder} is a file, not a folder; choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        reason = "a read-only file system" if _read_only(folder) else "no write permission"
        raise StoreError(f"{flag} {path}: cannot write in {folder} ({reason})")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def require_complete(path: str) -> StoreSummary:
    """The summary of a finished store, or a StoreError that says how to finish it: the advice of the
    writer that started it (``generate`` records the checkpoint it drew from, ``preprocess`` does not)."""
    summary = read_summary(path)
    if not summary.complete:
        checkpoint = summary.attrs.get("checkpoint")
        if isinstance(checkpoint, dict):
            run = checkpoint.get("run") or "RUN"
            raise StoreError(
                f"{path}: store is not marked complete (generate was interrupted or failed); write it again "
                f"with `brats-gan generate --checkpoint {run} --out {path} --overwrite ...`"
            )
        raise StoreError(
            f"{path}: store is not marked complete (preprocessing was interrupted or failed); "
            "finish it with `brats-gan preprocess ... --resume`"
        )
    return summary

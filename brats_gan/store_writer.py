"""Writing slice stores: the one place that lays out a new store of the schema (skeleton and attributes),
records its checksums and seals it complete. `brats-gan preprocess`, `brats-gan generate` and the tests'
store factory all write through it, so real and synthetic stores are laid out alike; ``schema`` says what
a store holds, this module how one comes to hold it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from brats_gan import __version__, schema


def new_attrs(*, params: dict[str, Any], synthetic: bool, **extra: Any) -> dict[str, Any]:
    """The group attributes a store starts with (``schema`` documents each); ``complete`` stays false
    until :func:`seal`."""
    return {"format": schema.FORMAT, "format_version": schema.FORMAT_VERSION, "tool_version": __version__,
            "created": schema.now_utc(), "params": params, "skipped": [], "synthetic": synthetic, **extra,
            "complete": False}


def subject_codes(subject: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Per-sample names -> (int32 codes, the table of names in order of first appearance); "" (a sample
    not written yet) gets ``schema.NO_SUBJECT``."""
    table: dict[str, int] = {}
    codes = np.fromiter((schema.NO_SUBJECT if not name else table.setdefault(str(name), len(table))
                         for name in subject), dtype=np.int32, count=len(subject))
    return codes, list(table)


def write_skeleton(
    path: str,
    *,
    channels: Sequence[str],
    size: int,
    shard: int,
    attrs: dict[str, Any],
    subject: Sequence[str],
    slice_index: np.ndarray | None = None,
    tumour_fraction: np.ndarray | None = None,
    sources: int = 0,
) -> None:
    """A store of the schema with its coordinates and attributes but no pixels written yet.

    ``subject`` holds each sample's subject name ("" where not known yet): it is stored as int32 codes
    into the ``subject_names`` attribute, and the channels' names as ``channel_names``, so every array
    holds a core Zarr v3 data type. ``sources`` > 0 adds the per-source provenance arrays with that
    many rows (placeholders: NaN, 0). ``image`` gets shards of ``shard`` samples (the unit its writer
    fills), chunks of up to 8 of them and zstd level 1; coordinates default to the placeholders ``-1``
    and NaN. `preprocess` (shard = one subject) and `generate` both start here, so real and synthetic
    stores are laid out alike.
    """
    import dask.array as da
    import xarray as xr
    from zarr.codecs import ZstdCodec

    n, c = len(subject), len(channels)
    codes, names = subject_codes(subject)
    image = da.zeros((n, c, size, size), dtype=np.float16, chunks=(shard, c, size, size))
    coords: dict[str, Any] = {
        "subject": ("sample", codes),
        "slice_index": ("sample", np.full(n, -1, dtype=np.int16) if slice_index is None
                        else np.asarray(slice_index, dtype=np.int16)),
        "tumour_fraction": ("sample", np.full(n, np.nan, dtype=np.float32) if tumour_fraction is None
                            else np.asarray(tumour_fraction, dtype=np.float32)),
        "source_slice": (("sample", "channel"), np.full((n, c), -1, dtype=np.int32)),
    }
    for name, (dims, dtype, trailing) in (schema.SOURCE_ARRAYS.items() if sources else ()):
        fill = np.nan if np.dtype(dtype).kind == "f" else 0
        coords[name] = (dims, np.full((sources, c, *trailing), fill, dtype=dtype))
    ds = xr.Dataset({schema.IMAGE: (schema.DIMS, image)}, coords=coords,
                    attrs={**attrs, "subject_names": names, "channel_names": list(channels)})
    encoding = {schema.IMAGE: {
        "chunks": (schema.chunk_samples(shard), c, size, size),
        "shards": (shard, c, size, size),
        "compressors": [ZstdCodec(level=1)],
    }}
    with schema.quiet_consolidated_warning():
        ds.to_zarr(path, mode="w", compute=False, zarr_format=3, encoding=encoding, consolidated=True)


def seal(path: str, shard_crc32: Sequence[int] | None = None, **attrs: Any) -> None:
    """The last attributes (the checksums ``brats_gan.verify`` compares, final counts), consolidated
    metadata, then ``complete: true``: last, so that a store marked complete is one whose every array
    and attribute was written."""
    import zarr

    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    if shard_crc32 is not None:
        attrs["shard_crc32"] = [int(c) for c in shard_crc32]
    if attrs:
        group.attrs.update(attrs)
    with schema.quiet_consolidated_warning():
        zarr.consolidate_metadata(path)
    zarr.open_group(path, mode="r+").attrs["complete"] = True

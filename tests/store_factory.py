"""Small slice stores that follow ``brats_gan/schema.py``, written through ``brats_gan.store_writer`` like
the real ones, and read back the way a user without brats_gan reads them.

The trainer's tests need stores of a chosen size in well under a second, without BraTS data or the
Dask preprocessing. ``write_store`` draws a bright ellipse ("brain") with a darker blob ("tumour")
on a -1 background, so sample grids look like something and every sample differs.

Each drawn sample carries its own id in pixel (0, 0, 0) of channel 0 (``sample_id``), so tests can tell
exactly which stored samples a loader returned, whatever the shuffling. Given ``images``, the store
holds exactly those instead (the evaluation tests' fixed image sets).

``format_version=1`` writes the layout of brats_gan before issue 20 (subjects and a ``channel`` array as
variable-length strings, no provenance), with a small writer of its own (``_write_format_1``, tests only),
so that the tests can check such stores keep working.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from brats_gan import schema, store_writer
from brats_gan.verify import shard_checksum

ID_SCALE = 1 / 1024  # float16 represents k / 1024 exactly for k < 2048


def sample_id(pixel: float) -> int:
    """The id a sample was written with, from its stored pixel (0, 0, 0) (store resolution)."""
    return round((float(pixel) + 1.0) / ID_SCALE)


def _phantom(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    ry, rx = rng.uniform(0.3, 0.42, 2)
    brain = (yy / ry) ** 2 + (xx / rx) ** 2 < 1
    cy, cx = rng.uniform(-0.15, 0.15, 2)
    tumour = ((yy - cy) ** 2 + (xx - cx) ** 2) < rng.uniform(0.003, 0.02)
    img = np.full((size, size), -1.0, dtype=np.float32)
    img[brain] = rng.uniform(0.0, 0.4) + 0.1 * np.sin(20 * xx[brain])
    img[tumour & brain] = 0.9
    return img


def write_store(
    path: str | Path,
    *,
    subjects: int | Sequence[str] = 3,
    slices: int = 8,
    channels: Sequence[str] = ("flair",),
    size: int = 256,
    images: np.ndarray | None = None,
    synthetic: bool = True,
    complete: bool = True,
    seed: int = 0,
    format_version: int = schema.FORMAT_VERSION,
) -> Path:
    """A store of ``subjects x slices`` samples; shard = one subject's slices, chunks as ``schema`` says.

    ``subjects``: how many (ids ``BraTS-TEST-00000``, ...) or the ids themselves, each holding ``slices``
    consecutive samples. ``images`` (``(subjects x slices, channels, size, size)``, stored as float16):
    the pixels, exactly; without them, phantoms carrying their ``sample_id`` are drawn.
    """
    import zarr

    rng = np.random.default_rng(seed)
    ids = [f"BraTS-TEST-{s:05d}" for s in range(subjects)] if isinstance(subjects, int) else list(subjects)
    n, c = len(ids) * slices, len(channels)
    if images is None:
        if n > 2047:
            raise ValueError("sample ids are stored in float16 and must stay below 2048")
        image = np.empty((n, c, size, size), dtype=np.float16)
        for i in range(n):
            for j in range(c):
                image[i, j] = _phantom(rng, size)
            image[i, 0, 0, 0] = -1.0 + i * ID_SCALE
    else:
        size = images.shape[-1]
        if images.shape != (n, c, size, size):
            raise ValueError(f"images of shape {images.shape} for {len(ids)} subjects x {slices} slices "
                             f"and {c} channel(s)")
        image = images.astype(np.float16)
    params = {"size": size, "slices": slices, "modalities": list(channels), "factory_seed": seed}
    write = store_writer.write_skeleton if format_version == schema.FORMAT_VERSION else _write_format_1
    write(
        str(path), channels=channels, size=size, shard=slices, subject=np.repeat(np.array(ids, dtype=object), slices),
        slice_index=np.tile(np.arange(60, 60 + slices, dtype=np.int16), len(ids)),
        tumour_fraction=rng.uniform(0, 0.1, n).astype(np.float32),
        attrs=store_writer.new_attrs(params=params, synthetic=synthetic, subjects_planned=ids),
    )
    zarr.open_group(str(path), mode="r+", use_consolidated=False)[schema.IMAGE][:] = image
    if complete:
        store_writer.seal(str(path), shard_crc32=[shard_checksum(image[a : a + slices]) for a in range(0, n, slices)])
    return Path(path)


def _write_format_1(path: str, *, channels: Sequence[str], size: int, shard: int, attrs: dict, subject: np.ndarray,
                    slice_index: np.ndarray, tumour_fraction: np.ndarray) -> None:
    """The skeleton brats_gan 0.1 wrote (format_version 1): ``subject`` and ``channel`` as zarr-python's
    variable-length strings, no subject table, channel names or provenance."""
    import dask.array as da
    import xarray as xr
    from zarr.codecs import ZstdCodec

    n, c = len(subject), len(channels)
    image = da.zeros((n, c, size, size), dtype=np.float16, chunks=(shard, c, size, size))
    ds = xr.Dataset(
        {schema.IMAGE: (schema.DIMS, image)},
        coords={"subject": ("sample", np.asarray(subject, dtype=object)),
                "slice_index": ("sample", np.asarray(slice_index, dtype=np.int16)),
                "tumour_fraction": ("sample", np.asarray(tumour_fraction, dtype=np.float32)),
                "channel": ("channel", np.array(list(channels), dtype=object))},
        attrs={**attrs, "format_version": 1},
    )
    encoding = {schema.IMAGE: {"chunks": (schema.chunk_samples(shard), c, size, size), "shards": (shard, c, size, size),
                               "compressors": [ZstdCodec(level=1)]}}
    with schema.quiet_consolidated_warning():
        ds.to_zarr(path, mode="w", compute=False, zarr_format=3, encoding=encoding, consolidated=True)


@pytest.fixture(scope="session")
def store_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``store_factory(**write_store_kwargs)`` -> path; equal arguments give the same (cached) store.
    (Stores of given ``images`` are not cached: write those with ``write_store``.)"""
    made: dict[tuple, Path] = {}

    def make(**kwargs) -> Path:
        key = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in kwargs.items()))
        if key not in made:
            made[key] = write_store(tmp_path_factory.mktemp("store") / "slices.zarr", **kwargs)
        return made[key]

    return make


# What a user with xarray and zarr, but not brats_gan, sees of stores; any warning while reading fails it.
DESCRIBE_WITHOUT_BRATS_GAN = r"""
import json, sys, warnings
warnings.simplefilter("error")
import numpy as np, xarray as xr, zarr
out = []
for path in sys.argv[1:]:
    ds = xr.open_zarr(path)
    g = zarr.open_group(path, mode="r")
    subjects = np.array(ds.attrs["subject_names"])[ds.subject.values]  # the README's way: codes into the table
    img = ds.image.values.astype("float32")
    out.append({
        "dims": list(ds.image.dims), "dtype": str(ds.image.dtype), "shape": list(img.shape),
        "sizes": dict(ds.sizes), "chunks": list(g["image"].chunks),
        "coords": {k: [list(v.dims), str(v.dtype)] for k, v in ds.coords.items()},
        "zarr_types": {k: str(g[k].metadata.data_type) for k in sorted(g.array_keys())},
        "min": float(img.min()), "max": float(img.max()), "nan": int(np.isnan(img).sum()),
        "background": float((img == -1).mean()),
        "subjects": sorted(set(subjects.tolist())), "slice_index": ds.slice_index.values.tolist(),
        "channels": ds.attrs["channel_names"],
        "tumour_fraction_nan": bool(np.isnan(ds.tumour_fraction.values).all()),
        "attrs": dict(ds.attrs),
    })
for seen in out:
    seen["brats_gan_imported"] = "brats_gan" in sys.modules
print(json.dumps(out))
"""


def read_without_brats_gan(*stores: Path) -> list[dict]:
    """What one fresh interpreter with only xarray, zarr and numpy reads of each store, in order; each
    description also says whether brats_gan got imported by the time all were read."""
    done = subprocess.run([sys.executable, "-c", DESCRIBE_WITHOUT_BRATS_GAN, *map(str, stores)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def phantoms(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Ellipse "brains" with a smooth intensity gradient and a bright blob, on a -1 background, (n, 1, s, s)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    out = np.full((n, 1, size, size), -1.0, dtype=np.float32)
    for i in range(n):
        ry, rx = rng.uniform(0.3, 0.42, 2)
        oy, ox = rng.uniform(-0.05, 0.05, 2)  # off-centre: a shape symmetric about a pixel has extra Nyquist energy
        brain = ((yy - oy) / ry) ** 2 + ((xx - ox) / rx) ** 2 < 1
        cy, cx = rng.uniform(-0.15, 0.15, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(0.002, 0.01))
        out[i, 0][brain] = (rng.uniform(-0.3, 0.1) + 0.3 * yy + 0.8 * blob)[brain]
    return out

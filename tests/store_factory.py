"""Small slice stores that follow ``brats_gan/schema.py``, written with xarray + zarr like the real one.

The trainer's tests need stores of a chosen size in well under a second, without BraTS data or the
Dask preprocessing. ``write_store`` draws a bright ellipse ("brain") with a darker blob ("tumour")
on a -1 background, so sample grids look like something and every sample differs.

Each sample carries its own id in pixel (0, 0, 0) of channel 0 (``sample_id``), so tests can tell
exactly which stored samples a loader returned, whatever the shuffling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from brats_gan import schema

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
    subjects: int = 3,
    slices: int = 8,
    channels: Sequence[str] = ("flair",),
    size: int = 256,
    complete: bool = True,
    seed: int = 0,
) -> Path:
    """A store of ``subjects x slices`` samples; shard = one subject's slices, chunks as ``schema`` says."""
    import xarray as xr

    rng = np.random.default_rng(seed)
    n, c = subjects * slices, len(channels)
    if n > 2047:
        raise ValueError("sample ids are stored in float16 and must stay below 2048")
    image = np.empty((n, c, size, size), dtype=np.float16)
    for i in range(n):
        for j in range(c):
            image[i, j] = _phantom(rng, size)
        image[i, 0, 0, 0] = -1.0 + i * ID_SCALE
    ids = [f"BraTS-TEST-{s:05d}" for s in range(subjects)]
    ds = xr.Dataset(
        {schema.IMAGE: (schema.DIMS, image)},
        coords={
            "subject": ("sample", np.repeat(np.array(ids, dtype=object), slices)),
            "slice_index": ("sample", np.tile(np.arange(60, 60 + slices, dtype=np.int16), subjects)),
            "tumour_fraction": ("sample", rng.uniform(0, 0.1, n).astype(np.float32)),
            "channel": ("channel", np.array(list(channels), dtype=object)),
        },
        attrs={
            "format": schema.FORMAT,
            "format_version": schema.FORMAT_VERSION,
            "tool_version": "tests",
            "params": {"size": size, "slices": slices, "modalities": list(channels), "factory_seed": seed},
            "subjects_planned": ids,
            "skipped": [],
            "synthetic": True,
        },
    )
    chunk = schema.chunk_samples(slices)
    encoding = {schema.IMAGE: {"chunks": (chunk, c, size, size), "shards": (slices, c, size, size)}}
    with schema.quiet_consolidated_warning():
        ds.to_zarr(str(path), mode="w", zarr_format=3, encoding=encoding, consolidated=True)
    if complete:
        import zarr

        zarr.open_group(str(path), mode="r+").attrs["complete"] = True
    return Path(path)


@pytest.fixture(scope="session")
def store_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``store_factory(**write_store_kwargs)`` -> path; equal arguments give the same (cached) store."""
    made: dict[tuple, Path] = {}

    def make(**kwargs) -> Path:
        key = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in kwargs.items()))
        if key not in made:
            made[key] = write_store(tmp_path_factory.mktemp("store") / "slices.zarr", **kwargs)
        return made[key]

    return make

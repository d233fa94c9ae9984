"""`brats-gan preview`: a contact sheet of stored slices, for checking preprocessing by eye."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np

from brats_gan.errors import UserError

log = logging.getLogger(__name__)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] -> [0, 255]; NaN (never-written samples) shows as mid-grey so holes are visible."""
    images = np.nan_to_num(images.astype(np.float32), nan=0.0)
    return np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)


def mosaic(tiles: np.ndarray, columns: int, gap: int = 2) -> np.ndarray:
    """(n, h, w) or (n, h, w, 3) uint8 tiles -> one image, row-major, black gaps between tiles."""
    n, h, w = tiles.shape[:3]
    rows = -(-n // columns)
    sheet = np.zeros((rows * (h + gap) - gap, columns * (w + gap) - gap, *tiles.shape[3:]), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    return sheet


def save_grid(images: np.ndarray, out: str | Path, columns: int | None = None) -> Path:
    """Save (n, channels, h, w) images in [-1, 1] as a PNG grid; 3 channels as RGB, else the first."""
    from PIL import Image

    tiles = to_uint8(images)
    tiles = tiles.transpose(0, 2, 3, 1) if tiles.shape[1] == 3 else tiles[:, 0]
    columns = columns or int(np.ceil(np.sqrt(len(tiles))))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")  # readers (TensorBoard, a browser) never see half a PNG
    Image.fromarray(mosaic(tiles, columns)).save(tmp)
    os.replace(tmp, out)
    return out


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="a slice store")
    p.add_argument("--out", default="preview.png", help="PNG to write (default preview.png)")
    p.add_argument("--num", type=int, default=64, help="slices to show, spread evenly over the store (default 64)")
    p.add_argument("--channel", default=None, help="channel to show (default: all 3 as RGB if 3, else the first)")
    p.add_argument("--columns", type=int, default=None, help="tiles per row (default: square)")


def run(args: argparse.Namespace) -> int:
    import xarray as xr

    from brats_gan.schema import StoreError, read_summary

    try:
        summary = read_summary(args.store)
    except StoreError as err:
        raise UserError(str(err)) from None
    if args.num < 1:
        raise UserError("--num must be at least 1")
    ds = xr.open_zarr(args.store)
    if args.channel is not None:
        if args.channel not in summary.channels:
            raise UserError(f"--channel {args.channel!r} not in the store's channels {list(summary.channels)}")
        ds = ds.sel(channel=[args.channel])
    picks = np.unique(np.linspace(0, summary.n_samples - 1, min(args.num, summary.n_samples)).round().astype(int))
    images = ds.image.isel(sample=picks).values
    out = save_grid(images, args.out, args.columns)
    subjects = ds.subject.values[picks]
    print(f"{out}: {len(picks)} slices of {summary.n_samples} from {len(set(subjects))} subject(s)"
          f"{'' if summary.complete else ' (store NOT complete: grey tiles were never written)'}")
    return 0

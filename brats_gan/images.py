"""Image helpers shared by every stage that draws or resamples slices: tiles and PNG grids (preview,
training's samples, generate, the evaluation report) and the area resampling (the training loader and
evaluate). torch is imported only by the resampling, so drawing a grid does not pay for it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from brats_gan import schema

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image as PILImage

DOWNSAMPLE_ROWS = 8


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
    return save_png(Image.fromarray(mosaic(tiles, columns)), out)


def save_png(image: PILImage, out: str | Path) -> Path:
    """Write a Pillow image as the PNG ``out`` whole or not at all: readers (TensorBoard, a browser) never
    see half a PNG, and a failed write (a full disk, a folder in the way) leaves no temporary file. The
    PNG is marked as brats_gan's (``schema.PNG_SOFTWARE``), the mark that lets a later run replace it."""
    from PIL.PngImagePlugin import PngInfo

    from brats_gan import __version__

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    info = PngInfo()
    info.add_text("Software", f"{schema.PNG_SOFTWARE} {__version__}")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return out


def area_downsample(images: np.ndarray | torch.Tensor, size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 images at ``size`` x ``size``, box averages of the input (a pooling when the sizes divide):
    the resampling that adds no grid, for the loader when the model is smaller than the store and for
    evaluate when two stores differ. A few rows at a time, so the float32 copies stay small and in cache
    instead of one window-sized buffer (16 MB at 64 samples of 256x256)."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(images)
    side = x.shape[-1]
    if side == size and out is None:
        return x.float()
    if out is None:
        out = torch.empty((*x.shape[:-2], size, size), dtype=torch.float32)
    for i in range(0, x.shape[0], DOWNSAMPLE_ROWS):
        part = x[i : i + DOWNSAMPLE_ROWS].float()
        if side == size:
            out[i : i + DOWNSAMPLE_ROWS] = part
        elif side % size == 0:
            out[i : i + DOWNSAMPLE_ROWS] = F.avg_pool2d(part, side // size)
        else:
            out[i : i + DOWNSAMPLE_ROWS] = F.interpolate(part, size=(size, size), mode="area")
    return out

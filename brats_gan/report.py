"""The PNGs of `brats-gan evaluate --report`: what a person would rather look at than a table of figures.

Drawn with Pillow alone (no plotting library): real and synthetic grids side by side, intensity histograms
inside the brain, mean log power spectra, and the synthetic slices closest to a training slice next to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from brats_gan.images import area_downsample, mosaic, save_png, to_uint8
from brats_gan.metrics import EvalData

REAL_COLOUR = (31, 119, 180)
FAKE_COLOUR = (255, 127, 14)
BACKGROUND_THRESHOLD = -0.98  # generated backgrounds come close to -1 without reaching it exactly
GRID_TILES = 16
CAPTION = 22
# the PNGs a report may write, by name: an existing one is replaced only if brats_gan drew it
PNG_NAMES = GRIDS, HISTOGRAMS, SPECTRA, CLOSEST_PAIRS = ("grids.png", "histograms.png", "spectra.png",
                                                      "closest_pairs.png")


def _font(size: int = 14) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _rgb_tiles(images: np.ndarray, scale: int = 1) -> np.ndarray:
    """(n, c, h, w) in [-1, 1] -> (n, h*scale, w*scale, 3) uint8: three channels as RGB, else the first as grey."""
    tiles = to_uint8(images)
    tiles = tiles.transpose(0, 2, 3, 1) if tiles.shape[1] == 3 else np.repeat(tiles[:, 0, :, :, None], 3, axis=3)
    return tiles.repeat(scale, axis=1).repeat(scale, axis=2)


def _captioned(panels: list[tuple[str, np.ndarray]], gap: int = 12) -> Any:
    """Panels (RGB uint8 arrays) side by side on white, each with a caption above it."""
    from PIL import Image, ImageDraw

    height = max(p.shape[0] for _, p in panels) + CAPTION
    width = sum(p.shape[1] for _, p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for caption, panel in panels:
        draw.text((x + 2, 3), caption, fill="black", font=_font())
        canvas.paste(Image.fromarray(panel), (x, CAPTION))
        x += panel.shape[1] + gap
    return canvas


def _display_scale(size: int) -> int:
    return max(1, 128 // size)


def grids(data: EvalData, out: Path) -> Path:
    """Up to 16 random slices of each set at the evaluation size, real left, synthetic right."""
    rng = np.random.default_rng(data.seed)
    panels = []
    for caption, s in (("real", data.real), ("synthetic", data.fake)):
        pick = np.sort(rng.permutation(len(s))[:GRID_TILES])
        tiles = _rgb_tiles(s.images[pick], _display_scale(s.size))
        panels.append((f"{caption}: {Path(s.path).name}", mosaic(tiles, columns=4)))
    save_png(_captioned(panels), out)
    return out


def histograms(data: EvalData, out: Path, bins: int = 64) -> Path:
    """Densities of the pixel values inside the brain (above the background) of each set, on shared axes."""
    from PIL import Image, ImageDraw

    edges = np.linspace(BACKGROUND_THRESHOLD, 1.0, bins + 1)
    curves = []
    for s in (data.real, data.fake):
        values = s.images[s.images > BACKGROUND_THRESHOLD]
        density, _ = np.histogram(values, bins=edges, density=True)
        curves.append(density if values.size else np.zeros(bins))
    w, h, left, bottom, top, right = 720, 400, 60, 40, 40, 20
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(13)
    draw.text((left, 10), f"intensity inside the brain (pixels > {BACKGROUND_THRESHOLD})", fill="black", font=font)
    draw.line([(left, top), (left, h - bottom), (w - right, h - bottom)], fill="black")
    ymax = max(float(max(c.max() for c in curves)), 1e-9)
    centres = (edges[:-1] + edges[1:]) / 2

    def xy(v: float, d: float) -> tuple[float, float]:
        return (left + (v - edges[0]) / (edges[-1] - edges[0]) * (w - left - right),
                h - bottom - d / ymax * (h - top - bottom))

    for tick in (-1.0, -0.5, 0.0, 0.5, 1.0):
        x, y = xy(max(tick, edges[0]), 0)
        draw.line([(x, y), (x, y + 4)], fill="black")
        draw.text((x - 10, y + 6), f"{tick:g}", fill="black", font=font)
    draw.text((4, top - 4), f"{ymax:.2g}", fill="black", font=font)
    for (label, colour), curve, row in zip((("real", REAL_COLOUR), ("synthetic", FAKE_COLOUR)), curves, (0, 1)):
        draw.line([xy(v, d) for v, d in zip(centres, curve)], fill=colour, width=2)
        draw.text((w - right - 120, top + 18 * row), label, fill=colour, font=font)
    save_png(canvas, out)
    return out


def spectra(data: EvalData, results: dict[str, Any], out: Path) -> Path:
    """Mean log10 power spectra (DC in the centre; each image's power as a share of its total, so that the
    shapes compare) on one grey scale; a grid shows as bright lines or dots."""
    logs = [np.log10(np.fft.fftshift(s.power_spectrum) + 1e-12) for s in (data.real, data.fake)]
    lo, hi = np.percentile(np.concatenate([v.ravel() for v in logs]), [1, 100])
    scale = _display_scale(data.real.size) * 2
    panels = []
    for caption, key, v in (("real", "checkerboard_real", logs[0]), ("synthetic", "checkerboard", logs[1])):
        grey = np.round(255 * np.clip((v - lo) / max(hi - lo, 1e-12), 0, 1)).astype(np.uint8)
        tile = np.repeat(grey[:, :, None], 3, axis=2).repeat(scale, axis=0).repeat(scale, axis=1)
        score = results.get(key)
        panels.append((f"{caption}" + (f": checkerboard {score:.1f} dB" if score is not None else ""), tile))
    save_png(_captioned(panels), out)
    return out


def closest_pairs(data: EvalData, results: dict[str, Any], out: Path) -> Path:
    """The synthetic slices nearest to a training slice (top row) above that training slice, at the
    memorisation size, with their RMS distance."""
    from PIL import Image, ImageDraw

    pairs = results["closest_pairs"]
    size = results["memorisation_size"]
    fake_pos = np.searchsorted(data.fake.indices, [p["fake_sample"] for p in pairs])
    train_pos = np.searchsorted(data.train.indices, [p["train_sample"] for p in pairs])
    scale = _display_scale(size)
    fake = _rgb_tiles(area_downsample(data.fake.images[fake_pos], size).numpy(), scale)
    train = _rgb_tiles(area_downsample(data.train.images[train_pos], size).numpy(), scale)
    sheet = mosaic(np.concatenate([fake, train]), columns=len(pairs))
    canvas = Image.new("RGB", (sheet.shape[1], sheet.shape[0] + 2 * CAPTION), "white")
    canvas.paste(Image.fromarray(sheet), (0, CAPTION))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 3), "synthetic (top) and its nearest training slice (bottom); RMS distance below",
              fill="black", font=_font(13))
    tile = fake.shape[2] + 2
    for i, p in enumerate(pairs):
        draw.text((i * tile + 2, sheet.shape[0] + CAPTION + 3), f"{p['distance']:.3f}", fill="black", font=_font(12))
    save_png(canvas, out)
    return out


def write_report(report_dir: Path, data: EvalData, results: dict[str, Any]) -> list[Path]:
    """Every PNG that the data allow; returns their paths."""
    written = [grids(data, report_dir / GRIDS), histograms(data, report_dir / HISTOGRAMS),
               spectra(data, results, report_dir / SPECTRA)]
    if data.train is not None and results.get("closest_pairs"):
        written.append(closest_pairs(data, results, report_dir / CLOSEST_PAIRS))
    return written

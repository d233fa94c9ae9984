"""Synthetic brain phantoms with a tumour, written in a real BraTS folder layout.

Real BraTS data cannot be downloaded on every machine (CI, these build hosts), yet the pipeline
must be exercised end to end on files that look like BraTS to the reader: the same folder and
file names, int16 NIfTI volumes of 240 x 240 x 155 1 mm voxels in LPS orientation, a
skull-stripped brain on an exactly-zero background and a segmentation with the BraTS labels
(1 necrotic core, 2 oedema, 4 enhancing tumour). `brats-gan demo` and the test suite use
`write_phantom_dataset` for that.

A phantom is not anatomy, but it has the properties the preprocessing relies on: a brain whose
axial cross-section grows and shrinks along z (so slice selection by brain area means
something), white matter, grey matter and CSF with per-modality contrasts and intensity ranges
calibrated against a real BraTS 2023 case, a smooth bias field and noise, and one tumour per
subject at a random off-centre position. Everything is vectorised numpy and works on the brain
voxels only; a full-size subject with four modalities and its segmentation is generated and
written in about 0.25 s on one core (gzip by ISA-L, see `_save`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from brats_gan.discover import LAYOUTS, check_layout, modality_filename, subject_id

try:  # a declared dependency; plain nibabel gzip still works without it, only slower
    from isal import igzip as _igzip
except ImportError:  # pragma: no cover
    _igzip = None

__all__ = [
    "LAYOUTS",
    "MODALITIES",
    "make_phantom",
    "modality_filename",
    "phantom_affine",
    "subject_id",
    "write_phantom_dataset",
]

logger = logging.getLogger(__name__)

#: Canonical modality names used throughout brats_gan (BraTS 2020/2021 spelling), plus "seg".
MODALITIES = ("flair", "t1", "t1ce", "t2")
_SEG = "seg"

# Mean intensity per tissue and modality, calibrated against BraTS-GLI-00001-000 (BraTS 2023):
# brain-voxel medians there are t1n ~970, t2f ~1010, t1c ~2970, t2w ~570, with CSF the dark tail
# of t1n/t2f and the bright tail of t2w, and the enhancing rim the bright tail of t1c.
# Columns: white matter, grey matter, CSF, oedema, enhancing tumour, necrotic core.
_TISSUE_MEANS = {
    "flair": (950.0, 1120.0, 200.0, 2300.0, 1500.0, 700.0),
    "t1": (1050.0, 800.0, 300.0, 700.0, 850.0, 450.0),
    "t1ce": (3200.0, 2650.0, 1100.0, 2500.0, 6000.0, 1400.0),
    "t2": (470.0, 640.0, 2100.0, 1350.0, 1000.0, 1900.0),
}
_MIN_SIDE = 16  # below this the cortex, ventricles and tumour no longer fit in the grid


def phantom_affine(shape: Sequence[int] = (240, 240, 155)) -> np.ndarray:
    """The voxel-to-world affine of BraTS 1 mm data (LPS axes, origin as in the released files)."""
    return np.array(
        [[-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, float(shape[1] - 1)], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )


def make_phantom(rng: np.random.Generator, shape: Sequence[int] = (240, 240, 155)) -> dict[str, np.ndarray]:
    """One subject: int16 "flair", "t1", "t1ce", "t2" volumes and a uint8 BraTS "seg" label map.

    Voxel axes are (x, y, z) in LPS order like BraTS files: x runs right -> left, y anterior ->
    posterior, z inferior -> superior. Every voxel outside the brain is 0 in every modality and
    every brain voxel is >= 1, so the brain mask is ``volume > 0`` as in skull-stripped BraTS.
    Features scale with ``shape``, so a small phantom for tests is a shrunken full-size one.
    The arrays are Fortran-ordered, as nibabel loads NIfTI, so saving them is a plain copy.

    The sections below draw from ``rng`` in this order, so a seed always gives the same subject.
    """
    nx, ny, nz = _check_shape(shape)
    head = _head_geometry(rng, nx, ny, nz)
    grid = _head_coordinates(head, nx, ny, nz)
    brain = _brain_voxels(rng, grid)
    gm, csf = _cortex(rng, grid, brain)
    _add_fissure(csf, head, grid, brain)
    ventricles = _add_deep_structures(rng, grid, brain, gm, csf)
    levels, means = _tissue_levels(rng, gm, csf, brain.n)
    lesion = _tumour_shape(rng, head, grid, brain, ventricles)
    _add_lesion_levels(levels, means, lesion)
    seg = _lesion_labels(lesion, grid.zyx, brain.flat)
    out = _modalities(rng, levels, means[:, 0], grid.zyx, brain)
    out[_SEG] = seg.T
    return out


def write_phantom_dataset(
    root: str | os.PathLike[str],
    n_subjects: int = 8,
    layout: str = "2020",
    shape: Sequence[int] = (240, 240, 155),
    seed: int = 0,
    modalities: Sequence[str] = MODALITIES,
    with_seg: bool = True,
    gz: bool = True,
    start: int = 1,
) -> list[Path]:
    """Write ``n_subjects`` phantoms as ``root/<subject>/<files>`` in BraTS ``layout``; return the folders.

    Subject number ``start + s`` is generated from ``(seed, number)`` alone, so the same seed
    always writes identical data, whatever ``n_subjects``, ``start`` or ``modalities`` are.
    Existing files of the same name are overwritten.
    """
    check_layout(layout)
    shape = _check_shape(shape)
    if n_subjects < 0:
        raise ValueError(f"n_subjects must be >= 0, got {n_subjects}")
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; expected a subset of {MODALITIES}")
    root = Path(root)
    affine = phantom_affine(shape)
    folders: list[Path] = []
    began = time.perf_counter()
    for number in range(start, start + n_subjects):
        subject = subject_id(layout, number)
        folder = root / subject
        folder.mkdir(parents=True, exist_ok=True)
        volumes = make_phantom(np.random.default_rng([seed, number]), shape)
        names = [*modalities, _SEG] if with_seg else list(modalities)
        for name in names:
            _save(volumes[name], affine, folder / modality_filename(layout, subject, name, gz=gz))
        logger.debug("wrote phantom %s (%s)", folder, ", ".join(names))
        folders.append(folder)
    logger.info(
        "wrote %d phantom subject(s) in the BraTS %s layout to %s in %.1f s",
        len(folders),
        layout,
        root,
        time.perf_counter() - began,
    )
    return folders


# ----------------------------------------------------------------------------------------------
# the sections of make_phantom, in the order it runs them


@dataclass(frozen=True)
class _Head:
    """Where the brain sits (voxels): semi-axes a (left-right) and b (anterior-posterior), in-plane
    centre (cx, cy), the widest axial section's z and the brain's extent below and above it, and
    how much wider the occipital half is than the frontal one."""

    a: float
    b: float
    cx: float
    cy: float
    zc: float
    cz_lo: float
    cz_hi: float
    taper: float


def _head_geometry(rng: np.random.Generator, nx: int, ny: int, nz: int) -> _Head:
    """Head geometry (voxels), calibrated on the real case: brain extent 140 x 190 x 137 voxels."""
    a = 0.29 * nx * rng.uniform(0.90, 1.04)  # left-right semi-axis
    b = 0.395 * ny * rng.uniform(0.90, 1.04)  # anterior-posterior semi-axis
    cx = nx / 2 + rng.uniform(-0.03, 0.03) * nx
    cy = 0.51 * ny + rng.uniform(-0.03, 0.03) * ny
    extent = rng.uniform(0.82, 0.90) * nz  # inferior-superior extent of the brain
    bottom = (nz - extent) / 2 + rng.uniform(-0.02, 0.02) * nz
    # The widest axial section sits a few slices off the volume centre, so "largest brain slice"
    # and "centre slice" differ as they do in real scans.
    offset = max(2.0, rng.uniform(0.05, 0.09) * nz) * rng.choice((-1.0, 1.0))
    zc = nz / 2 + offset
    cz_lo, cz_hi = zc - bottom, bottom + extent - zc
    taper = rng.uniform(0.05, 0.10)  # occipital half wider than frontal, as in real brains
    return _Head(a, b, cx, cy, zc, cz_lo, cz_hi, taper)


@dataclass(frozen=True)
class _Grid:
    """Normalised head coordinates over the grid.

    Internally arrays are (z, y, x) in C order (= (x, y, z) in Fortran order). Functions of
    (x, y) live on a (ny, nx) "plane", functions of z on a "line", and per-voxel arrays hold
    the brain voxels only (about a fifth of the grid).
    """

    zyx: tuple[int, int, int]
    xs: np.ndarray  # line over x (voxels)
    zs: np.ndarray  # line over z (voxels)
    vv: np.ndarray  # line over y: < 0 anterior, > 0 posterior
    uu: np.ndarray  # plane
    q2: np.ndarray  # plane: squared in-plane radius, 1 on the widest outline
    tt: np.ndarray  # line over z: < 0 below the widest section, > 0 above
    tz: np.ndarray  # line over z: tt's share of the squared radius


def _head_coordinates(head: _Head, nx: int, ny: int, nz: int) -> _Grid:
    """Coordinates normalised to the head: 0 at its centre, 1 on its widest outline."""
    f32 = np.float32
    xs = np.arange(nx, dtype=f32)
    vv = (np.arange(ny, dtype=f32) - f32(head.cy)) / f32(head.b)
    a_of_y = f32(head.a) * (1 + f32(head.taper) * vv)
    uu = (xs[None, :] - f32(head.cx)) / a_of_y[:, None]
    q2 = uu * uu + (vv * vv)[:, None]
    zs = np.arange(nz, dtype=f32)
    zc = head.zc
    tt = np.where(zs < zc, (zs - f32(zc)) / f32(head.cz_lo), (zs - f32(zc)) / f32(head.cz_hi)).astype(f32)
    # |t|**1.6 rather than t**2: narrower towards top and bottom than an ellipsoid, which brings
    # the brain volume close to the real one for the same extents.
    tz = np.abs(tt) ** f32(1.6)
    return _Grid((nz, ny, nx), xs, zs, vv, uu, q2, tt, tz)


@dataclass(frozen=True)
class _Brain:
    """The brain voxels: ``k`` their z, ``p`` their plane index (y * nx + x), ``flat`` their index
    into the (nz, ny, nx) volume, ``rho`` 0 at the centre and 1 at the brain surface, ``t`` the
    normalised z; ``columns`` the (x, y) columns that can hold brain and ``in_cols`` the voxels
    as indices into the (nz, columns) arrays."""

    columns: np.ndarray
    in_cols: np.ndarray
    n: int
    k: np.ndarray
    p: np.ndarray
    flat: np.ndarray
    rho: np.ndarray
    t: np.ndarray
    half: _HalfRes


def _brain_voxels(rng: np.random.Generator, grid: _Grid) -> _Brain:
    """Brain mask: q2 + tz <= bump**2, with a gently bumpy surface (bump within 1 +- 0.09).

    Only the (x, y) columns that can hold brain are computed: (nz, columns) arrays, not the grid.
    """
    f32 = np.float32
    zyx = grid.zyx
    _, ny, nx = zyx
    q2, tz = grid.q2, grid.tz
    columns = np.flatnonzero(q2.reshape(-1) <= f32(1.09**2))
    bump = _smooth(rng, zyx, _scaled((4, 5, 5), zyx, _FULL_ZYX), columns)
    np.clip(bump, -3, 3, out=bump)
    bump *= f32(0.03)
    bump += f32(1.0)
    slack = bump * bump
    slack -= q2.reshape(-1).take(columns)[None, :]
    slack -= tz[:, None]
    in_cols = np.flatnonzero(slack >= 0)
    del slack
    n = in_cols.size
    k, c = np.divmod(in_cols, columns.size)
    p = columns.take(c)
    del c
    flat = k * (ny * nx) + p
    rho = np.sqrt(q2.reshape(-1).take(p) + tz.take(k))
    rho /= bump.reshape(-1).take(in_cols)
    del bump
    t = grid.tt.take(k)
    half = _HalfRes(zyx, k, p)
    return _Brain(columns, in_cols, n, k, p, flat, rho, t, half)


def _cortex(rng: np.random.Generator, grid: _Grid, brain: _Brain) -> tuple[np.ndarray, np.ndarray]:
    """Normal tissue as soft fractions (partial volume at boundaries), grey matter and CSF per brain voxel,
    starting with the cortex.

    A grey-matter ribbon under the surface, and sulci along the zero set of a smooth random
    "folding" field (full resolution: sulci are thin), with CSF in the middle of each sulcus and
    grey matter lining both banks down to about 15 mm deep.
    """
    f32 = np.float32
    rho = brain.rho
    gm = _ramp(rho - 0.955, 0.02)
    csf = np.zeros(brain.n, dtype=f32)
    shell = np.flatnonzero(rho > 0.74)
    zyx = grid.zyx
    fold = _smooth(rng, zyx, _scaled((14, 24, 24), zyx, _FULL_ZYX), brain.columns).reshape(-1).take(brain.in_cols.take(shell))
    np.abs(fold, out=fold)
    rho_s = rho.take(shell)
    gm[shell] = np.maximum(gm.take(shell), _ramp(0.35 - fold, 0.1) * _ramp(rho_s - 0.78, 0.04))
    csf[shell] = _ramp(0.07 - fold, 0.06) * _ramp(rho_s - 0.81, 0.04)
    return gm, csf


def _add_fissure(csf: np.ndarray, head: _Head, grid: _Grid, brain: _Brain) -> None:
    """Interhemispheric fissure: a thin midline sheet of CSF above the ventricles, into ``csf``."""
    f32 = np.float32
    _, ny, nx = grid.zyx
    p = brain.p
    mid = _ramp(0.018 * head.a - np.abs(grid.xs - f32(head.cx)), 1.0)  # line over x
    mid = np.broadcast_to(mid[None, :], (ny, nx)).reshape(-1)  # as a plane
    sel = np.flatnonzero(mid.take(p) > 0)
    if sel.size:
        fissure = mid.take(p.take(sel)) * _ramp(brain.rho.take(sel) - 0.5, 0.1) * _ramp(brain.t.take(sel) + 0.1, 0.2)
        csf[sel] = np.maximum(csf.take(sel), fissure)


def _add_deep_structures(
    rng: np.random.Generator, grid: _Grid, brain: _Brain, gm: np.ndarray, csf: np.ndarray
) -> np.ndarray:
    """Lateral ventricles (banana-shaped, ends bending down) into ``csf`` and deep grey nuclei beside
    them into ``gm``, all well inside rho < 0.8 (half the brain voxels, so half the work).
    Returns the ventricles' fraction per brain voxel (the oedema spares them)."""
    ventricles = np.zeros(brain.n, dtype=np.float32)
    central = np.flatnonzero(brain.rho < 0.8)
    p_c, t_c = brain.p.take(central), brain.t.take(central)
    uu, vv = grid.uu, grid.vv
    v0, t0 = rng.uniform(-0.10, 0.0), rng.uniform(0.05, 0.15)
    for side in (-1.0, 1.0):
        centre = (side * rng.uniform(0.11, 0.15), v0, t0)
        semi = (rng.uniform(0.08, 0.11), rng.uniform(0.30, 0.36), rng.uniform(0.18, 0.24))
        sel, inside = _ellipsoid(uu, vv, p_c, t_c, centre, semi, bend=0.06)
        sel = central.take(sel)
        ventricles[sel] = np.maximum(ventricles.take(sel), inside)
        centre = (side * rng.uniform(0.26, 0.32), v0 + 0.12, t0 - 0.12)
        semi = (rng.uniform(0.10, 0.13), rng.uniform(0.16, 0.22), rng.uniform(0.16, 0.22))
        sel, inside = _ellipsoid(uu, vv, p_c, t_c, centre, semi)
        sel = central.take(sel)
        gm[sel] = np.maximum(gm.take(sel), inside)
    np.maximum(csf, ventricles, out=csf)
    return ventricles


def _tissue_levels(rng: np.random.Generator, gm: np.ndarray, csf: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-modality intensity of every brain voxel from its tissue fractions, and the tissue means
    (modality, tissue) of this subject's scanner.

    Mix tissue means per modality: level = WM + gm (GM - WM) + csf (CSF - WM) - csf gm (GM - WM).
    """
    f32 = np.float32
    gains = rng.uniform(0.85, 1.15, size=len(MODALITIES)).astype(f32)  # scanners differ in scale
    means = np.array([_TISSUE_MEANS[m] for m in MODALITIES], dtype=f32) * gains[:, None]
    wm_, gm_, csf_ = means[:, 0], means[:, 1], means[:, 2]
    mix = np.stack([wm_, gm_ - wm_, csf_ - wm_, wm_ - gm_], axis=1)  # (modality, 4)
    basis = np.empty((4, n), dtype=f32)
    basis[0] = 1
    basis[1] = gm
    basis[2] = csf
    np.multiply(csf, gm, out=basis[3])
    levels = mix @ basis  # (modality, voxel)
    return levels, means


@dataclass(frozen=True)
class _Lesion:
    """The tumour's reach: brain voxels ``sel`` (indices into the brain-voxel arrays) that it can
    touch, their ventricle fraction, their shape-noisy distances in enhancing radii to the oedema
    and tumour outlines, and the necrotic core's and oedema's radii in the same unit."""

    sel: np.ndarray
    vent: np.ndarray
    d_oed: np.ndarray
    d_core: np.ndarray
    core_ratio: float
    oedema_ratio: float


def _tumour_shape(
    rng: np.random.Generator, head: _Head, grid: _Grid, brain: _Brain, ventricles: np.ndarray
) -> _Lesion:
    """One tumour: off-centre, enhancing rim inside the brain, oedema around it."""
    f32 = np.float32
    zyx = grid.zyx
    ny = zyx[1]
    k, p = brain.k, brain.p
    ci, cj, ck, radius = _place_tumour(
        rng, head.a, head.b, head.cx, head.cy, head.zc, (head.cz_lo, head.cz_hi), zyx, brain.flat
    )
    core_ratio = rng.uniform(0.45, 0.70)
    oedema_ratio = rng.uniform(1.5, 2.2)
    dxy = ((np.arange(ny, dtype=f32) - f32(cj)) ** 2)[:, None] + ((grid.xs - f32(ci)) ** 2)[None, :]  # plane
    d2 = dxy.reshape(-1).take(p) + ((grid.zs - f32(ck)) ** 2).take(k)
    reach = oedema_ratio / 0.7 * radius  # no lesion beyond this, whatever the shape noise
    sel = np.flatnonzero(d2 < f32(reach * reach))
    dist = np.sqrt(d2.take(sel)) / f32(radius)
    del d2
    # Irregular outlines: "distances" scaled by full-resolution smooth fields (2-voxel steps of a
    # half-resolution one would show at the edges), evaluated only where they can matter. The
    # clips keep the oedema outline (>= 1.5 / 1.1 radii) outside the tumour's (<= 1 / 0.75).
    d_oed = dist * np.clip(1 + 0.4 * _smooth_at(rng, zyx, (10, 14, 14), k.take(sel), p.take(sel)), 0.7, 1.1)
    near = np.flatnonzero(dist < 1 / 0.75)
    d_core = np.full(sel.size, np.inf, dtype=f32)
    tumour_voxels = sel.take(near)
    d_core[near] = dist.take(near) * np.clip(
        1 + 0.25 * _smooth_at(rng, zyx, (10, 14, 14), k.take(tumour_voxels), p.take(tumour_voxels)), 0.75, 1.3
    )
    return _Lesion(sel, ventricles.take(sel), d_oed, d_core, core_ratio, oedema_ratio)


def _add_lesion_levels(levels: np.ndarray, means: np.ndarray, lesion: _Lesion) -> None:
    """Oedema, enhancing tumour and necrotic core intensities blended into ``levels``."""
    w_tumour = _ramp(1 - lesion.d_core, 0.2)
    w_necrosis = _ramp(lesion.core_ratio - lesion.d_core, 0.2)
    w_lesion = np.maximum(_ramp(lesion.oedema_ratio - lesion.d_oed, 0.3) * (1 - lesion.vent), w_tumour)  # oedema spares CSF
    lesion_means = means[:, 3:]  # (modality, [oedema, enhancing, necrosis])
    blend = lesion_means @ np.stack([w_lesion - w_tumour, w_tumour - w_necrosis, w_necrosis])
    levels[:, lesion.sel] = levels[:, lesion.sel] * (1 - w_lesion) + blend


def _lesion_labels(lesion: _Lesion, zyx: tuple[int, int, int], flat: np.ndarray) -> np.ndarray:
    """The BraTS label map (z, y, x): 2 oedema, 4 enhancing tumour, 1 necrotic core."""
    labels = np.zeros(lesion.sel.size, dtype=np.uint8)
    labels[(lesion.d_oed < lesion.oedema_ratio) & (lesion.vent < 0.5)] = 2
    labels[lesion.d_core < 1] = 4
    labels[lesion.d_core < lesion.core_ratio] = 1
    seg = np.zeros(zyx, dtype=np.uint8)
    seg.reshape(-1)[flat.take(lesion.sel)] = labels
    return seg


def _modalities(
    rng: np.random.Generator, levels: np.ndarray, wm_: np.ndarray, zyx: tuple[int, int, int], brain: _Brain
) -> dict[str, np.ndarray]:
    """Per modality: anatomical texture x bias field, noise, round to int16 inside the brain only."""
    f32 = np.float32
    nz, ny, nx = zyx
    n, k, p = brain.n, brain.k, brain.p
    half = brain.half
    texture = half.gather(1 + 0.04 * half.smooth(rng, (10, 14, 12)))
    # Gaussian noise for all modalities from one draw: modality m reads it shifted by m * stride,
    # so at every voxel the modalities get different, independent samples. A quarter of the cost
    # of four draws, which would otherwise be the largest single step.
    stride = 7919
    noise = rng.standard_normal(n + stride * (len(MODALITIES) - 1), dtype=f32)
    out: dict[str, np.ndarray] = {}
    for m, name in enumerate(MODALITIES):
        # Receive-coil bias: smooth and low order, here an in-plane field times a z profile.
        bias_xy = 1 + 0.05 * _smooth(rng, (1, ny, nx), (1, 4, 4)).reshape(-1)
        bias_z = 1 + 0.03 * _smooth(rng, (nz, 1, 1), (3, 1, 1)).reshape(-1)
        values = levels[m]
        values *= texture
        values *= bias_xy.take(p)
        values *= bias_z.take(k)
        values += noise[m * stride : m * stride + n] * (0.025 * wm_[m])
        values += 0.5  # round half up on the cast below (values are positive)
        np.clip(values, 1, np.iinfo(np.int16).max, out=values)
        vol = np.zeros(zyx, dtype=np.int16)
        vol.reshape(-1)[brain.flat] = values.astype(np.int16)
        out[name] = vol.T
    return out


# ----------------------------------------------------------------------------------------------
# helpers


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    dims = tuple(int(s) for s in shape)
    if len(dims) != 3 or min(dims) < _MIN_SIDE:
        raise ValueError(f"phantom shape must be 3-D with every side >= {_MIN_SIDE}, got {tuple(shape)}")
    return dims  # type: ignore[return-value]


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Save like a BraTS file: 1 mm voxels in mm units, qform and sform both scanner-anatomical.

    The NIfTI bytes are nibabel's own (``to_stream``); for ``.nii.gz`` only the compressor is
    swapped for ISA-L (a project dependency), which is about 3x faster than zlib at the same
    level and would otherwise dominate the time per subject. The gzip header has no name and
    mtime 0, so the same data always gives the same file bytes.
    """
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if _igzip is None or not path.name.endswith(".gz"):
        nib.save(img, path)
        return
    with open(path, "wb") as raw, _igzip.IGzipFile(filename="", mode="wb", compresslevel=1, fileobj=raw, mtime=0) as gz:
        img.to_stream(gz)


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """Soft step for partial-volume boundaries: 0 below -width/2, 1 above width/2, linear between.

    Works in place on ``x`` (always a temporary here) to keep the per-voxel passes cheap.
    """
    x *= np.float32(1.0 / width)
    x += np.float32(0.5)
    return np.clip(x, 0, 1, out=x)


def _scaled(grid: Sequence[int], shape: Sequence[int], reference: Sequence[int]) -> tuple[int, ...]:
    """Control points for ``shape`` given those for ``reference``, so features scale with the volume."""
    return tuple(max(2, min(s, round(g * s / r))) for g, s, r in zip(grid, shape, reference))


def _interp_weights(n: int, g: int) -> np.ndarray:
    """(n, g) Gaussian-kernel weights that spread g control points smoothly over n samples."""
    nodes = np.linspace(0.0, n - 1.0, g)
    spacing = max((n - 1.0) / max(g - 1, 1), 1.0)
    d = (np.arange(n)[:, None] - nodes[None, :]) / (0.7 * spacing)
    w = np.exp(-0.5 * d * d)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth(
    rng: np.random.Generator, shape: Sequence[int], grid: Sequence[int], columns: np.ndarray | None = None
) -> np.ndarray:
    """A smooth random field of ``shape`` (z, y, x) with unit-ish std, from a coarse random ``grid``.

    Separable interpolation as 2-D matrix products (x and y on a small (gz, ny, nx) stack, then
    one product over z) instead of a 3-D convolution. With ``columns`` (indices into the y * nx
    + x plane) only those columns are made: a (nz, len(columns)) array.
    """
    gz, gy, gx = grid
    nz, ny, nx = shape
    coarse = rng.standard_normal((gz, gy, gx), dtype=np.float32)
    wz, wy, wx = (_interp_weights(n, g) for n, g in zip(shape, grid))
    plane = ((wy @ coarse).reshape(gz * ny, gx) @ wx.T).reshape(gz, ny * nx)
    if columns is None:
        field = (wz @ plane).reshape(nz, ny, nx)
    else:
        field = wz @ plane.take(columns, axis=1)
    field *= np.float32(1.0 / _field_std(wz, wy, wx))
    return field


def _smooth_at(
    rng: np.random.Generator, shape: Sequence[int], grid: Sequence[int], k: np.ndarray, p: np.ndarray
) -> np.ndarray:
    """The field `_smooth` would make for ``grid`` given as full-size control points, at voxels (k, p) only.

    Contracts y and x on the (ny, nx) plane first, then z per voxel: exact full-resolution
    values for a few hundred thousand voxels at a fraction of the cost of the whole grid.
    """
    grid = _scaled(grid, shape, _FULL_ZYX)
    gz, gy, gx = grid
    coarse = rng.standard_normal((gz, gy, gx), dtype=np.float32)
    wz, wy, wx = (_interp_weights(n, g) for n, g in zip(shape, grid))
    plane = ((wy @ coarse).reshape(-1, gx) @ wx.T).reshape(gz, -1)  # (gz, ny * nx)
    values = np.einsum("gm,mg->m", plane.take(p, axis=1), wz.take(k, axis=0))
    values *= np.float32(1.0 / _field_std(wz, wy, wx))
    return values


def _field_std(*weights: np.ndarray) -> float:
    """Root-mean-square (over voxels) standard deviation of a field interpolated with ``weights``
    from unit-variance control points: dividing by it gives fields of unit variance on average,
    whatever the grid (a sample std would not: a 3-point field is nearly flat by chance).
    """
    return float(np.sqrt(np.prod([(w.astype(np.float64) ** 2).sum(axis=1).mean() for w in weights])))


_FULL_ZYX = (155, 240, 240)  # the BraTS grid, in the (z, y, x) order used internally
_HALF_ZYX = tuple((s + 1) // 2 for s in _FULL_ZYX)


class _HalfRes:
    """Smooth fields made on a 2-voxel grid and read at the brain voxels only (the texture).

    The fields vary over centimetres, so a nearest-neighbour lookup on a 2 mm grid does not show
    and costs an eighth of a full-resolution field. Shapes and grids are in (z, y, x) order.
    """

    def __init__(self, shape: Sequence[int], k: np.ndarray, p: np.ndarray) -> None:
        nz, ny, nx = shape
        self.shape = tuple((s + 1) // 2 for s in shape)
        _, hy, hx = self.shape
        plane = (np.arange(ny) // 2)[:, None] * hx + (np.arange(nx) // 2)[None, :]
        self.index = plane.reshape(-1).take(p) + (np.arange(nz) // 2 * (hy * hx)).take(k)

    def smooth(self, rng: np.random.Generator, grid: Sequence[int]) -> np.ndarray:
        """A half-resolution field whose ``grid`` is given for a full-size (155 x 240 x 240) phantom."""
        return _smooth(rng, self.shape, _scaled(grid, self.shape, _HALF_ZYX))

    def gather(self, field: np.ndarray) -> np.ndarray:
        """Values of a half-resolution ``field`` at the brain voxels."""
        return field.reshape(-1).take(self.index)


def _ellipsoid(
    uu: np.ndarray,
    vv: np.ndarray,
    p: np.ndarray,
    t: np.ndarray,
    centre: tuple[float, float, float],
    semi: tuple[float, float, float],
    bend: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A soft ellipsoid in normalised head coordinates (u, v, t), ``bend`` lowering its ends.

    Evaluated only at the brain voxels whose (x, y) fall inside its outline; returns those
    voxels (indices into the brain-voxel arrays) and their membership in [0, 1].
    """
    f32 = np.float32
    (u0, v0, t0), (su, sv, st) = centre, semi
    nx = uu.shape[1]
    exy = (((uu - f32(u0)) / f32(su)) ** 2 + (((vv - f32(v0)) / f32(sv)) ** 2)[:, None]).reshape(-1)  # plane
    sel = np.flatnonzero(exy.take(p) < 1.25)
    ps = p.take(sel)
    lift = f32(bend / st) * ((vv - f32(v0)) / f32(sv)) ** 2  # line over y
    dt = (t.take(sel) - f32(t0)) / f32(st) + lift.take(ps // nx)
    return sel, _ramp(1 - exy.take(ps) - dt * dt, 0.5)


def _place_tumour(
    rng: np.random.Generator,
    a: float,
    b: float,
    cx: float,
    cy: float,
    zc: float,
    cz: tuple[float, float],
    zyx: tuple[int, int, int],
    flat: np.ndarray,
) -> tuple[float, float, float, float]:
    """Centre (x, y, z voxels) and enhancing radius of a tumour placed off-centre inside the brain."""
    semi_min = min(a, b, *cz)
    # At least 4 voxels, so that small test grids still get all three labels.
    radius = min(max(rng.uniform(0.12, 0.24) * a, 4.0), 0.45 * semi_min)
    for _ in range(100):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        # Off-centre, but deep enough that the enhancing rim stays inside the brain.
        reach = max(min(rng.uniform(0.30, 0.55), 0.92 - 1.7 * radius / semi_min), 0.15)
        u, v, t = direction * reach
        centre = (cx + u * a, cy + v * b, zc + t * (cz[0] if t < 0 else cz[1]))
        idx = [round(c) for c in reversed(centre)]  # (z, y, x)
        if all(0 <= c < s for c, s in zip(idx, zyx)):
            at = np.ravel_multi_index(idx, zyx)
            pos = np.searchsorted(flat, at)
            if pos < flat.size and flat[pos] == at:  # the centre is a brain voxel
                return (*centre, radius)
    raise RuntimeError("could not place a tumour inside the phantom brain")  # pragma: no cover

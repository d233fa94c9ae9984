"""How close a synthetic slice store is to a real one, as figures and a report (:func:`evaluate`).

Reads any two stores of the schema (``real`` from `brats-gan preprocess`, ``fake`` from `brats-gan
generate`, or any other pair), brings them to one size and runs the metrics of :mod:`brats_gan.metrics`;
``report`` adds the JSON, one ``metric-<name>.jsonl`` line per metric and the PNGs of :mod:`brats_gan.report`.
Refusals name the command's flags (``--real``, ``--max-images``), which are the parameters' names. The README
section "Evaluating synthetic slices" defines each figure; `brats-gan evaluate` prints them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brats_gan.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MAX_IMAGES = 1024
READ_BATCH = 64
# Keys always present in the JSON (null when their metric did not run), so scripts can rely on them.
RESULT_KEYS = ("swd", "swd_floor", "checkerboard", "checkerboard_real", "ms_ssim_fake", "ms_ssim_real",
               "memorisation_share", "fid", "kid", "kid_std", "precision", "recall")


# --------------------------------------------------------------------------------------------
# checks before any pixel is read


def _summaries(paths: dict[str, str | None]) -> dict[str, Any]:
    from brats_gan.schema import StoreError, require_complete

    out = {}
    for role, path in paths.items():
        if path is None:
            continue
        try:
            out[role] = require_complete(path)
        except StoreError as err:
            raise UserError(f"--{role}: {err}") from None
        if len(out[role].image_shape) != 4 or out[role].image_shape[-1] != out[role].image_shape[-2]:
            raise UserError(f"--{role} {path}: images of shape {out[role].image_shape[1:]} are not square slices")
    return out


def _check_channels(summaries: dict[str, Any], notes: list[str]) -> dict[str, tuple[str, ...] | None]:
    """The channels each store is compared on (None: all, as stored).

    Stores that name their channels (the schema's ``channel_names``) are compared by name: the same
    modalities in any order, or the channels of the store with fewest (a synthetic store of a run
    trained on FLAIR alone) picked by name from the others. Any other difference is refused: FLAIR
    scored against T1 measures nothing. Stores without usable names fall back to counts: equal, or a
    single channel repeated to match (as the trainer repeats one modality)."""
    named = all(len(s.channels) == s.image_shape[1] == len(set(s.channels)) for s in summaries.values())
    if named:
        wanted = min(summaries.values(), key=lambda s: len(s.channels)).channels
        if any(c not in s.channels for s in summaries.values() for c in wanted):
            described = "; ".join(f"--{r} {s.path} has {','.join(s.channels)}" for r, s in summaries.items())
            raise UserError(f"the stores hold different modalities ({described}): channels are compared by "
                            "name, so every store must hold those of the store with fewest; choose stores of "
                            "the same modalities (a synthetic store has those of its training store)")
        picked = {role: None if s.channels == wanted else wanted for role, s in summaries.items()}
        for role, names in picked.items():
            if names is not None:
                notes.append(f"--{role} has {','.join(summaries[role].channels)}: compared on "
                             f"{','.join(names)}, picked by name")
        return picked
    counts = {role: s.image_shape[1] for role, s in summaries.items()}
    wanted_count = max(counts.values())
    if any(n not in (1, wanted_count) for n in counts.values()):
        described = ", ".join(f"--{r} has {n} ({','.join(summaries[r].channels)})" for r, n in counts.items())
        raise UserError(f"incompatible channels: {described}; stores must have equally many channels, "
                        "or one of them a single channel (repeated to match)")
    listed = "; ".join(f"--{r}: {list(s.channels)}" for r, s in summaries.items())
    notes.append(f"channel names missing or repeated ({listed}): compared in stored order")
    for role, n in counts.items():
        if n == 1 and wanted_count > 1:
            notes.append(f"--{role} has 1 channel: repeated to {wanted_count} for the comparisons across stores")
    return {role: None for role in summaries}


def _check_train(real: Source, train: Source) -> None:
    """--real must be held-out data when --train is given, or the memorisation threshold is meaningless."""
    if Path(real.summary.path).resolve() == Path(train.summary.path).resolve():
        raise UserError("--real and --train are the same store: with --train, --real must be held-out real "
                           "slices (subjects the generator never saw)")
    shared = set(real.store.subject.values.tolist()) & set(train.store.subject.values.tolist())
    if shared:
        raise UserError(f"--real shares {len(shared)} subject(s) with --train (e.g. {min(shared)}): "
                           "with --train, --real must be held-out subjects")


def _check_report(report_dir: Path) -> None:
    """A report folder that can be written: a folder (or a new name) outside any store, whose PNGs, where
    they exist already, brats_gan drew (its ``metric-<name>.jsonl`` are appended to, ``metrics.json`` replaced)."""
    from brats_gan.report import PNG_NAMES
    from brats_gan.schema import StoreError, check_folder_output, check_png_output

    try:
        check_folder_output(report_dir, "--report")
        for name in PNG_NAMES:
            check_png_output(report_dir / name, "--report")
    except StoreError as err:
        raise UserError(str(err)) from None


def metric_names(spec: str) -> list[str]:
    """The metrics of a comma-separated list, refused by name when unknown."""
    from brats_gan.metrics import is_valid_metric, list_metrics

    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if not is_valid_metric(m)]
    if unknown or not names:
        raise UserError(f"--metrics: unknown {unknown or 'empty list'}; choose from {','.join(list_metrics())}")
    return names


# --------------------------------------------------------------------------------------------
# reading


def open_store(path: str, channels: Sequence[str] | None = None) -> Any:
    """The store as :func:`brats_gan.schema.open_store` labels it (subject and channel names, either format),
    pixels lazy, the per-sample coordinates read once; ``channels`` picked by name, in that order (default: all)."""
    from brats_gan.schema import open_store as open_labelled

    ds = open_labelled(path)
    if channels is not None:
        ds = ds.sel(channel=list(channels))
    return ds.assign_coords(slice_index=ds.slice_index.compute())


def draw(n: int, max_images: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of up to ``max_images`` of ``n`` slices, at random (all when None or n is smaller)."""
    if max_images is None or n <= max_images:
        return np.arange(n)
    return np.sort(rng.choice(n, max_images, replace=False))


def load_set(path: str, store: Any, indices: np.ndarray, size: int, desc: str) -> Any:
    """The slices at ``indices`` of an :func:`open_store` dataset, area-downsampled to ``size``, float32."""
    from brats_gan.images import area_downsample
    from brats_gan.metrics import ImageSet, progress

    picked = store.isel(sample=indices)
    out = np.empty((len(indices), picked.sizes["channel"], size, size), dtype=np.float32)
    for start in progress(range(0, len(indices), READ_BATCH), f"reading {desc}"):
        rows = picked.image[start:start + READ_BATCH].values
        out[start:start + len(rows)] = area_downsample(rows, size).numpy()
    return ImageSet(
        path=path, images=out, indices=indices,
        subjects=picked.subject.values, slice_index=picked.slice_index.values,
        channels=tuple(str(c) for c in store.channel.values),
    )


@dataclass
class Source:
    """One store of the command line: its summary, its xarray dataset and the positions of the slices drawn."""

    summary: Any
    store: Any
    indices: np.ndarray

    @property
    def subjects(self) -> np.ndarray:
        return self.store.subject.values[self.indices]


def _check_args(paths: dict[str, str | None], names: list[str], max_images: int, seed: int,
                inception_weights: str | None, notes: list[str]) -> dict[str, Source]:
    """Every refusal that needs no pixels; returns the stores and the slices drawn from each."""
    from brats_gan.metrics import (
        SWD_MIN_IMAGES,
        MetricUnavailable,
        check_inception_weights,
        check_torchvision,
        swd_images_per_side,
    )

    try:
        check_torchvision()
    except MetricUnavailable as err:
        raise UserError(str(err)) from None
    if max_images < 2 * SWD_MIN_IMAGES:
        raise UserError(f"--max-images must be at least {2 * SWD_MIN_IMAGES} (two real halves for the SWD floor)")
    summaries = _summaries(paths)
    picked = _check_channels(summaries, notes)
    rng = np.random.default_rng(seed)  # drawn in role order: real, fake (train is read whole)
    sources = {role: Source(s, open_store(s.path, picked[role]),
                            draw(s.n_samples, None if role == "train" else max_images, rng))
               for role, s in summaries.items()}
    if "train" in sources:
        _check_train(sources["real"], sources["train"])
    real, fake = sources["real"], sources["fake"]
    if "swd" in names and swd_images_per_side(real.subjects, len(fake.indices), seed) < SWD_MIN_IMAGES:
        raise UserError(f"too few slices for the SWD floor: {len(real.indices)} real and {len(fake.indices)} "
                           "synthetic; it needs two disjoint real halves (whole subjects each) of at least "
                           f"{SWD_MIN_IMAGES} slices and {SWD_MIN_IMAGES} synthetic")
    if inception_weights and "inception" in names:
        try:
            warning = check_inception_weights(inception_weights)
        except MetricUnavailable as err:
            raise UserError(str(err)) from None
        if warning:
            log.warning(warning)
            notes.append(warning)
    if summaries["real"].attrs.get("synthetic") is not False:
        notes.append(f"--real {summaries['real'].path} is not marked as real data (attribute synthetic is not false)")
    if not summaries["fake"].attrs.get("synthetic"):
        notes.append(f"--fake {summaries['fake'].path} is not marked synthetic")
    return sources


def _load(names: list[str], sources: dict[str, Source], seed: int, inception_weights: str | None,
          notes: list[str]) -> Any:
    """The slices every metric sees: real and fake at the smaller store's size, train at 64 px at most."""
    from brats_gan.metrics import MEMORISATION_SIZE, EvalData

    size = min(sources["real"].summary.image_shape[-1], sources["fake"].summary.image_shape[-1])
    for role in ("real", "fake"):
        s, drawn = sources[role].summary, len(sources[role].indices)
        if s.image_shape[-1] > size:
            notes.append(f"--{role} slices are {s.image_shape[-1]} px: area-downsampled to {size} px to match")
        if drawn < s.n_samples:
            notes.append(f"--{role}: {drawn} of {s.n_samples} slices drawn at random (--max-images, --seed)")
    if "swd" in names and len(set(sources["real"].subjects)) < 2:
        notes.append("--real holds one subject: the SWD halves split its slices, so neighbouring slices sit on "
                     "both sides and the floor is lower than new patients would score")

    def read(role: str, at: int) -> Any:
        source = sources[role]
        return load_set(source.summary.path, source.store, source.indices, at, role)

    data = EvalData(real=read("real", size), fake=read("fake", size), seed=seed,
                    inception_weights=inception_weights, notes=notes)
    if "train" in sources:
        data.train = read("train", min(MEMORISATION_SIZE, size, sources["train"].summary.image_shape[-1]))
    return data


def evaluate(real: str, fake: str, train: str | None = None, *, metrics: str | None = None,
             max_images: int = DEFAULT_MAX_IMAGES, seed: int = 0, inception_weights: str | None = None,
             report: str | Path | None = None) -> dict[str, Any]:
    """The figures of ``fake`` against ``real`` (and memorisation against ``train``) as one JSON-ready dict
    with every key of :data:`RESULT_KEYS` (None where a metric did not run; ``notes`` says why); ``metrics``
    a comma-separated subset of the registry (default: all). Every refusal comes before a pixel is read."""
    from brats_gan.metrics import (
        MetricUnavailable,
        calc_metric,
        list_metrics,
        report_metric,
    )

    names = metric_names(",".join(list_metrics()) if metrics is None else metrics)
    if report is not None:
        _check_report(Path(report))
    notes: list[str] = []
    sources = _check_args({"real": real, "fake": fake, "train": train}, names, max_images, seed,
                          inception_weights, notes)
    data = _load(names, sources, seed, inception_weights, notes)
    out: dict[str, Any] = {
        "real": data.real.path, "fake": data.fake.path, "train": data.train.path if data.train else None,
        "n_real": len(data.real), "n_fake": len(data.fake), "n_train": len(data.train) if data.train else None,
        "image_size": data.real.size, "channels": data.channels, "seed": seed,
        **{k: None for k in RESULT_KEYS},
    }
    results = []
    for name in names:
        log.info("computing %s", name)
        try:
            result = calc_metric(name, data)
        except MetricUnavailable as err:
            log.info("%s", err)
            notes.append(str(err))
            continue
        log.info("%s done in %s", name, result["total_time_str"])
        out.update(result["results"])
        results.append(result)
    if "ms_ssim_scales" in out and out["ms_ssim_scales"] < 5:
        notes.append(f"MS-SSIM at {data.real.size} px uses {out['ms_ssim_scales']} scales (5 need 176 px or more): "
                     "the first exponents of Wang et al., renormalised")
    out["notes"] = notes

    if report is not None:
        from brats_gan.report import write_report

        report_dir = Path(report)
        report_dir.mkdir(parents=True, exist_ok=True)
        for result in results:
            report_metric(result, report_dir, real=out["real"], fake=out["fake"], train=out["train"], seed=seed)
        (report_dir / "metrics.json").write_text(json.dumps(out, indent=2) + "\n")
        written = write_report(report_dir, data, out)
        log.info("report: %s", ", ".join(str(p) for p in [report_dir / "metrics.json", *written]))
    return out

"""Synthetic slices from a training run's generator, in the slice store's schema.

A synthetic store is a slice store like the one `preprocess` writes (same variable, coordinates,
dtypes, value range, chunking and attributes), so that downstream projects read real and synthetic
slices with one reader and tell them apart by the ``synthetic`` attribute alone.

What it decides, and why:

- **Weights**: by default the averaged generator (``generator_ema.pt``, :mod:`brats_gan.ema`), which
  draws cleaner images than the trained weights of the same step; ``weights="raw"`` takes the
  trained ones (DeepSpeed's ``mp_rank_00_model_states.pt``). Both hold a plain state dict under
  ``"module"``, read with ``torch.load(weights_only=True)`` into a :class:`~brats_gan.models.Generator`
  rebuilt from the run's saved ``ModelConfig``. DeepSpeed is never imported, so generating needs
  neither a process group nor DeepSpeed's start-up.
- **Channels**: the generator always draws 3 channels. A run trained on one stored modality
  repeated to 3 (the poster's way) gets that one modality back as the mean of the 3 outputs; a run
  trained on 3 modalities keeps them, named as in the training store. So a synthetic store has the
  channels of the real one it imitates.
- **Noise**: image ``i`` comes from shard ``i // 64``'s standard normal draw, seeded with
  ``SeedSequence([seed, shard])``; the images of a seed are the same whatever ``--num`` and
  ``--batch-size``, and a larger ``--num`` extends a smaller one.
- **Coordinates**: every image is its own "subject" (``synthetic-step<N>-seed<S>-<i>``, unique
  across checkpoints and seeds, so a subject-wise split never puts one image on both sides);
  ``slice_index`` is -1 and ``tumour_fraction`` NaN: neither exists for a generated image.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from brats_gan.errors import BratsGanError, UserError

if TYPE_CHECKING:
    import torch

    from brats_gan.models import Generator, ModelConfig

log = logging.getLogger(__name__)

SHARD = 64  # samples per shard: the unit one write fills (8 chunks of 8)
GRID_MAX = 100  # images drawn in --grid: the first ones of the store
DEFAULT_BATCH = 32
# Memory per image while the store's coordinates are written whole with its skeleton (the subject
# table, a JSON list of names in the group's attributes, and all): 532 bytes measured at a million
# images (319 when the names were a string array); and bytes per image of coordinates on disk.
COORDINATE_MEMORY = 768
COORDINATE_DISK = 64


class OutputNotWritten(BratsGanError):
    """The store or its grid could not be written (a full disk, a quota); the message says what was
    kept and how to go on."""


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint of a run, and what rebuilding its generator needs."""

    run: Path
    step: int
    preset: str
    model: ModelConfig
    channels: tuple[str, ...]
    training_store: str | None
    weights_kind: str = "raw"  # "ema": the averaged generator; "raw": the trained one

    @property
    def reduced(self) -> bool:
        """Trained on one modality repeated to the generator's 3 channels: store their mean as that one."""
        return len(self.channels) != self.model.channels

    @property
    def weights(self) -> Path:
        from brats_gan.checkpoints import generator_weights_path

        return generator_weights_path(self.run, self.step, self.weights_kind)


@dataclass
class GenerateReport:
    out: Path
    checkpoint: Checkpoint
    num: int
    seed: int
    grid: Path | None = None
    seconds: float = 0.0
    shape: tuple[int, ...] = field(default_factory=tuple)
    device: str = "cpu"


# ---------------------------------------------------------------- the checkpoint


def find_checkpoint(run: str | Path, step: int | None = None, channels: Sequence[str] | None = None,
                    which: str = "latest", weights: str | None = None) -> Checkpoint:
    """The checkpoint to generate from (``step``, or the one ``checkpoints/<which>`` names: ``latest``
    or ``best``, the lowest SWD measured during training), or a UserError naming what is missing.
    ``weights``: ``ema`` (the averaged generator), ``raw`` (the trained one), or None: ``ema`` when the
    checkpoint has one (runs with ``--ema-images 0``, or from before it existed, have not)."""
    from brats_gan.checkpoints import (
        CHECKPOINTS,
        LATEST,
        OPTIONS_FILE,
        WEIGHTS,
        RunFolderError,
        checkpoint_problems,
        checkpoint_steps,
        ema_weights_path,
        model_states_path,
        read_options,
        usable_checkpoint,
    )
    from brats_gan.models import ModelConfig

    run = Path(run)
    try:
        options = read_options(run)
        model = ModelConfig(**options["model"])
        preset = str(options["training"]["preset"])
    except RunFolderError as err:
        raise UserError(f"--checkpoint {run}: {err}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"--checkpoint {run}: {OPTIONS_FILE} is not readable training options ({err})") from None
    if step is None:
        step, passed_over = usable_checkpoint(run, which)
        for warning in passed_over:
            log.warning("%s; using an older one", warning)
        if step is None:
            why = ("the run stopped before its first one" if which == LATEST else
                   "the run measured no SWD (--swd-images 0), or its best checkpoint is gone; try --which latest")
            if passed_over:
                why = f"none of its checkpoints can be loaded: {'; '.join(passed_over)}"
            raise UserError(f"--checkpoint {run}: {run / CHECKPOINTS / which} names no complete checkpoint ({why})")
    elif step not in (available := checkpoint_steps(run)):
        listed = ", ".join(map(str, available)) or "none"
        raise UserError(f"--step {step}: {run} has no complete checkpoint at step {step} (complete: {listed})")
    elif problems := checkpoint_problems(run, step):
        raise UserError(f"--step {step}: checkpoint {step} of {run} cannot be loaded: {'; '.join(problems)}")
    if not model_states_path(run, step).is_file():
        raise UserError(f"--checkpoint {run}: {model_states_path(run, step)} is missing")
    if weights is not None and weights not in WEIGHTS:
        raise UserError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    has_ema = ema_weights_path(run, step).is_file()
    if weights == "ema" and not has_ema:
        raise UserError(f"--weights ema: checkpoint {step} of {run} holds no averaged generator (trained with "
                        "--ema-images 0, or before brats_gan kept one); use --weights raw")
    kind = weights or ("ema" if has_ema else "raw")
    if weights is None and not has_ema:
        log.info("checkpoint %d holds no averaged generator: sampling the trained weights", step)
    data = options.get("data", {})
    return Checkpoint(run, step, preset, model, training_channels(data, model.channels, channels), data.get("store"),
                      kind)


def training_channels(data: dict[str, Any], generated: int, override: Sequence[str] | None) -> tuple[str, ...]:
    """The names of the channels the run was trained on: ``--channels``, else the run's own
    ``--channels``, else the training store's (only its metadata is read)."""
    from brats_gan import data as data_module
    from brats_gan import schema

    if override:
        names = tuple(override)
    elif data.get("channels"):
        names = tuple(data["channels"])
    else:
        store = data.get("store")
        try:
            summary = schema.read_summary(str(store))
            names = tuple(summary.channels[i] for i in data_module.resolve_channels(summary.channels, None))
        except schema.StoreError as err:
            raise UserError(f"cannot tell which modalities the run was trained on: its training store is not "
                               f"readable ({err}); name them with --channels (one, or {generated})") from None
    if len(names) not in (1, generated):
        raise UserError(f"--channels: give one modality or {generated} (the generator's channels), "
                           f"got {len(names)}: {', '.join(names)}")
    return names


def load_generator(checkpoint: Checkpoint, device: str = "cpu") -> Generator:
    """The checkpoint's generator in eval mode (batch norm on its running statistics, no dropout)."""
    import pickle

    import torch

    from brats_gan.models import Generator

    try:
        saved = torch.load(checkpoint.weights, map_location="cpu", weights_only=True)
        state = saved["module"]
    except (RuntimeError, EOFError, KeyError, TypeError, pickle.UnpicklingError) as err:
        raise UserError(f"cannot load the generator from {checkpoint.weights} ({err})") from None
    generator = Generator(checkpoint.model)
    try:
        generator.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{checkpoint.weights} does not fit the run's model config "
                           f"({' '.join(str(err).split())[:300]})") from None
    return generator.to(device).eval()


# ---------------------------------------------------------------- the images


def shard_noise(seed: int, shard: int, latent_dim: int) -> torch.Tensor:
    """The latent vectors of shard ``shard`` (``SHARD`` of them): a pure function of (seed, shard)."""
    import torch

    shard_seed = int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])
    return torch.randn(SHARD, latent_dim, generator=torch.Generator().manual_seed(shard_seed))


def synthesise(generator: Generator, checkpoint: Checkpoint, num: int, seed: int, batch_size: int,
               device: str = "cpu") -> Iterator[tuple[int, np.ndarray]]:
    """``(start, images)`` per shard: float16 ``(n, channels, S, S)`` in [-1, 1] as stored."""
    import torch

    with torch.inference_mode():
        for shard, start in enumerate(range(0, num, SHARD)):
            noise = shard_noise(seed, shard, checkpoint.model.latent_dim)[: min(SHARD, num - start)]
            parts = []
            for z in noise.split(batch_size):
                out = generator(z.to(device)).float()
                parts.append((out.mean(1, keepdim=True) if checkpoint.reduced else out).clamp_(-1, 1).cpu())
            yield start, torch.cat(parts).numpy().astype(np.float16)


def checkpoint_record(checkpoint: Checkpoint) -> dict[str, Any]:
    """The ``checkpoint`` attribute of a synthetic store: what drew it (run, step, preset, training store,
    which weights, the weights file and its SHA-256, the generator's config), so that the store can be
    traced to, and checked against, the exact weights."""
    import dataclasses
    import hashlib

    digest = hashlib.sha256()
    with open(checkpoint.weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"run": str(checkpoint.run.resolve()), "step": checkpoint.step, "preset": checkpoint.preset,
            "training_store": checkpoint.training_store, "weights": checkpoint.weights_kind,
            "weights_file": checkpoint.weights.relative_to(checkpoint.run).as_posix(),
            "sha256": digest.hexdigest(), "model": dataclasses.asdict(checkpoint.model)}


def synthetic_ids(checkpoint: Checkpoint, seed: int, num: int) -> np.ndarray:
    return np.array([f"synthetic-step{checkpoint.step}-seed{seed}-{i:06d}" for i in range(num)], dtype=object)


# ---------------------------------------------------------------- the store


def check_out(out: Path, overwrite: bool, run: Path, grid: Path | None = None) -> None:
    """Refuse an existing ``out`` unless ``--overwrite``, and even then anything but a synthetic store
    brats_gan wrote: a real store costs a preprocessing run, and a folder of something else is not ours
    to delete. A file, an unwritable place, a folder holding the run or inside a store are refused too,
    and a ``grid`` that is not a PNG name, would replace a file brats_gan did not draw, or lies inside ``out``."""
    from brats_gan import schema

    try:
        schema.check_output(out, overwrite=overwrite, synthetic_only=True, keep=(run,))
        if grid is not None:
            schema.check_png_output(grid, "--grid")
    except schema.StoreError as err:
        raise UserError(str(err)) from None
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it")
    if grid is not None and (grid.resolve() == out.resolve() or out.resolve() in grid.resolve().parents):
        raise UserError(f"--grid {grid} is inside --out {out}, which is replaced whole by --overwrite: "
                        "choose a PNG outside the store")


def check_fits(out: Path, num: int, checkpoint: Checkpoint) -> None:
    """Refuse a ``num`` whose store cannot fit, before any work: its pixels on the disk (float16 as
    generated images are, which barely compress; an existing store there is counted as freed) and its
    coordinates in memory, which are written whole with the store's skeleton. The pixels themselves
    stream, a shard at a time."""
    import shutil

    import psutil

    from brats_gan import schema

    per_image = len(checkpoint.channels) * checkpoint.model.image_size ** 2 * 2 + COORDINATE_DISK
    folder = schema.nearest_existing(out)
    free = shutil.disk_usage(folder).free
    if out.is_dir():
        free += sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and not f.is_symlink())
    if num * per_image > free:
        raise UserError(f"--num {num}: {num} images of {len(checkpoint.channels)}x{checkpoint.model.image_size}"
                        f"x{checkpoint.model.image_size} need {_size(num * per_image)} on disk and {folder} has "
                        f"{_size(free)} free: at most --num {free // per_image} fit there")
    available = psutil.virtual_memory().available
    if num * COORDINATE_MEMORY > available:
        raise UserError(f"--num {num}: the coordinates of {num} images need about {_size(num * COORDINATE_MEMORY)} "
                        f"of memory while the store is created and {_size(available)} is available: at most "
                        f"--num {available // COORDINATE_MEMORY} in one store (another --seed gives other images)")


def _size(n: float) -> str:
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024:
            break
    return f"{n:.1f} {unit}"


def generate(run: str | Path, out: str | Path, num: int, *, seed: int = 0, step: int | None = None,
             batch_size: int = DEFAULT_BATCH, grid: str | Path | None = None, overwrite: bool = False,
             channels: Sequence[str] | None = None, progress: bool = True, which: str = "latest",
             weights: str | None = None) -> GenerateReport:
    """Write ``num`` images of a run's checkpoint to the store ``out`` (and ``grid``); every refusal
    comes before anything is written."""
    import time

    import torch

    from brats_gan import locks

    started = time.perf_counter()
    if num < 1:
        raise UserError(f"--num must be at least 1, got {num}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if seed < 0:
        raise UserError(f"--seed must be at least 0, got {seed}")
    out, grid = Path(out), None if grid is None else Path(grid)
    checkpoint = find_checkpoint(run, step, channels, which, weights)
    check_out(out, overwrite, Path(run), grid)  # before loading anything; again under the lock, which decides
    check_fits(out, num, checkpoint)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = load_generator(checkpoint, device)
    log.info("%s generator of %s step %d (%s) on %s", "averaged" if checkpoint.weights_kind == "ema" else "trained",
             checkpoint.run, checkpoint.step, checkpoint.preset, device)

    try:
        with locks.exclusive(out, "brats-gan generate"):
            check_out(out, overwrite, Path(run), grid)  # another writer may have finished since the first check
            return _write(checkpoint, out, num, seed, batch_size, grid, generator, device, progress, started)
    except locks.Busy as err:
        raise UserError(str(err)) from None


def _write(checkpoint: Checkpoint, out: Path, num: int, seed: int, batch_size: int, grid: Path | None,
           generator: Generator, device: str, progress: bool, started: float) -> GenerateReport:
    import time

    from brats_gan.images import save_grid

    try:
        report, shown = _write_store(checkpoint, out, num, seed, batch_size, grid is not None, generator, device,
                                     progress)
    except OSError as err:  # a full disk or a quota
        from brats_gan import schema

        kept = ("it is kept incomplete (not marked complete, so evaluate and train refuse it)"
                if schema.written_by_brats_gan(out) is not None else "nothing was kept")
        raise OutputNotWritten(f"cannot write {out} ({_os_reason(out, err)}): {kept}; free space and run the same "
                               "command with --overwrite") from err
    if grid is not None:
        try:
            report.grid = save_grid(np.concatenate(shown), grid)
        except OSError as err:
            raise OutputNotWritten(f"cannot write --grid {grid} ({_os_reason(grid, err)}): the store {out} is "
                                   "complete; free space and run the same command with --overwrite") from err
    report.seconds = time.perf_counter() - started
    return report


def _os_reason(path: Path, err: OSError) -> str:
    """An OSError and the space left where it happened, in one line."""
    import shutil

    from brats_gan import schema

    try:
        free = f"; {shutil.disk_usage(schema.nearest_existing(path)).free / 2**30:.2f} GiB free there"
    except OSError:
        free = ""
    return f"{type(err).__name__}: {err.strerror or err}{free}"


def _write_store(checkpoint: Checkpoint, out: Path, num: int, seed: int, batch_size: int, grid: bool,
                 generator: Generator, device: str, progress: bool) -> tuple[GenerateReport, list[np.ndarray]]:
    """The synthetic store, sealed complete; the report and the first images for the grid."""
    import zarr
    from tqdm import tqdm

    from brats_gan import schema, store_writer
    from brats_gan.verify import shard_checksum

    if out.exists():
        shutil.rmtree(out)
    size = checkpoint.model.image_size
    params = {
        "modalities": list(checkpoint.channels),
        "size": size,
        "dtype": "float16",
        "num": num,
        "seed": seed,
        "channel_reduction": f"mean of the generator's {checkpoint.model.channels} channels"
                             if checkpoint.reduced else None,
        "latent_dim": checkpoint.model.latent_dim,
        "noise": f"standard normal, per shard of {SHARD} from SeedSequence([seed, shard])",
        "device": device,
    }
    store_writer.write_skeleton(
        str(out), channels=checkpoint.channels, size=size, shard=SHARD, subject=synthetic_ids(checkpoint, seed, num),
        attrs=store_writer.new_attrs(params=params, synthetic=True, checkpoint=checkpoint_record(checkpoint),
                                     seed=seed, n_subjects=num),
    )
    image = zarr.open_group(str(out), mode="r+", use_consolidated=False)[schema.IMAGE]
    shown: list[np.ndarray] = []
    crcs: list[int] = []
    bar = tqdm(total=num, unit="image", desc="generate", disable=True if not progress or num <= SHARD else None)
    with bar:
        for start, images in synthesise(generator, checkpoint, num, seed, batch_size, device):
            image[start : start + len(images)] = images
            crcs.append(shard_checksum(images))
            if grid and start < GRID_MAX:
                shown.append(images[: GRID_MAX - start])
            bar.update(len(images))
    store_writer.seal(str(out), shard_crc32=crcs)
    return GenerateReport(out, checkpoint, num, seed, shape=tuple(image.shape), device=device), shown

"""A training run's folder: where checkpoints live and the ``latest``/``best`` pointers that name them.

``RUN/training_options.json`` (every option, the network and versions), ``RUN/checkpoints/<step>/``
(one folder per checkpoint: each engine's DeepSpeed tag, the averaged generator
``generator_ema.pt`` (``brats_gan.ema``; absent with ``--ema-images 0``), every rank's RNG state, and
``trainer_state.json``, written last, so its presence marks the checkpoint complete), and the pointer
files ``checkpoints/latest`` and ``checkpoints/best`` (the lowest SWD measured), each holding a step and
replaced atomically. Shared by training, resuming and `brats-gan generate` (which must not need DeepSpeed).
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

from brats_gan.locks import lock_path
from brats_gan.metrics_log import METRICS_FILE

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
OPTIONS_FILE = "training_options.json"
TRAINER_STATE = "trainer_state.json"
ENGINES = ("generator", "critic")
MODEL_STATES = "mp_rank_00_model_states.pt"
EMA_WEIGHTS = "generator_ema.pt"
WEIGHTS = ("ema", "raw")  # which generator `generate` samples: the averaged one, or the trained one


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message names the file."""


def read_options(run: str | Path) -> dict[str, Any]:
    """``RUN/training_options.json``: every option, the network and the versions the run was started with."""
    path = Path(run) / OPTIONS_FILE
    if Path(run).exists() and not Path(run).is_dir():
        raise RunFolderError(f"{run} is a file, not a training run folder")
    if not path.is_file():
        raise RunFolderError(f"{path} not found; {run} is not a training run folder")
    try:
        saved = json.loads(path.read_text())
        if not all(isinstance(saved[k], dict) for k in ("data", "training", "checkpoint")):
            raise TypeError("data, training and checkpoint must be objects")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RunFolderError(f"{path} is not readable training options ({err!r})") from None
    return saved


def write_options(run: str | Path, options: dict[str, Any]) -> None:
    atomic_write_text(Path(run) / OPTIONS_FILE, json.dumps(options, indent=2) + "\n")


def resume_plan(run: str | Path) -> tuple[str, list[str]]:
    """What ``--resume auto`` does with ``run``, and why: ``resume`` when a checkpoint of it loads, ``start``
    when there is no folder or an empty one, ``move-aside`` for a run folder that never finished a checkpoint
    (a run killed before its first), ``damaged`` for one whose finished checkpoints all fail their checks
    (the reasons, one per checkpoint, come with it: starting again would throw away a run someone may
    restore), ``refuse`` for any other folder or a file. One command then serves the first start, a requeue
    and a resubmission (the SLURM recipes pass it every time)."""
    folder = Path(run)
    if folder.exists() and not folder.is_dir():
        return "refuse", []
    step, passed_over = usable_checkpoint(folder)
    if step is not None:
        return "resume", []
    if passed_over:
        return "damaged", passed_over
    if not folder.exists() or not any(folder.iterdir()):
        return "start", []
    if (folder / OPTIONS_FILE).is_file() or (folder / CHECKPOINTS).is_dir():
        return "move-aside", []
    return "refuse", []


def move_aside(run: str | Path) -> Path:
    """Rename a run folder that never finished a checkpoint to ``RUN.no-checkpoint-<time>``; returns the new path."""
    folder = Path(run)
    target = folder.with_name(f"{folder.name}.no-checkpoint-{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(folder, target)
    return target


def checkpoint_steps(run: str | Path, complete_only: bool = True) -> list[int]:
    """Steps of the run's checkpoint folders, ascending: the complete ones (holding ``trainer_state.json``,
    written last), or every one, half-written included, with ``complete_only=False``."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()
                  and (not complete_only or (p / TRAINER_STATE).is_file()))


def read_latest(run: str | Path, pointer: str = LATEST) -> int | None:
    """The step ``RUN/checkpoints/latest`` (or ``best``) names, if that checkpoint is complete."""
    root = Path(run) / CHECKPOINTS
    try:
        step = int((root / pointer).read_text().strip())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return step if (root / str(step) / TRAINER_STATE).is_file() else None


def model_states_path(run: str | Path, step: int, engine: str = "generator") -> Path:
    """An engine's weights (and, at ZeRO stage 0, its optimizer state) in checkpoint ``step``: DeepSpeed's
    ``mp_rank_00_model_states.pt`` of tag ``engine``, a plain state dict under ``module``."""
    return Path(run) / CHECKPOINTS / str(step) / engine / MODEL_STATES


def ema_weights_path(run: str | Path, step: int) -> Path:
    """The averaged generator of checkpoint ``step``: a plain state dict under ``module``, like DeepSpeed's."""
    return Path(run) / CHECKPOINTS / str(step) / EMA_WEIGHTS


def generator_weights_path(run: str | Path, step: int, weights: str = "ema") -> Path:
    """The generator weights ``generate`` loads: the averaged (``ema``) or the trained (``raw``) ones."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    return ema_weights_path(run, step) if weights == "ema" else model_states_path(run, step)


def checkpoint_problems(run: str | Path, step: int) -> list[str]:
    """Why checkpoint ``step`` cannot be loaded; empty when it can. Every part must be there, and every
    file torch wrote (a zip archive) must pass its CRC check: a copy or a disk cut short shows here,
    before torch or DeepSpeed would fail on it. Nothing is unpickled."""
    folder = Path(run) / CHECKPOINTS / str(step)
    if not folder.is_dir():
        return ["its folder is gone"]
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
        world = int(state["world_size"])
    except FileNotFoundError:
        return [f"{TRAINER_STATE} is missing (the checkpoint was never finished)"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{TRAINER_STATE} is unreadable ({err})"]
    problems = []
    paths = [model_states_path(run, step, e) for e in ENGINES] + [folder / f"rng_rank{r}.pt" for r in range(world)]
    if state.get("ema"):
        paths.append(ema_weights_path(run, step))
    for path in paths:
        name = path.relative_to(folder)
        try:
            with zipfile.ZipFile(path) as archive:
                broken = archive.testzip()
        except FileNotFoundError:
            problems.append(f"{name} is missing")
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            problems.append(f"{name} is cut short or corrupt ({err})")
        else:
            if broken is not None:
                problems.append(f"{name} is corrupt (its part {broken} fails its checksum)")
    return problems


def usable_checkpoint(run: str | Path, pointer: str = LATEST) -> tuple[int | None, list[str]]:
    """The checkpoint to load for ``pointer`` and one warning per checkpoint passed over on the way.

    ``latest``: the step it names when that checkpoint loads, else the newest older one that does (what
    is left after a partial copy, a full disk, or a pointer whose folder was deleted). ``best``: the step
    it names, else the loadable checkpoint with the lowest SWD its trainer state records.
    """
    root = Path(run) / CHECKPOINTS
    try:
        named: int | None = int((root / pointer).read_text().strip())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        named = None
    if pointer == BEST:
        ranked = sorted((swd, step) for step in checkpoint_steps(run) if (swd := recorded_swd(run, step)) is not None)
        candidates = [named] if named is not None else []
        candidates += [step for _, step in ranked if step != named]
    else:
        older = [step for step in checkpoint_steps(run, complete_only=False) if named is None or step < named]
        candidates = ([named] if named is not None else []) + sorted(older, reverse=True)
    warnings = []
    for step in candidates:
        problems = checkpoint_problems(run, step)
        if not problems:
            return step, warnings
        if step == named or (root / str(step) / TRAINER_STATE).exists():
            warnings.append(f"checkpoint {step} ({root / str(step)}) cannot be loaded: {'; '.join(problems)}")
    return None, warnings


def unwritable(run: str | Path, replacing: bool = False) -> str | None:
    """Why this process cannot write the run folder ``run`` (existing or to be made), or None when it can;
    with ``replacing`` (a folder to be moved aside for a new run) only the folder that holds it matters.

    A run writes inside its folder and its subfolders (options, checkpoints, samples, logs), rewrites
    ``metrics.csv`` in place, and takes its lock beside the folder (``brats_gan.locks``); checked before any
    rank starts, so that a read-only folder is refused in one line rather than at the first write. The
    kernel answers (``os.access``): root may write a folder of any mode, nobody a read-only file system.
    """
    folder = Path(run).absolute()
    if folder.exists() and not replacing:
        places = [lock_path(folder).parent, folder, *sorted(p for p in folder.iterdir() if p.is_dir())]
        if (folder / METRICS_FILE).exists():
            places.append(folder / METRICS_FILE)
    else:
        ancestor = next(p for p in folder.parents if p.exists())
        if not ancestor.is_dir():
            return f"{ancestor} is a file, so {folder} cannot be made"
        places = [ancestor]
    for place in places:
        if not os.access(place, os.W_OK | (os.X_OK if place.is_dir() else 0)):
            try:
                read_only = bool(os.statvfs(place).f_flag & os.ST_RDONLY)
            except OSError:
                read_only = False
            return f"cannot write {place} ({'a read-only file system' if read_only else 'no write permission'})"
    return None


def recorded_swd(run: str | Path, step: int) -> float | None:
    """The SWD measured at checkpoint ``step`` (its trainer state), or None when none was or it is unreadable."""
    try:
        swd = json.loads((Path(run) / CHECKPOINTS / str(step) / TRAINER_STATE).read_text()).get("swd")
    except (OSError, ValueError, AttributeError):
        return None
    return float(swd) if isinstance(swd, (int, float)) else None


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file, fsync, and rename: readers see the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

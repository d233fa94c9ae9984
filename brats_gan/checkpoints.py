"""A training run's folder: where checkpoints live and the ``latest``/``best`` pointers that name them.

``RUN/training_options.json`` (every option, the network and versions), ``RUN/checkpoints/<step>/``
(one folder per checkpoint: each engine's DeepSpeed tag, every rank's RNG state, and
``trainer_state.json``, written last, so its presence marks the checkpoint complete), and the pointer
files ``checkpoints/latest`` and ``checkpoints/best`` (the lowest SWD measured), each holding a step and
replaced atomically. Shared by training, resuming and `brats-gan generate` (which must not need DeepSpeed).
"""

from __future__ import annotations

import os
from pathlib import Path

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
OPTIONS_FILE = "training_options.json"
TRAINER_STATE = "trainer_state.json"


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
    except (FileNotFoundError, ValueError):
        return None
    return step if (root / str(step) / TRAINER_STATE).is_file() else None


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

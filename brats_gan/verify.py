"""Checking a slice store's pixels before anything trusts them.

``complete: true`` says that the writer finished; it cannot say that every file is still there or
unchanged. Zarr reads a missing shard (a partial copy, an object store's hiccup) as its fill value, NaN,
which training only shows as NaN losses far from the cause. So every shard is read here and must decode,
hold finite values in [-1, 1] and, where the writer recorded them (``shard_crc32``), match the CRC-32 of
the float16 pixels it wrote. Problems are named by subject.

The metadata is checked too: zarr reads each array's description from the copy consolidated in the
group's ``zarr.json``, so a deleted or changed ``image/zarr.json`` goes unseen by it, while readers that
ignore consolidated metadata (another Zarr v3 library, ``use_consolidated=False``) cannot find ``image``
at all. Each array must have its own ``zarr.json``, equal to its consolidated copy; problems are named by file.

Shards are checked in parallel with Dask's threaded scheduler (zstd decoding and CRC-32 release the GIL);
the trainer splits the shards between its ranks (``rank``, ``world_size``) so each reads only its part.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brats_gan import schema

log = logging.getLogger(__name__)


@dataclass
class StoreCheck:
    """What :func:`check_store` found: ``problems`` as ``(subjects, what)``, empty for a sound store."""

    path: str
    shards: int
    checked: int
    samples: int
    checksums: bool
    seconds: float = 0.0
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self, most: int = 5) -> str:
        """One line: the first ``most`` problems and how many more."""
        shown = "; ".join(f"{who}: {what}" for who, what in self.problems[:most])
        more = f"; and {len(self.problems) - most} more" if len(self.problems) > most else ""
        return f"{self.path}: {len(self.problems)} problem(s): {shown}{more}"


def shard_checksum(images: np.ndarray) -> int:
    """The CRC-32 recorded for a shard: of its pixels as stored (float16, little-endian, C order)."""
    return zlib.crc32(np.ascontiguousarray(images, dtype="<f2"))


def check_store(path: str | Path, *, rank: int = 0, world_size: int = 1, progress: bool = False,
                threads: int | None = None) -> StoreCheck:
    """Read rank ``rank``'s share of the shards of a complete store (every ``world_size``-th, so ranks share
    the reading evenly; default: all) and check each, ``threads`` at a time (default: one per core; ranks
    sharing a node pass their share, since each shard in flight holds its pixels); rank 0 also checks each
    array's own metadata document. Raises StoreError only when the store's metadata cannot be read at all."""
    import dask
    import zarr

    started = time.perf_counter()
    summary = schema.read_summary(str(path))
    n, length, n_shards = summary.n_samples, summary.shard_length, summary.n_shards
    wanted = list(range(rank, n_shards, world_size))
    recorded = summary.attrs.get("shard_crc32")
    checksums = isinstance(recorded, list) and len(recorded) == n_shards
    with schema.quiet_consolidated_warning():
        group = zarr.open_group(str(path), mode="r")
    image = group[schema.IMAGE]

    def check(i: int) -> str | None:
        a, b = i * length, min((i + 1) * length, n)
        try:
            rows = image[a:b]
        except Exception as err:  # noqa: BLE001  (codec and store errors of every kind)
            return f"cannot be read or decoded ({type(err).__name__}: {err})"
        finite = np.isfinite(rows)
        if not finite.all():
            missing = " (the shard file is probably missing: zarr fills it with NaN)" if not finite.any() else ""
            return f"{rows.size - int(finite.sum())} of {rows.size} pixels are not finite{missing}"
        low, high = float(rows.min()), float(rows.max())
        if low < -1 or high > 1:
            return f"pixels outside [-1, 1] ({low:g} to {high:g})"
        if checksums and shard_checksum(rows) != int(recorded[i]):
            return "pixels differ from those written (CRC-32 mismatch)"
        return None

    tasks = [dask.delayed(check, pure=False)(i) for i in wanted]
    options = {"scheduler": "threads", **({"num_workers": max(1, threads)} if threads else {})}
    if progress and tasks:
        from dask.diagnostics import ProgressBar

        with ProgressBar(minimum=1.0):
            verdicts = dask.compute(*tasks, **options)
    else:
        verdicts = dask.compute(*tasks, **options) if tasks else ()
    report = StoreCheck(str(path), n_shards, len(wanted), n, checksums)
    if rank == 0:
        report.problems.extend(metadata_problems(path))
    damaged = [(i, verdict) for i, verdict in zip(wanted, verdicts) if verdict is not None]
    if damaged:  # names only to say whose slices: a clean store reads them once (read_summary)
        try:
            subjects = schema.sample_subjects(group, summary.attrs)
        except Exception:  # noqa: BLE001  (a damaged subject array: name shards by number instead)
            subjects = None
        for i, verdict in damaged:
            report.problems.append((_who(subjects, i * length, min((i + 1) * length, n), i), verdict))
    report.seconds = time.perf_counter() - started
    log.debug("checked %d of %d shards of %s in %.2f s", len(wanted), n_shards, path, report.seconds)
    return report


def metadata_problems(path: str | Path) -> list[tuple[str, str]]:
    """``(file, what)`` for each array of the group's consolidated metadata (and ``image``) whose own
    ``zarr.json`` is missing, unreadable or different from its consolidated copy; none for a store
    that is not a local folder or keeps no consolidated metadata (then zarr reads the files themselves)."""
    path = Path(path)
    try:
        group = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return []
    consolidated = (group.get("consolidated_metadata") or {}).get("metadata") or {}
    if not consolidated:
        return []
    problems = []
    for name in sorted({*consolidated, schema.IMAGE}):
        where = f"{name}/zarr.json"
        try:
            own = json.loads((path / name / "zarr.json").read_text())
        except FileNotFoundError:
            problems.append((where, f"missing: readers without consolidated metadata cannot see {name!r}; restore "
                                    "the file from a copy of the store, or write the store again"))
            continue
        except (OSError, ValueError) as err:
            problems.append((where, f"cannot be read ({type(err).__name__}: {err})"))
            continue
        if own != consolidated.get(name, own):
            problems.append((where, f"differs from the copy consolidated in {path.name}/zarr.json, so readers "
                                    f"disagree on {name!r}; restore it from a copy of the store, or write the "
                                    "store again"))
    return problems


def _who(subjects: np.ndarray | None, a: int, b: int, shard: int) -> str:
    names = sorted({str(s) for s in subjects[a:b] if s}) if subjects is not None else []
    if not names:
        return f"shard {shard} (samples {a}-{b - 1})"
    if len(names) == 1:
        return f"subject {names[0]} (shard {shard})"
    return f"shard {shard} (samples {a}-{b - 1}, subjects {names[0]} to {names[-1]})"

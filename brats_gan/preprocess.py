"""BraTS subjects -> the slice store, one Dask task per subject, resumable.

How the work is laid out:
- every good subject gets a *slot* in discovery order (subject k of the store holds samples
  ``[k*n, (k+1)*n)``), so the layout does not depend on which task finished first and a resumed
  store equals a single run's;
- ``store_subject`` (one task per subject) loads, checks and transforms it (``prepare_subject``),
  then writes its shard at the slot the client predicted and a completion marker
  ``progress/<subject>`` (``write_subject``); the pixels never leave the worker, and the markers are
  what ``--resume`` trusts;
- the client confirms slots in discovery order as results arrive (``SlotPlanner``) and sends again,
  with the right slot, the rare subject written where it does not belong (after a skipped one);
- ``finalize_store`` trims the arrays to the stored subjects, writes the coordinates, the subject
  table and each subject's provenance (carried by its marker), drops the markers, and sets
  ``complete: true`` last.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brats_gan import locks, schema, store_writer
from brats_gan.discover import Subject, canonical_modality
from brats_gan.errors import describe
from brats_gan.transforms import (
    SLICE_POLICIES,
    InvalidVolume,
    SourceVolume,
    axial_area,
    axial_images,
    brain_mask,
    brain_percentiles,
    check_not_constant,
    normalise_brain,
    orientation_codes,
    pad_or_crop,
    pixel_to_voxel,
    read_volume,
    reorient_to_ras,
    select_slices,
    source_slices,
)
from brats_gan.verify import shard_checksum

log = logging.getLogger(__name__)


class PreprocessError(RuntimeError):
    """The run cannot go on as asked; the message says why and what to do."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that decides the stored pixels; a resumed run must match it exactly."""

    modalities: tuple[str, ...] = ("flair",)
    slices: int = 48
    slice_policy: str = "brain"
    slice_range: tuple[int, int] | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    size: int = 256

    def __post_init__(self) -> None:
        mods = tuple(canonical_modality(m) for m in self.modalities)
        object.__setattr__(self, "modalities", mods)
        if not mods:
            raise ValueError("modalities: give at least one modality")
        if "seg" in mods:
            raise ValueError("modalities: 'seg' is a label map, used for tumour_fraction, not an image channel")
        if len(set(mods)) != len(mods):
            raise ValueError(f"modalities: repeated modality in {mods}")
        if self.slice_policy not in SLICE_POLICIES:
            raise ValueError(f"slice_policy: {self.slice_policy!r} is not one of {SLICE_POLICIES}")
        if self.slice_range is not None:
            start, stop = self.slice_range
            if not 0 <= start < stop:
                raise ValueError(f"slice_range: {start}:{stop} is not a range of axial slices")
            if self.slice_policy != "range":
                object.__setattr__(self, "slice_policy", "range")
            object.__setattr__(self, "slices", stop - start)
        elif self.slice_policy == "range":
            raise ValueError("slice_range: policy 'range' needs a range such as 50:98")
        if self.slices < 1:
            raise ValueError(f"slices: must be at least 1, got {self.slices}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles: need 0 <= low < high <= 100, got {self.percentiles}")
        if self.size < 8:
            raise ValueError(f"size: must be at least 8 pixels, got {self.size}")

    def params(self) -> dict[str, Any]:
        """JSON-ready parameters, stored in the group attributes and compared on --resume."""
        p = dataclasses.asdict(self)
        p["modalities"] = list(self.modalities)
        p["slice_range"] = list(self.slice_range) if self.slice_range else None
        p["percentiles"] = list(self.percentiles)
        p["dtype"] = "float16"
        return p


@dataclass
class PreparedSubject:
    """One subject's stored samples, or the reason it cannot be stored."""

    subject: str
    images: np.ndarray | None = None  # (slices, channels, size, size) float16
    slice_index: np.ndarray | None = None
    tumour_fraction: np.ndarray | None = None
    error: str | None = None
    provenance: dict[str, Any] | None = None  # JSON-ready: see :func:`source_record`


def source_record(path: Path, volume: SourceVolume, input_folder: Path | None) -> dict[str, Any]:
    """What the store's ``sources`` attribute says of one file: its path relative to the input folder
    (the folder holding the subject folders, or above them), size, SHA-256 and voxel axes' orientation."""
    if input_folder is not None:
        relative = os.path.relpath(path, input_folder)
    else:
        relative = f"{path.parent.name}/{path.name}"
    return {"path": Path(relative).as_posix(), "bytes": volume.size, "sha256": volume.sha256,
            "orientation": orientation_codes(volume.affine)}


def prepare_subject(subject: Subject, config: PreprocessConfig, input_folder: Path | None = None) -> PreparedSubject:
    """Load, reorient, check, select slices, normalise and pad one subject (runs on a worker); also its
    provenance: each file's record, and per channel the affine, spacing, shape, intensity window and the
    map from stored pixels to the file's voxels."""
    try:
        for modality in (*config.modalities, "seg"):
            if modality in subject.problems:
                raise InvalidVolume(subject.problems[modality])
        missing = [m for m in config.modalities if m not in subject.files]
        if missing:
            raise InvalidVolume(f"missing modality {', '.join(missing)} (found: {', '.join(sorted(subject.files))})")
        volumes, areas, bounds, files, channels = [], [], [], {}, []
        for modality in config.modalities:
            path = subject.files[modality]
            source = read_volume(path)
            data, affine = source.data, source.affine
            brain = brain_mask(data)
            area = axial_area(brain, affine)
            check_not_constant(data, area, path.name)
            bounds.append(brain_percentiles(data, config.percentiles, brain))
            del brain
            volumes.append(reorient_to_ras(data, affine))
            areas.append(area)
            if volumes[-1].shape != volumes[0].shape:
                raise InvalidVolume(
                    f"{path.name}: shape {volumes[-1].shape} differs from {config.modalities[0]}'s {volumes[0].shape}"
                )
            files[modality] = source_record(path, source, input_folder)
            channels.append({"affine": affine.tolist(), "spacing": list(source.spacing), "shape": list(data.shape),
                             "window": list(bounds[-1]),
                             "pixel_to_voxel": pixel_to_voxel(affine, data.shape, config.size).tolist()})
        tumour_area = None
        if "seg" in subject.files:
            seg = read_volume(subject.files["seg"])
            if reorient_to_ras(seg.data, seg.affine).shape != volumes[0].shape:
                raise InvalidVolume(f"{subject.files['seg'].name}: shape differs from {volumes[0].shape}")
            tumour_area = axial_area(seg.data, seg.affine)
            files["seg"] = source_record(subject.files["seg"], seg, input_folder)
        brain_area = areas[0]
        window = select_slices(config.slices, brain_area, config.slice_policy, tumour_area, config.slice_range)
        images = [normalise_brain(axial_images(vol[:, :, window]), lo, hi) for vol, (lo, hi) in zip(volumes, bounds)]
        images = pad_or_crop(np.stack(images, axis=1), config.size)
        if tumour_area is None:
            fraction = np.full(config.slices, np.nan, dtype=np.float32)
        else:
            fraction = (tumour_area[window] / np.maximum(brain_area[window], 1)).astype(np.float32)
        slice_index = np.arange(window.start, window.stop, dtype=np.int16)
        for modality, channel in zip(config.modalities, channels):
            axis, along = source_slices(np.array(channel["pixel_to_voxel"]), slice_index)
            files[modality]["slice_axis"] = axis
            channel["source_slice"] = along.tolist()
        return PreparedSubject(subject.id, images, slice_index, fraction,
                               provenance={"files": files, "channels": channels})
    except InvalidVolume as err:
        return PreparedSubject(subject.id, error=str(err))


def input_root(subjects: Sequence[Subject]) -> Path | None:
    """The folder the subjects were found in (the one holding their folders, or the folder above several
    dataset folders): source paths are recorded relative to it, so a moved input still matches."""
    parents = {str(Path(path).parent.parent.absolute()) for s in subjects for path in s.files.values()}
    return Path(os.path.commonpath(sorted(parents))) if parents else None


# ---------------------------------------------------------------- the store


def store_exists(path: str) -> bool:
    return (Path(path) / "zarr.json").exists() or (Path(path).exists() and any(Path(path).iterdir()))


def check_output(path: str, subjects: Sequence[Subject], *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse an output that cannot be written or must not be replaced, before any cluster or task starts:
    a file, an unwritable folder, a folder holding input subjects, and for ``--overwrite`` or
    ``--resume`` anything but a store brats_gan wrote (``schema.check_output``); ``--overwrite`` also
    refuses a link and a store holding anything its writer did not put there (:func:`check_replaceable`)."""
    inputs = sorted({file.parent for subject in subjects for file in subject.files.values()})
    try:
        schema.check_output(path, overwrite=overwrite, resume=resume, keep=inputs)
    except schema.StoreError as err:
        raise PreprocessError(str(err)) from None
    if overwrite and Path(path).exists():
        check_replaceable(path)


# a file zarr's LocalStore was writing when its process died: the name it writes to, then renames
_ZARR_TEMPORARY = re.compile(r"\.[0-9a-f]{32}\.partial$")


def check_replaceable(path: str) -> None:
    """``--overwrite`` deletes the store folder, so refuse one that is a symbolic link (deleting through it
    is not what the link's owner asked) or that holds anything else than its writer's own files: a run,
    a synthetic store or notes put inside it would go without a word."""
    store = Path(path)
    if store.is_symlink():
        raise PreprocessError(f"--out {path} is a symbolic link (to {os.readlink(store)}); --overwrite replaces "
                              f"only a store named by its own path: give --out {store.resolve()} or remove the link")
    foreign = foreign_paths(store)
    if foreign:
        shown = ", ".join(str(p) for p in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise PreprocessError(f"--out {path} holds what brats-gan did not write there ({shown}); --overwrite would "
                              "delete it with the store: move it out of the store first, or choose another --out")


def foreign_paths(store: Path) -> list[Path]:
    """The files and folders in ``store`` that are not the store's own: its group's ``zarr.json``, each
    array of the schema (its ``zarr.json`` and chunk files under ``c/``, named by numbers), the
    completion markers under ``progress/`` and zarr's temporary files of a write cut short."""
    own_arrays = {schema.IMAGE, *schema.SAMPLE_COORDS, *schema.SOURCE_ARRAYS, *schema.LEGACY_ARRAYS}
    foreign: list[Path] = []
    for entry in _entries(store):
        if entry.name == "zarr.json" and _plain_file(entry):
            continue
        if entry.name in own_arrays and _plain_folder(entry):
            for part in _entries(entry):
                if part.name == "c" and _plain_folder(part):
                    foreign.extend(_not_chunks(part))
                elif not (part.name == "zarr.json" and _plain_file(part)):
                    foreign.append(part)
        elif entry.name == schema.PROGRESS_GROUP and _plain_folder(entry):
            for marker in _entries(entry):
                if _plain_folder(marker):
                    foreign.extend(p for p in _entries(marker) if not (p.name == "zarr.json" and _plain_file(p)))
                elif not (marker.name == "zarr.json" and _plain_file(marker)):
                    foreign.append(marker)
        else:
            foreign.append(entry)
    return foreign


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not _ZARR_TEMPORARY.search(p.name))


def _plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _plain_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _not_chunks(chunks: Path) -> list[Path]:
    """What an array's chunk tree ``c/`` holds besides folders and files named by chunk numbers."""
    foreign = []
    for folder, dirs, files in os.walk(chunks):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            if not (name.isdigit() or _ZARR_TEMPORARY.search(name)) or path.is_symlink():
                foreign.append(path)
        dirs[:] = [d for d in dirs if d.isdigit() and not (Path(folder) / d).is_symlink()]
    return foreign


def create_store(path: str, config: PreprocessConfig, planned: list[str], overwrite: bool) -> str:
    """Write the empty store: metadata, placeholder coordinates and attributes; returns the run token.
    An existing store is replaced only with ``overwrite``, and only one brats_gan wrote."""
    if store_exists(path):
        if not overwrite:
            raise PreprocessError(
                f"{path} already exists; pass --resume to continue it or --overwrite to replace it"
            )
        try:
            schema.check_output(path, overwrite=True)
        except schema.StoreError as err:
            raise PreprocessError(str(err)) from None
        check_replaceable(path)
        shutil.rmtree(path)
    n = len(planned) * config.slices
    token = uuid.uuid4().hex
    existed = Path(path).exists()
    try:
        store_writer.write_skeleton(
            path,
            channels=config.modalities,
            size=config.size,
            shard=config.slices,
            subject=np.full(n, "", dtype=object),
            sources=len(planned),
            attrs=store_writer.new_attrs(params=config.params(), synthetic=False, run_token=token,
                                         subjects_planned=list(planned)),
        )
        _open_group(path).create_group(schema.PROGRESS_GROUP)  # here, once: workers creating it at once would race
    except OSError as err:  # a full disk: what was written is this call's own (the folder was new or empty)
        _remove_contents(Path(path), remove_folder=not existed)
        reason = describe(err)
        raise PreprocessError(f"cannot create {path} ({reason}); free space, then run the same command again") from err
    log.info("created %s for %d subjects x %d slices", path, len(planned), config.slices)
    return token


def _remove_contents(folder: Path, *, remove_folder: bool) -> None:
    for child in folder.iterdir() if folder.is_dir() else ():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    if remove_folder:
        shutil.rmtree(folder, ignore_errors=True)


def _open_group(path: str, mode: str = "r+"):
    import zarr

    return zarr.open_group(path, mode=mode, use_consolidated=False)


def read_markers(path: str) -> dict[str, dict[str, Any]]:
    """Completion markers of the subjects a previous run finished (stored or skipped)."""
    group = _open_group(path, "r")
    if schema.PROGRESS_GROUP not in group:
        return {}
    return {name: dict(child.attrs) for name, child in group[schema.PROGRESS_GROUP].groups()}


def open_for_resume(
    path: str, config: PreprocessConfig, planned: list[str]
) -> tuple[str, dict[str, dict], bool]:
    """Check that a store was started with these parameters; return its token, markers and completeness."""
    attrs = schema.read_summary(path).attrs
    if attrs.get("format_version") != schema.FORMAT_VERSION and not attrs.get("complete"):
        raise PreprocessError(f"{path} was started by an older brats_gan (store format_version "
                              f"{attrs.get('format_version')}, this one writes {schema.FORMAT_VERSION}); "
                              "start it again with --overwrite")
    stored = attrs.get("params", {})
    wanted = config.params()
    diffs = [f"{k}: store has {stored.get(k)!r}, this run {wanted[k]!r}" for k in wanted if stored.get(k) != wanted[k]]
    if diffs:
        raise PreprocessError(f"{path} was written with other parameters; refusing to resume ({'; '.join(diffs)})")
    if attrs.get("subjects_planned") != planned:
        before, now = set(attrs.get("subjects_planned", [])), set(planned)
        raise PreprocessError(
            f"{path} was started for another set of subjects ({len(before - now)} no longer selected, "
            f"{len(now - before)} new); resume with the same input and --subjects, or --overwrite"
        )
    complete = bool(attrs.get("complete"))
    if not complete:
        _open_group(path).require_group(schema.PROGRESS_GROUP)
    return attrs["run_token"], {} if complete else read_markers(path), complete


@functools.lru_cache(maxsize=4)
def _worker_arrays(path: str, token: str):
    """Open once per worker and run: re-reading metadata for every subject would cost more than its write."""
    group = _open_group(path)
    # Every shard is written whole, so zarr's check of each chunk against the fill value (to skip
    # empty ones) only costs time: ~6 ms of a 15 ms shard write.
    image = group[schema.IMAGE].with_config({"write_empty_chunks": True})
    return image, group[schema.PROGRESS_GROUP]


def write_subject(path: str, token: str, prepared: PreparedSubject, slot: int) -> None:
    """Write one subject's shard, then its completion marker (runs on the worker holding the pixels)."""
    image, progress = _worker_arrays(path, token)
    n = len(prepared.images)
    image[slot * n : (slot + 1) * n] = prepared.images
    progress.create_group(
        prepared.subject,
        overwrite=True,
        attributes={
            "status": "stored",
            "slot": slot,
            "crc32": shard_checksum(prepared.images),
            "slice_index": prepared.slice_index.tolist(),
            "tumour_fraction": [None if np.isnan(f) else float(f) for f in prepared.tumour_fraction],
            "provenance": prepared.provenance,
        },
    )


def store_subject(subject: Subject, config: PreprocessConfig, path: str, token: str, slot: int,
                  input_folder: Path | None = None) -> tuple[str, str | None, int, OSError | None]:
    """Prepare one subject and, if it is good, write it at ``slot``: (subject, error or None, slot, the
    store's write failure or None).

    One task rather than a prepare task and a write task: the pixels never wait in worker memory for
    a slot, and the scheduler handles a third of the tasks (the client's share of the CPU was 15%).
    A write that fails (a full disk, a quota) is returned, not raised: Dask's worker logs every task
    that raises with its traceback, and this failure is expected and said by the client in one line.
    """
    prepared = prepare_subject(subject, config, input_folder)
    if prepared.error is None:
        try:
            write_subject(path, token, prepared, slot)
        except OSError as err:
            return prepared.subject, None, slot, err
    return prepared.subject, prepared.error, slot, None


def write_failure(store: str, err: OSError, what: str = "write",
                  kept: str = "the subjects already stored are kept") -> PreprocessError:
    """A failed write of ``store`` in one line, with the advice its cause calls for."""
    reason = describe(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        advice = "free space (or raise the quota or file-size limit), then"
    else:
        advice = "fix the cause, then"
    return PreprocessError(f"cannot {what} {store} ({reason}); {advice} run the same command with --resume ({kept})")


def mark_skipped(path: str, subject: str, reason: str) -> None:
    _open_group(path)[schema.PROGRESS_GROUP].create_group(
        subject, overwrite=True, attributes={"status": "skipped", "reason": reason}
    )


# the ``pixel_to_voxel``... arrays of the schema, from the items of each channel's provenance
_SOURCE_ITEMS = {"pixel_to_voxel": "pixel_to_voxel", "source_affine": "affine", "voxel_spacing": "spacing",
                 "source_shape": "shape", "intensity_window": "window"}


def source_arrays(provenance: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The per ``(source, channel)`` arrays of the stored subjects' provenance, rows in subject-table order."""
    return {name: np.array([[channel[item] for channel in p["channels"]] for p in provenance],
                           dtype=schema.SOURCE_ARRAYS[name][1])
            for name, item in _SOURCE_ITEMS.items()}


def finalize_store(path: str, config: PreprocessConfig, planned: list[str], input_folder: Path | None = None) -> None:
    """Trim to the stored subjects, write coordinates, the subject table and each subject's provenance,
    drop markers, consolidate, then mark complete."""
    markers = read_markers(path)
    stored = sorted((m["slot"], sid) for sid, m in markers.items() if m["status"] == "stored")
    if [slot for slot, _ in stored] != list(range(len(stored))):
        raise PreprocessError(f"{path}: stored slots are not contiguous; re-run with --overwrite")
    if not stored:
        raise PreprocessError(f"{path}: no subject could be stored")
    n = config.slices
    ids = [sid for _, sid in stored]
    group = _open_group(path)
    total = len(ids) * n
    for name in (schema.IMAGE, *schema.SAMPLE_COORDS):
        array = group[name]
        if array.shape[0] != total:
            array.resize((total, *array.shape[1:]))
    provenance = [markers[sid]["provenance"] for sid in ids]
    for name, values in source_arrays(provenance).items():
        array = group[name]
        if array.shape != values.shape:
            array.resize(values.shape)
        array[...] = values
    group["subject"][:] = np.repeat(np.arange(len(ids), dtype=np.int32), n)
    group["slice_index"][:] = np.concatenate([markers[sid]["slice_index"] for sid in ids]).astype(np.int16)
    group["tumour_fraction"][:] = np.array(
        [np.nan if f is None else f for sid in ids for f in markers[sid]["tumour_fraction"]], dtype=np.float32
    )
    group["source_slice"][:] = np.concatenate(
        [np.array([c["source_slice"] for c in p["channels"]], dtype=np.int32).T for p in provenance])
    skipped = [{"subject": sid, "reason": markers[sid]["reason"]}
               for sid in planned if markers.get(sid, {}).get("status") == "skipped"]
    crcs = [markers[sid].get("crc32") for sid in ids]
    del group[schema.PROGRESS_GROUP]
    store_writer.seal(path, shard_crc32=crcs if all(c is not None for c in crcs) else None,
                      skipped=skipped, n_subjects=len(ids), subject_names=ids,
                      sources=[{"subject": sid, "files": p["files"]} for sid, p in zip(ids, provenance)],
                      input_folder=input_folder.name if input_folder is not None else None)


# ---------------------------------------------------------------- the run


@dataclass
class PreprocessReport:
    store: str
    stored: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    invalid: list[tuple[str, str]] = field(default_factory=list)
    already_done: int = 0
    complete: bool = False
    seconds: float = 0.0


class SlotPlanner:
    """Slots in discovery order, whatever order the results arrive in.

    Subjects are sent with a *predicted* slot (every unfinished subject assumed good) and written there
    at once. ``confirm`` walks the subjects in discovery order; one written, by this run or an earlier
    one, anywhere but where it belongs is sent again with the right slot. That happens only after a
    skipped subject, and only to the few subjects already in flight: later ones are predicted right.
    Without ``skip_invalid`` a bad subject stops confirmation: the subjects after it are still checked
    and written where they will belong once it is fixed, so fixing it and resuming redoes nothing.
    """

    def __init__(self, planned: list[str], markers: dict[str, dict], skip_invalid: bool):
        self.planned, self.markers, self.skip_invalid = planned, markers, skip_invalid
        self.results: dict[str, tuple[str | None, int]] = {}
        self.in_flight: set[str] = set()
        self.resending: dict[str, int] = {}
        self.cursor = self.next_slot = 0
        self.send_cursor = self.predicted = 0
        self.settled = 0  # subjects with a result, or a marker that stands: the progress bar
        self.blocked = False

    def to_send(self, n: int) -> list[tuple[str, int]]:
        """Up to ``n`` more subjects to send, each with its predicted slot."""
        out: list[tuple[str, int]] = []
        while len(out) < n and self.send_cursor < len(self.planned):
            sid = self.planned[self.send_cursor]
            self.send_cursor += 1
            marker = self.markers.get(sid)
            if marker is not None and marker["status"] == "skipped":
                self.settled += 1
                continue
            if marker is None or marker["slot"] != self.predicted:
                out.append((sid, self.predicted))
                self.in_flight.add(sid)
            else:
                self.settled += 1
            self.predicted += 1
        return out

    def record(self, sid: str, error: str | None, slot: int) -> bool:
        """Note a task's result; True when it completes a subject sent again (now stored)."""
        self.in_flight.discard(sid)
        if sid in self.resending:
            if error is not None or slot != self.resending.pop(sid):
                raise PreprocessError(f"{sid} changed during the run ({error}); re-run with --resume")
            return True
        self.results[sid] = (error, slot)
        self.settled += 1
        if error is not None and self.skip_invalid:
            self.predicted -= 1  # it was counted as taking a slot
        return False

    def confirm(self) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, str]]]:
        """Walk on in discovery order: subjects newly stored, to send again (with their slot), skipped."""
        stored, resend, skipped = [], [], []
        while not self.blocked and self.cursor < len(self.planned):
            sid = self.planned[self.cursor]
            marker = self.markers.get(sid)
            if sid in self.results:
                (error, slot), fresh = self.results[sid], True
            elif sid in self.in_flight or marker is None:
                break
            elif marker["status"] == "skipped":
                self.cursor += 1
                continue
            else:
                (error, slot), fresh = (None, marker["slot"]), False
            if error is not None:
                if not self.skip_invalid:
                    self.blocked = True
                    break
                skipped.append((sid, error))
            elif slot == self.next_slot:
                if fresh:
                    stored.append(sid)
                self.next_slot += 1
            else:
                resend.append((sid, self.next_slot))
                self.resending[sid] = self.next_slot
                self.in_flight.add(sid)
                self.next_slot += 1
            self.cursor += 1
        return stored, resend, skipped


class _Window:
    """How many subjects to keep in flight: two per worker thread, re-read every few seconds so that a
    cluster that grows (SLURM workers arriving) gets used. A bounded window keeps a late correction
    (a subject sent again after a skip) to a handful of tasks."""

    def __init__(self, client, every_s: float = 5.0):
        self.client, self.every_s, self.checked, self.value = client, every_s, -float("inf"), 4

    def size(self) -> int:
        now = time.monotonic()
        if now - self.checked > self.every_s:
            self.value = max(4, 2 * sum(self.client.nthreads().values()))
            self.checked = now
        return self.value


def run_preprocess(
    subjects: list[Subject],
    store: str,
    config: PreprocessConfig,
    client,
    *,
    resume: bool = False,
    overwrite: bool = False,
    skip_invalid: bool = False,
    progress: bool = True,
) -> PreprocessReport:
    """Preprocess ``subjects`` into ``store`` on the Dask cluster behind ``client``, as its only writer."""
    store = str(store)
    check_output(store, subjects, resume=resume, overwrite=overwrite)
    try:
        with locks.exclusive(store, "brats-gan preprocess"):
            return _preprocess(subjects, store, config, client, resume=resume, overwrite=overwrite,
                               skip_invalid=skip_invalid, progress=progress)
    except locks.Busy as err:
        raise PreprocessError(str(err)) from None


def _preprocess(subjects: list[Subject], store: str, config: PreprocessConfig, client, *, resume: bool,
                overwrite: bool, skip_invalid: bool, progress: bool) -> PreprocessReport:
    from distributed import as_completed
    from tqdm.auto import tqdm

    started = time.perf_counter()
    planned = [s.id for s in subjects]
    report = PreprocessReport(store)
    markers: dict[str, dict] = {}
    if resume and store_exists(store):
        token, markers, complete = open_for_resume(store, config, planned)
        if complete:
            log.info("%s is already complete; nothing to do", store)
            report.complete, report.already_done = True, len(planned)
            return report
        report.already_done = len(markers)
        log.info("resuming %s: %d of %d subjects already done", store, len(markers), len(planned))
    else:
        if resume:
            log.info("%s does not exist yet; starting it", store)
        token = create_store(store, config, planned, overwrite)

    by_id = {s.id: s for s in subjects}
    folder = input_root(subjects)
    planner = SlotPlanner(planned, markers, skip_invalid)
    pending = as_completed(with_results=True)
    window = _Window(client)
    bar = tqdm(total=len(planned), unit="subject", desc="preprocess", disable=not progress)

    def step() -> None:
        """Confirm what can be, send what must be redone, and top the window up."""
        stored, resend, skipped = planner.confirm()
        report.stored.extend(stored)
        for sid_bad, reason in skipped:
            mark_skipped(store, sid_bad, reason)
            report.skipped.append((sid_bad, reason))
        for sid, slot in resend + planner.to_send(window.size() - pending.count() - len(resend)):
            pending.add(client.submit(store_subject, by_id[sid], config, store, token, slot, folder, pure=False))
        bar.update(planner.settled - bar.n)

    try:
        step()
        for future, (sid, error, slot, failed_write) in pending:
            future.release()
            if failed_write is not None:
                client.cancel(list(pending.futures))
                pending.clear()
                raise write_failure(store, failed_write)
            if error is not None and sid not in planner.resending:
                log.warning("%s: %s", sid, error)
            if planner.record(sid, error, slot):
                report.stored.append(sid)
            step()
    except PreprocessError:
        raise
    except Exception as err:
        raise PreprocessError(f"preprocessing stopped: {type(err).__name__}: {err} "
                              f"({store} stays incomplete; fix the cause and re-run with --resume)") from err
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop tracking the tasks before the cluster closes under them
        client.cancel(list(pending.futures))
        pending.clear()
        raise
    finally:
        bar.close()
    if planner.blocked:
        report.invalid = [(sid, planner.results[sid][0]) for sid in planned
                          if sid in planner.results and planner.results[sid][0] is not None]
        later = [sid for sid in planned[planner.cursor + 1:] if planner.results.get(sid, ("?",))[0] is None]
        if later:
            log.warning("%d good subjects after the first invalid one are stored where they belong once it is "
                        "fixed; --resume keeps them", len(later))
    elif planner.cursor != len(planned):
        raise PreprocessError(f"{store}: {len(planned) - planner.cursor} subjects were never confirmed")
    report.seconds = time.perf_counter() - started
    if report.invalid:
        return report
    try:
        finalize_store(store, config, planned, folder)
    except OSError as err:  # a full disk or a quota while the coordinates and metadata are written
        raise write_failure(store, err, "finish", "the subjects already stored may be redone") from err
    report.complete = True
    report.seconds = time.perf_counter() - started
    return report

"""Streaming the slice store into training batches: sharded across ranks, shuffled per epoch, chunk-aligned.

How an epoch is planned (all of it a pure function of ``(seed, epoch, world_size, batch_size)``, so
every rank computes the same plan without talking to the others, and a resumed run continues
with exactly the batches an uninterrupted one would have seen):

1. The samples are cut into **runs** of ``run_length`` consecutive samples (rounded up to whole
   chunks) that start on a chunk boundary and never cross a shard (a shard is one subject's
   slices). A run is one basic-slicing read ``image[a:b]`` that decodes only its own chunks.
2. The runs are permuted with ``default_rng([seed, epoch])`` and concatenated.
3. The sequence is cut to ``world_size * batch_size * batches_per_epoch`` samples: the remainder
   (fewer than ``world_size * batch_size`` samples, different ones each epoch because the permutation
   differs) is **dropped**, so every rank gets the same number of full micro-batches and no sample is
   repeated or seen by two ranks in one epoch. ``DistributedSampler`` would instead pad by repeating
   samples (or, with ``drop_last=True``, drop the same way but shuffle single samples).
4. Rank ``r`` takes the ``r``-th contiguous share, so it reads only its own runs.
5. The share is cut into **windows** of ``window_batches`` micro-batches; the samples inside a window
   are permuted, then split into micro-batches. A window is the unit a loader worker reads.

Why runs and windows rather than a per-sample shuffle: measured on the development machine, random
single-sample reads from a sharded store ran at ~1/4 (here ~0.4) of sequential large reads, and
``oindex`` with integer arrays ~4x slower again, while runs of 8 one-sample chunks already read about
as fast as whole shards (~1900 vs ~2000 images/s, one process, 256x256 float16); with the schema's
8-sample chunks a default run is exactly one chunk. The cost is a shuffle that is local: a
micro-batch mixes samples from about ``window_batches`` runs (8 runs of 8 by default: 64 samples
from up to 8 subjects) instead of from the whole store, and consecutive batches come from the same
window. For a GAN whose critic sees ``n_critic`` batches per step that mixing is ample; raise
``window_batches`` (memory: one window per worker) or lower ``run_length`` (reads get slower, and
never below a chunk) for more.

What a batch holds (its dtype and channels are part of the contract): the selected stored channels
(one or three; a single channel is repeated to three only on the device, by :func:`to_model`), as a
plain dense tensor that can be pinned; at store size (the paper's 256x256) the stored **float16**
values themselves, exactly; when the model is smaller, **float32** area averages of them (computed
from the float16 values in float32, as before). Consumers convert where the batch lands:
``Trainer.critic_step`` through :func:`to_model`, ``Trainer.measure_swd`` ``.float()``;
float16 -> float32 is exact, so the trainer trains on the same values as when the loader handed over
float32, while a loader worker writes, and the training process maps and (on a GPU) pins, half the
bytes: handing a 256x256 window over was the largest cost of the loader after the reads.

Caching: with ``cache="auto"`` a store whose selected channels take at most ``AUTO_CACHE_MAX_BYTES``
(256 MiB, float16 as stored; the poster's 720 slices are ~90 MiB) is read once, in one sequential
pass, into memory on each rank; larger stores stream. ``"memory"`` and ``"stream"`` force either.
Both paths apply the same per-window transform, so they give identical batches.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from brats_gan import schema
from brats_gan.images import area_downsample

log = logging.getLogger(__name__)

CACHE_MODES = ("auto", "memory", "stream")
AUTO_CACHE_MAX_BYTES = 256 * 2**20
DEFAULT_RUN_LENGTH = 8
DEFAULT_WINDOW_BATCHES = 8

Key = tuple[int, int]  # (epoch, window)


@dataclass(frozen=True)
class Position:
    """Where the stream is: the next micro-batch to deliver is batch ``batch`` of epoch ``epoch``."""

    epoch: int = 0
    batch: int = 0


def resolve_channels(store_channels: Sequence[str], wanted: Sequence[str] | None) -> tuple[int, ...]:
    """Indices of the stored channels to train on: one (repeated to 3, as the poster did) or three.

    With ``wanted=None`` a one-channel store gives that channel and a three-channel store all three;
    any other store needs an explicit choice, since guessing a modality would silently change the data.
    """
    names = list(store_channels)
    if wanted is None:
        if len(names) in (1, 3):
            return tuple(range(len(names)))
        raise schema.StoreError(
            f"the store has {len(names)} channels ({', '.join(names)}); choose one (repeated to 3) "
            "or three with --channels"
        )
    wanted = list(wanted)
    if len(wanted) not in (1, 3):
        raise schema.StoreError(f"--channels takes one or three names, got {len(wanted)}: {', '.join(wanted)}")
    missing = [c for c in wanted if c not in names]
    if missing:
        raise schema.StoreError(f"channel(s) {', '.join(missing)} not in the store (it has {', '.join(names)})")
    return tuple(names.index(c) for c in wanted)


def plan_runs(n_samples: int, shard_length: int, chunk_length: int, run_length: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of whole chunks, at least ``run_length`` samples where the shard allows,
    each inside one shard (Zarr shards hold whole chunks, so shard-relative chunk multiples stay aligned)."""
    run_length = -(-run_length // chunk_length) * chunk_length
    runs = []
    for shard_start in range(0, n_samples, shard_length):
        shard_stop = min(shard_start + shard_length, n_samples)
        runs.extend((a, min(a + run_length, shard_stop)) for a in range(shard_start, shard_stop, run_length))
    return runs


class SliceStream(Dataset):
    """This rank's micro-batches of a complete slice store, one shuffle window per item.

    ``stream[(epoch, w)]`` (or ``stream[w]`` after ``set_epoch(epoch)``) is window ``w`` of that epoch:
    a tensor ``(k * batch_size, channels, image_size, image_size)`` in [-1, 1] (float16 as stored at store size,
    float32 when downsampled; see the module docstring), whose consecutive
    groups of ``batch_size`` rows are this rank's micro-batches. Items are pure functions of their key,
    so loader workers can be persistent and a run can restart anywhere; :func:`iterate_batches` turns
    the windows into an endless sequence of micro-batches from any :class:`Position`.

    The store is opened lazily, once per process (each DataLoader worker opens its own handle; no Zarr
    object is ever pickled).
    """

    def __init__(
        self,
        store: str,
        *,
        batch_size: int,
        image_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        channels: Sequence[str] | None = None,
        cache: str = "auto",
        run_length: int = DEFAULT_RUN_LENGTH,
        window_batches: int = DEFAULT_WINDOW_BATCHES,
    ) -> None:
        summary = schema.require_complete(store)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1 or run_length < 1 or window_batches < 1:
            raise ValueError("batch_size, run_length and window_batches must be >= 1")
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        _, _, height, width = summary.image_shape
        if height != width:
            raise schema.StoreError(f"{store}: slices are {height}x{width}; the trainer needs square slices")
        if image_size > height:
            raise schema.StoreError(
                f"{store}: slices are {height}x{width} but the model wants {image_size}x{image_size}; "
                "the trainer only downsamples (preprocess at the model's size or larger)"
            )
        n = summary.n_samples
        if n < world_size * batch_size:
            raise schema.StoreError(
                f"{store}: {n} samples are too few for one micro-batch of {batch_size} on each of "
                f"{world_size} rank(s) (needs at least {world_size * batch_size})"
            )
        self.store = str(store)
        self.n_samples = n
        self.store_size = height
        self.image_size = image_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.run_length = run_length
        self.window_batches = window_batches
        self.channel_index = resolve_channels(summary.channels, channels)
        self.channels = tuple(summary.channels[i] for i in self.channel_index)
        chunk_length = summary.chunks[0]
        shard_length = summary.shard_length
        self.runs = plan_runs(n, shard_length, chunk_length, run_length)
        self.dtype_np = np.dtype(summary.dtype)
        self.dtype = torch.from_numpy(np.empty(0, dtype=self.dtype_np)).dtype
        self.cache_bytes = n * len(self.channel_index) * height * width * self.dtype_np.itemsize
        self.cached = cache == "memory" or (cache == "auto" and self.cache_bytes <= AUTO_CACHE_MAX_BYTES)
        self.epoch = 0
        self._array: Any = None
        self._memory: np.ndarray | None = None
        self._pid: int | None = None
        self._aio: tuple[asyncio.AbstractEventLoop, Any] | None = None
        self._aio_pid: int | None = None
        self._share: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------ the plan

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank per epoch (the same on every rank; the remainder is dropped)."""
        return self.n_samples // (self.world_size * self.batch_size)

    @property
    def windows_per_epoch(self) -> int:
        return -(-self.batches_per_epoch // self.window_batches)

    def set_epoch(self, epoch: int) -> None:
        """The epoch that integer keys (``stream[w]``, ``len``, iteration) refer to."""
        self.epoch = int(epoch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All samples in the epoch's run order, before dropping the remainder or sharding."""
        rng = np.random.default_rng([self.seed, epoch])
        return np.concatenate([np.arange(*self.runs[i]) for i in rng.permutation(len(self.runs))])

    def rank_share(self, epoch: int, rank: int | None = None) -> np.ndarray:
        """The samples rank ``rank`` (default: this one) gets in ``epoch``, in delivery order,
        shape ``(batches_per_epoch, batch_size)``."""
        rank = self.rank if rank is None else rank
        per_rank = self.batches_per_epoch * self.batch_size
        share = self.epoch_order(epoch)[rank * per_rank : (rank + 1) * per_rank].copy()
        rng = np.random.default_rng([self.seed, epoch, 1 + rank])
        window = self.window_batches * self.batch_size
        for start in range(0, per_rank, window):
            share[start : start + window] = rng.permutation(share[start : start + window])
        return share.reshape(self.batches_per_epoch, self.batch_size)

    def window_indices(self, epoch: int, window: int) -> np.ndarray:
        """The samples of one window, in delivery order (the epoch's share is planned once per process)."""
        if self._share is None or self._share[0] != epoch:
            self._share = (epoch, self.rank_share(epoch))
        return self._share[1][window * self.window_batches : (window + 1) * self.window_batches].reshape(-1)

    # ------------------------------------------------------------------ reading

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_array"] = state["_aio"] = None
        return state

    def _source(self) -> np.ndarray:
        """The in-memory cache (``cached`` stores), read in one sequential pass on first use."""
        if self._memory is None:
            self._memory = self._select(self._zarr_image()[:])
            self._array = None
            log.info("cached %s in memory (%.0f MiB)", self.store, self._memory.nbytes / 2**20)
        return self._memory

    def _zarr_image(self) -> Any:
        """This process's own synchronous Zarr handle on ``image``."""
        if self._array is None or self._pid != os.getpid():
            import zarr

            with schema.quiet_consolidated_warning():
                self._array = zarr.open_group(self.store, mode="r")[schema.IMAGE]
            self._pid = os.getpid()
        return self._array

    def _select(self, rows: np.ndarray) -> np.ndarray:
        if self.channel_index == tuple(range(rows.shape[1])):
            return rows
        return rows[:, list(self.channel_index)]

    def read(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Stored rows (float16, selected channels) for ``indices``, in that order, into ``out``
        (allocated when not given). Rows are read as contiguous runs, one Zarr read each, and copied
        once, straight to their places in ``out``."""
        memory = self._source() if self.cached else None
        if out is None:
            out = np.empty((len(indices), len(self.channel_index), self.store_size, self.store_size),
                           dtype=self.dtype_np)
        order = np.argsort(indices, kind="stable")
        ordered = indices[order]
        runs = np.split(ordered, np.flatnonzero(np.diff(ordered) != 1) + 1)
        bounds = [(int(run[0]), int(run[-1]) + 1) for run in runs]
        places = np.split(order, np.cumsum([b - a for a, b in bounds])[:-1])
        if memory is not None:
            for (a, b), where in zip(bounds, places):
                out[where] = memory[a:b]
        else:
            for where, rows in zip(places, self._read_runs(bounds)):
                out[where] = self._select(rows)
        return out

    def _read_runs(self, bounds: list[tuple[int, int]]) -> list[np.ndarray]:
        """The rows of every run at once, through zarr's asynchronous API, so that their chunk reads
        and decodes overlap: a 64-sample window of 8 runs took 11 ms against 16 ms read run by run.
        Only in a loader worker: elsewhere (the training process, which forks the workers and must not
        hold an event loop's threads across the fork; a notebook with its own running loop) the runs
        are read one by one through zarr's synchronous API."""
        if get_worker_info() is None:
            image = self._zarr_image()
            return [image[a:b] for a, b in bounds]
        loop, image = self._async_image()

        async def gather() -> list[Any]:
            return await asyncio.gather(*(image.getitem((slice(a, b),)) for a, b in bounds))

        return loop.run_until_complete(gather())

    def _async_image(self) -> tuple[asyncio.AbstractEventLoop, Any]:
        """This process's own event loop and asynchronous handle on ``image`` (opened once per process:
        a loader worker must not share its parent's)."""
        if self._aio is None or self._aio_pid != os.getpid():
            from zarr.api import asynchronous as zarr_async

            async def open_image() -> Any:
                group = await zarr_async.open_group(store=self.store, mode="r")
                return await group.getitem(schema.IMAGE)

            loop = asyncio.new_event_loop()
            with schema.quiet_consolidated_warning():
                self._aio = (loop, loop.run_until_complete(open_image()))
            self._aio_pid = os.getpid()
        return self._aio

    def transform(self, rows: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Stored rows -> tensors at model size with the selected channels (one or three): at store size
        the stored float16 values themselves (no copy), smaller sizes float32 area averages of them.

        A single channel stays one: :func:`to_model` repeats it to three after the copy to the device,
        so the loader, its worker pipes and the host-to-device copy move a third of the bytes, and every
        batch is a plain dense tensor that ``pin_memory`` and non-blocking copies accept (an
        ``expand`` view here, stride 0 on the channels, crashed the first CUDA batch).
        """
        x = rows if isinstance(rows, torch.Tensor) else torch.from_numpy(rows)
        if self.image_size != self.store_size:
            x = area_downsample(x, self.image_size,
                                out=_window_tensor((*x.shape[:2], self.image_size, self.image_size), torch.float32))
        return x

    def __len__(self) -> int:
        return self.windows_per_epoch

    def __getitem__(self, key: int | Key) -> torch.Tensor:
        epoch, window = key if isinstance(key, tuple) else (self.epoch, key)
        if not 0 <= window < self.windows_per_epoch:
            raise IndexError(f"window {window} of {self.windows_per_epoch}")
        indices = self.window_indices(epoch, window)
        if self.image_size == self.store_size:
            # Read straight into the window that is handed over (shared memory in a loader worker):
            # the stored float16 rows are copied once, and the training process gets them as they are.
            shape = (len(indices), len(self.channel_index), self.store_size, self.store_size)
            window = _window_tensor(shape, self.dtype)
            self.read(indices, out=window.numpy())
            return self.transform(window)
        return self.transform(self.read(indices))


def to_model(batch: torch.Tensor, device: str | torch.device, dtype: torch.dtype, channels: int = 3) -> torch.Tensor:
    """A loader batch as the networks take it: copied to ``device`` (non-blocking: from pinned memory the
    copy overlaps the previous step's work) and converted to ``dtype`` there, then a single stored channel
    repeated to ``channels`` on the device, as the poster fed one FLAIR channel to a 3-channel network.
    The one hand-over from the loader to a model: the trainer's critic and the benchmarks use it."""
    x = batch.to(device, dtype, non_blocking=True)
    if x.shape[1] == channels:
        return x
    if x.shape[1] != 1:
        raise ValueError(f"a batch of {x.shape[1]} channels cannot feed a network of {channels}")
    return x.repeat(1, channels, 1, 1)


def _window_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor, in shared memory when built in a DataLoader worker (as ``default_collate`` does),
    so that handing it to the training process copies nothing more (pass on this tensor or views of
    it: a tensor rebuilt from a numpy view of it is not recognised as shared and would be copied
    again into fresh shared memory, which once cost a third of a worker's time)."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=dtype).set_(storage).view(tuple(shape))


class _Windows(Sampler[Key]):
    """Endless ``(epoch, window)`` keys from a starting window; the loader prefetches across epochs."""

    def __init__(self, stream: SliceStream, epoch: int, window: int) -> None:
        self.stream, self.epoch, self.window = stream, epoch, window

    def __iter__(self) -> Iterator[Key]:
        epoch, window = self.epoch, self.window
        while True:
            yield epoch, window
            window += 1
            if window == self.stream.windows_per_epoch:
                epoch, window = epoch + 1, 0


def _ignore_stop_signals(worker_id: int) -> None:
    """A scheduler (scancel, a requeue) and the DeepSpeed launcher signal every process of the job, loader
    workers included; a worker that died of it would fail the rank's graceful stop. The training process
    stops after its step and shuts the workers down itself (and they exit with it if it is killed)."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def default_num_workers(local_world_size: int = 1) -> int:
    """Loader processes per rank: the rank's share of the cores minus the one that trains, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(0, min(4, cores // max(1, local_world_size) - 1))


def iterate_batches(
    stream: SliceStream,
    start: Position = Position(),
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[Position, torch.Tensor]]:
    """Endless ``(position, micro_batch)`` from ``start``; ``position`` is that batch's own position.

    A cached stream is read in this process (slicing memory needs no workers); a streaming one uses
    ``num_workers`` persistent workers. The loader gets its own ``torch.Generator`` so that creating
    it never draws from the global RNG a resumed run restores.
    """
    bpe, wb, bs = stream.batches_per_epoch, stream.window_batches, stream.batch_size
    epoch, batch = start.epoch + start.batch // bpe, start.batch % bpe
    workers = 0 if stream.cached else num_workers
    loader = DataLoader(
        stream,
        batch_size=None,
        sampler=_Windows(stream, epoch, batch // wb),
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
        pin_memory=pin_memory,
        generator=torch.Generator(),
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
    )
    skip = batch % wb
    for window in loader:
        for i in range(skip, window.shape[0] // bs):
            yield Position(epoch, batch), window[i * bs : (i + 1) * bs]
            batch += 1
        skip = 0
        if batch == bpe:
            epoch, batch = epoch + 1, 0

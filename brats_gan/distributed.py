"""This process's place in a DeepSpeed job: rank and world from the launcher, the process group, the
device, per-rank logging, and the cleanup DeepSpeed leaves undone on CPU."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, from the launcher's environment (or a one-process default)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_environ(cls, local_rank_arg: int | None = None) -> DistEnv:
        env = os.environ
        world = int(env.get("WORLD_SIZE", 1))
        local = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
        local_world = int(env.get("LOCAL_SIZE") or env.get("LOCAL_WORLD_SIZE") or world)
        return cls(int(env.get("RANK", 0)), world, local, local_world)


def free_port() -> int:
    """A local port free now (the single-process master port; the benchmarks' launcher ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(env: DistEnv) -> str:
    """Threads, process group and device; returns the device name.

    The DeepSpeed launcher sets no OMP_NUM_THREADS, so every CPU rank would use every core (two
    CPU ranks: ~400 ms/step instead of ~110 ms): each rank gets cores / ranks-on-this-node unless the
    user set OMP_NUM_THREADS. Without the launcher DeepSpeed would fall back to MPI discovery (and fail
    without mpi4py), so a single process describes itself as rank 0 of 1 and joins a group of its own.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // env.local_world_size))
    accelerator = get_accelerator()
    backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    if "RANK" not in os.environ:
        # One process, no launcher: the process group meets in an in-process store, so nothing listens on
        # the network (a TCP store would listen on every interface); the variables still name DeepSpeed's
        # shared-memory buffer uniquely.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        if backend == "gloo":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's own sockets: loopback, not the host's address
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if accelerator.device_name() == "cpu" and env.local_rank == 0:
        sweep_stale_shm_buffers()
    deepspeed.init_distributed(dist_backend=backend)
    if accelerator.device_name() != "cpu":
        accelerator.set_device(env.local_rank)
    return accelerator.device_name(env.local_rank) if accelerator.device_name() != "cpu" else "cpu"


class _RankFilter(logging.Filter):
    """Rank 0 logs everything; other ranks only warnings and errors, each line marked with its rank."""

    def __init__(self, env: DistEnv) -> None:
        super().__init__()
        self.env = env

    def filter(self, record: logging.LogRecord) -> bool:
        if self.env.rank != 0 and record.levelno < logging.WARNING:
            return False
        if self.env.world_size > 1 and not getattr(record, "_rank_marked", False):
            record.msg = f"[rank {self.env.rank}] {record.msg}"
            record._rank_marked = True
        return True


def configure_logging(env: DistEnv, verbose: bool) -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RankFilter(env))
    for name in ("DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def shutdown_distributed(env: DistEnv) -> None:
    """The counterpart of :func:`init_distributed`: leave the process group, then free what DeepSpeed leaves."""
    dist.destroy_process_group()
    remove_shm_buffer(env)


SHM = Path("/dev/shm")
SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer_"


def _mapped_shm_names() -> set[str]:
    """Names of the /dev/shm files that a live process (of those this user can inspect) has mapped."""
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if SHM_BUFFER_PREFIX in line:
                names.add(Path(line.split(None, 5)[-1].removesuffix(" (deleted)")).name)
    return names


def sweep_stale_shm_buffers(min_age_s: float = 60.0) -> list[Path]:
    """Unlink this user's DeepSpeed CPU all-reduce buffers that no live process maps: what runs killed with
    SIGKILL leave (~48 MB a rank), which a node that requeues a job would otherwise collect until its
    memory is full. Buffers younger than ``min_age_s`` are left alone (a starting run may not map its own yet)."""
    ours = list(SHM.glob(f"{SHM_BUFFER_PREFIX}{os.getuid()}_*"))
    if not ours:
        return []
    mapped, now, removed = _mapped_shm_names(), time.time(), []
    for path in ours:
        try:
            if path.name in mapped or now - path.stat().st_mtime < min_age_s:
                continue
            size = path.stat().st_size
            path.unlink()
        except OSError:
            continue
        removed.append(path)
        log.info("removed %s (%.0f MB), left in /dev/shm by a killed run", path, size / 2**20)
    return removed


def remove_shm_buffer(env: DistEnv) -> None:
    """Unlink this rank's ``/dev/shm`` buffer of DeepSpeed's CPU shared-memory all-reduce.

    DeepSpeed 0.19 creates one ~48 MB segment per rank and run (named by user, master address and
    port) and never unlinks it: every CPU run leaked ~100 MB of RAM until /dev/shm filled the
    machine's memory. Unlinking after the process group is gone is safe: peers that still map it keep
    their mapping. A run killed with SIGKILL cannot do this; the next start on the node sweeps what it left
    (:func:`sweep_stale_shm_buffers`).
    """
    name = (f"{SHM_BUFFER_PREFIX}{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{env.rank}")
    with contextlib.suppress(OSError):
        (Path("/dev/shm") / name).unlink()

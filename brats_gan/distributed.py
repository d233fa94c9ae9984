"""This process's place in a DeepSpeed job: rank and world from the launcher, the process group, the
device, per-rank logging, and the cleanup DeepSpeed leaves undone on CPU.

Nothing listens beyond this machine unless the job spans machines: a process alone meets in an in-process
store, and a job whose MASTER_ADDR is a loopback address (the ``deepspeed`` launcher's on one node) meets
on loopback, its gloo sockets there too. The ranks meet within ``BRATS_GAN_RENDEZVOUS_TIMEOUT`` seconds
(default 600), waiting in Python so that SIGTERM or Ctrl-C stops the wait at once.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import socket
import stat
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from brats_gan.errors import UserError

log = logging.getLogger(__name__)

#: what a launcher (``deepspeed``, ``torchrun``, ``launch/train_slurm.sh``) sets for every rank
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
RENDEZVOUS_TIMEOUT_VARIABLE = "BRATS_GAN_RENDEZVOUS_TIMEOUT"
#: seconds the ranks of a job wait for each other: long enough for nodes that start minutes apart (an
#: image to pull, DeepSpeed's op to build), short enough that a wrong WORLD_SIZE does not hang a job
DEFAULT_RENDEZVOUS_TIMEOUT_S = 600.0


class LaunchError(UserError):
    """The launcher's environment is incomplete or wrong, or the ranks did not meet: one line naming the
    variable. ``every_rank``: every rank of the job has the same problem, so one rank per node says it."""

    def __init__(self, message: str, every_rank: bool = False) -> None:
        super().__init__(message)
        self.every_rank = every_rank


def _whole(name: str, low: int, high: int | None = None, what: str = "") -> int:
    value = os.environ[name]
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise LaunchError(f"{name} {value!r}{what} must be a whole number {bound}", every_rank=name not in ("RANK", "LOCAL_RANK"))
    return number


def rendezvous_timeout() -> float:
    """Seconds the ranks wait for each other: ``BRATS_GAN_RENDEZVOUS_TIMEOUT`` or the default."""
    value = os.environ.get(RENDEZVOUS_TIMEOUT_VARIABLE)
    if value is None:
        return DEFAULT_RENDEZVOUS_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise LaunchError(f"{RENDEZVOUS_TIMEOUT_VARIABLE} {value!r} must be a number of seconds above 0 "
                          f"(default {DEFAULT_RENDEZVOUS_TIMEOUT_S:g})", every_rank=True)
    return seconds


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, from the launcher's environment (or a one-process default:
    ``master_addr`` None)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None = None
    master_port: int | None = None
    rendezvous_timeout_s: float = DEFAULT_RENDEZVOUS_TIMEOUT_S

    @property
    def launched(self) -> bool:
        """Started by a launcher, with peers to meet at ``master_addr:master_port`` (perhaps none)."""
        return self.master_addr is not None

    @classmethod
    def from_environ(cls, local_rank_arg: int | None = None) -> DistEnv:
        """Without RANK and WORLD_SIZE one process on its own; with either, all of ``LAUNCHER_VARIABLES``,
        checked, so that a partial or wrong launch is refused by name before anything starts."""
        env = os.environ
        if "RANK" not in env and "WORLD_SIZE" not in env:
            return cls(0, 1, 0, 1)
        started = [name for name in ("RANK", "WORLD_SIZE") if name in env]
        given = [name for name in LAUNCHER_VARIABLES if env.get(name)] or started
        missing = [name for name in LAUNCHER_VARIABLES if not env.get(name)]
        if missing:
            raise LaunchError(
                f"{_and(given)} {'is' if len(given) == 1 else 'are'} set but {_and(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not: a launcher (deepspeed, torchrun, launch/train_slurm.sh) "
                f"sets all of {', '.join(LAUNCHER_VARIABLES)} for every rank; unset {_and(started)} to train in "
                "one process")
        world = _whole("WORLD_SIZE", 1)
        rank = _whole("RANK", 0)
        if rank >= world:
            raise LaunchError(f"RANK {rank} is not below WORLD_SIZE {world}: ranks count from 0 to WORLD_SIZE - 1")
        port = _whole("MASTER_PORT", 1, 65535, " (the launcher's --master_port)")
        if "LOCAL_RANK" in env:
            local = _whole("LOCAL_RANK", 0)
        else:
            local = local_rank_arg if local_rank_arg is not None else 0
        sizes = [name for name in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE") if env.get(name)]  # deepspeed's, torchrun's
        local_world = _whole(sizes[0], 1) if sizes else world
        return cls(rank, world, local, local_world, env["MASTER_ADDR"], port, rendezvous_timeout())


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def free_port() -> int:
    """A local port free now (the benchmarks' launcher ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_this_machine_only(address: str) -> bool:
    """``address`` names this machine wherever it is read (a loopback address, ``localhost``), so every
    rank that meets there runs here. A host name that merely resolves to loopback here (Debian's
    127.0.1.1 for its own name) does not count: other machines resolve it otherwise."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class _Session:
    """What :func:`init_distributed` changed in this process, undone by :func:`shutdown_distributed` (a run
    inside a longer-lived process, such as a test or a notebook, leaves its environment as it found it)."""

    def __init__(self) -> None:
        self.environ: dict[str, str | None] = {}
        self.reserved: socket.socket | None = None

    def setenv(self, **values: str) -> None:
        for name, value in values.items():
            self.environ.setdefault(name, os.environ.get(name))
            os.environ[name] = value

    def undo(self) -> None:
        for name, value in self.environ.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self.environ.clear()
        if self.reserved is not None:
            self.reserved.close()
            self.reserved = None


_session = _Session()


def _loopback_interface() -> str | None:
    with contextlib.suppress(OSError):
        socket.if_nametoindex("lo")
        return "lo"
    return None


def init_distributed(env: DistEnv) -> str:
    """Threads, process group and device; returns the device name.

    The DeepSpeed launcher sets no OMP_NUM_THREADS, so every CPU rank would use every core (two
    CPU ranks: ~400 ms/step instead of ~110 ms): each rank gets cores / ranks-on-this-node unless the
    user set OMP_NUM_THREADS. Without the launcher DeepSpeed would fall back to MPI discovery (and fail
    without mpi4py), so a single process describes itself as rank 0 of 1 and joins a group of its own,
    in an in-process store: nothing listens. A launched job meets in a TCP store of its own making
    (:func:`rendezvous`), bound to loopback when MASTER_ADDR is (torch's own binds every interface).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.constants import default_pg_timeout

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // env.local_world_size))
    accelerator = get_accelerator()
    cpu = accelerator.device_name() == "cpu"
    backend = "gloo" if cpu else accelerator.communication_backend_name()
    try:
        if backend == "gloo" and (not env.launched or on_this_machine_only(env.master_addr)):
            interface = _loopback_interface()
            if interface and "GLOO_SOCKET_IFNAME" not in os.environ:
                _session.setenv(GLOO_SOCKET_IFNAME=interface)  # gloo's own sockets: loopback, not the host's address
        if env.launched:
            store = rendezvous(env)
            store.set_timeout(default_pg_timeout)
            dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size,
                                    timeout=default_pg_timeout)
        else:
            # The variables name DeepSpeed's shared-memory buffer; the port stays bound (never listening)
            # for the whole run, so no launcher on this machine can be handed it and share the buffer.
            _session.reserved = socket.socket()
            _session.reserved.bind(("127.0.0.1", 0))
            _session.setenv(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(_session.reserved.getsockname()[1]))
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        if cpu and env.local_rank == 0:
            sweep_stale_shm_buffers()
        deepspeed.init_distributed(dist_backend=backend)
        if not cpu:
            accelerator.set_device(env.local_rank)
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        _session.undo()
        raise
    return accelerator.device_name(env.local_rank) if not cpu else "cpu"


JOINED = "brats_gan/ranks_joined"
_POLL_S = 0.1
_SAY_WAITING_AFTER_S = 2.0


def rendezvous(env: DistEnv) -> dist.TCPStore:
    """The job's store once every rank has joined it, within ``env.rendezvous_timeout_s``.

    Rank 0 serves it at MASTER_ADDR:MASTER_PORT, the others connect; each adds itself to a count and
    waits for WORLD_SIZE. Every wait is Python's, in short steps, so a signal stops it at once (torch's
    own rendezvous waits inside C++, where SIGTERM is only seen when it gives up). Raises
    :class:`LaunchError` naming the variables when the port is taken or the ranks do not meet in time.
    """
    timeout = env.rendezvous_timeout_s
    started = time.monotonic()
    deadline = started + timeout
    where = f"{env.master_addr}:{env.master_port} (MASTER_ADDR:MASTER_PORT)"
    advice = f"or give a slow start longer with {RENDEZVOUS_TIMEOUT_VARIABLE}=SECONDS (now {timeout:g})"
    # torchrun's agent serves the store itself and outlives a restart of the ranks: each attempt counts apart
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    key = f"{JOINED}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}" if agent else JOINED
    store = _serve(env, where, timeout) if env.rank == 0 and not agent else _connect(env, where, deadline, advice)
    joined = store.add(key, 1)
    said = False
    while joined < env.world_size:
        waited = time.monotonic() - started
        if waited >= timeout:
            raise LaunchError(f"only {joined} of WORLD_SIZE={env.world_size} ranks met at {where} within "
                              f"{timeout:g} s: start every rank of the job, {advice}")
        if not said and waited >= _SAY_WAITING_AFTER_S and env.rank == 0:
            log.info("waiting for %d more of %d ranks at %s (up to %g s, %s)", env.world_size - joined,
                     env.world_size, where, timeout, RENDEZVOUS_TIMEOUT_VARIABLE)
            said = True
        time.sleep(_POLL_S)
        joined = store.add(key, 0)
    return store


def _serve(env: DistEnv, where: str, timeout: float) -> dist.TCPStore:
    """Rank 0's store: on loopback when MASTER_ADDR is, else where torch binds it (every interface)."""
    assert env.master_addr is not None and env.master_port is not None
    taken = LaunchError(f"{where} is taken by another process: pick a free port (the launcher's --master_port)")
    listen_fd = None
    host = env.master_addr
    if on_this_machine_only(host):
        host = "127.0.0.1" if host == "localhost" else host
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's: a restart reuses its port
        try:
            listener.bind((host, env.master_port))
            listener.listen()
        except OSError:
            listener.close()
            raise taken from None
        listen_fd = listener.detach()  # the store owns it now
    try:
        return dist.TCPStore(host, env.master_port, env.world_size, is_master=True, timeout=timedelta(seconds=timeout),
                             wait_for_workers=False, master_listen_fd=listen_fd)
    except RuntimeError as err:
        if "address already in use" in str(err).lower():
            raise taken from None
        raise


def _connect(env: DistEnv, where: str, deadline: float, advice: str) -> dist.TCPStore:
    """A client of rank 0's store once rank 0 answers: plain connections probe for it until ``deadline``
    (each of torch's own failed attempts prints a C++ stack)."""
    assert env.master_addr is not None and env.master_port is not None
    while True:
        try:
            with socket.create_connection((env.master_addr, env.master_port),
                                          timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                break
        except OSError as err:
            if time.monotonic() >= deadline:
                raise LaunchError(f"rank {env.rank} of {env.world_size} could not reach rank 0 at {where} within "
                                  f"{env.rendezvous_timeout_s:g} s ({err.strerror or err}): start rank 0 there, "
                                  f"{advice}") from None
            time.sleep(_POLL_S)
    return dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False,
                         timeout=timedelta(seconds=max(1.0, deadline - time.monotonic())), wait_for_workers=False)


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
    """The counterpart of :func:`init_distributed`: leave the process group, free what DeepSpeed leaves,
    and give back the environment as it was."""
    try:
        dist.destroy_process_group()
        remove_shm_buffer(env)
    finally:
        _session.undo()


SHM = Path("/dev/shm")
SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer_"
_SHM_NAME = re.compile(re.escape(SHM_BUFFER_PREFIX) + r"(?P<uid>\d+)_(?P<addr>.*)_(?P<port>[^_]*)_(?P<rank>\d+)")


def shm_buffer_name(rank: int, master_addr: str, master_port: int | str, uid: int | None = None) -> str:
    """The name DeepSpeed 0.19 gives a rank's CPU all-reduce buffer in /dev/shm (ops/csrc/cpu/comm/shm.cpp):
    user, MASTER_ADDR, MASTER_PORT and rank, so a job's buffers are told apart by its master port."""
    return f"{SHM_BUFFER_PREFIX}{os.getuid() if uid is None else uid}_{master_addr}_{master_port}_{rank}"


def shm_buffers(master_port: int | None = None) -> set[Path]:
    """This user's DeepSpeed buffers in /dev/shm: every one, or those of the job whose master port is given."""
    found = set()
    for path in SHM.glob(f"{SHM_BUFFER_PREFIX}{os.getuid()}_*"):
        match = _SHM_NAME.fullmatch(path.name)
        if match and (master_port is None or match["port"] == str(master_port)):
            found.add(path)
    return found


def _job(name: str) -> str:
    """A buffer's job: its name without the rank."""
    return name.rsplit("_", 1)[0]


def mapped_shm_names() -> set[str]:
    """Names of the /dev/shm buffers that a live process (of those this user can inspect) has mapped."""
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
    """Unlink this user's DeepSpeed CPU all-reduce buffers whose job no live process maps: what runs killed
    with SIGKILL leave (~48 MB a rank), which a node that requeues a job would otherwise collect until its
    memory is full.

    What it may touch: regular files that this user owns and that carry this user's id in the name (never
    another user's, even as root). What it keeps: every buffer of a job of which any buffer is mapped by a
    process it can see, and buffers younger than ``min_age_s`` (a starting rank may not map its peers' yet).
    Why that is safe for a live job it cannot see (another PID namespace sharing /dev/shm): DeepSpeed opens
    every peer's buffer once, right after the ranks meet, and never by name again; after that, unlinking the
    name frees nothing a rank still maps (the memory goes when the last mapping does), as with
    :func:`remove_shm_buffer`. Only a rank stalled for ``min_age_s`` between meeting its peers and opening
    their buffers could miss one.
    """
    uid, now, candidates = os.getuid(), time.time(), []
    for path in shm_buffers():
        try:
            st = path.lstat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_uid == uid and now - st.st_mtime >= min_age_s:
            candidates.append((path, st.st_size))
    if not candidates:
        return []
    live_jobs = {_job(name) for name in mapped_shm_names()}
    removed = []
    for path, size in candidates:
        if _job(path.name) in live_jobs:
            continue
        try:
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
    name = shm_buffer_name(env.rank, os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""))
    with contextlib.suppress(OSError):
        (SHM / name).unlink()

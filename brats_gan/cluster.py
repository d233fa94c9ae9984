"""The Dask client a command works through: a LocalCluster of its own, or an existing scheduler."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

from brats_gan.errors import describe

log = logging.getLogger(__name__)

#: glibc settings for preprocessing workers (see ``dask_client``); launch/preprocess_slurm.sh sets the same.
WORKER_MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": 268435456, "MALLOC_MMAP_THRESHOLD_": 33554432}


@contextlib.contextmanager
def _ignoring_sigint() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class ClusterError(RuntimeError):
    """No cluster to work with: a bad worker count, an unreachable or malformed scheduler address."""


def check_dashboard_port(port: int) -> None:
    """0 asks for any free port; anything outside 0-65535 is refused (Dask would wrap 70000 round to 4464
    and take -5 as "any free port")."""
    if not 0 <= port <= 65535:
        raise ClusterError(f"--dashboard-port {port} is not a port: give 1-65535, or 0 for any free port")


@contextlib.contextmanager
def dask_client(
    workers: int | None = None,
    scheduler: str | None = None,
    dashboard_port: int = 8787,
    announce=print,
    connect_timeout_s: float = 30.0,
) -> Iterator[distributed.Client]:  # noqa: F821
    """Yield a connected client; a LocalCluster listens on 127.0.0.1 only and is shut down afterwards.

    Workers are single-threaded processes: decoding and numpy work per subject hold the GIL often
    enough that processes beat threads, and one subject per core keeps memory predictable.
    """
    import dask
    from distributed import Client, LocalCluster

    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # it logs every worker start and stop
        logging.getLogger("distributed").setLevel(logging.WARNING)
        # a restarted worker is retried quietly (a task that keeps killing workers ends as KilledWorker,
        # which the command reports); with SIGTERM to the job the workers die before this process stops
        logging.getLogger("distributed.nanny").setLevel(logging.ERROR)

    if workers is not None and workers < 1:
        raise ClusterError(f"--workers must be at least 1, got {workers}")
    check_dashboard_port(dashboard_port)
    if scheduler:
        try:
            client = Client(scheduler, timeout=connect_timeout_s)
        except (OSError, TimeoutError, ValueError, TypeError) as err:
            raise ClusterError(f"--scheduler {scheduler}: cannot connect within {connect_timeout_s:.0f} s "
                               f"({describe(err, 200)}); is the scheduler "
                               "running and the address tcp://HOST:PORT?") from None
        with client:
            announce(f"Dask scheduler {scheduler}; dashboard: {client.dashboard_link}")
            yield client
        return
    n = workers or len(os.sched_getaffinity(0))  # the cores this job may use, not the whole node's
    # Each subject allocates and frees a few 18 MB buffers. With glibc's defaults the freed heap is
    # trimmed back to the OS and faulted in afresh for the next subject (10 K page faults and a third
    # of the task's time); the nanny's own MALLOC_TRIM_THRESHOLD_=65536 is worse still, since setting
    # it sends every such buffer to mmap. A 32 MiB mmap threshold keeps them on the heap and a 256 MiB
    # trim threshold keeps that heap: 54 -> 33 ms per FLAIR volume, for at most 256 MiB kept per worker.
    # The statistical profiler samples every task's stack under the GIL every 10 ms, which costs more
    # than it shows for a few hundred short tasks; the dashboard's task stream and progress pages are
    # unaffected, its Profile page stays empty.
    tuned = {
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": WORKER_MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"],
        "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": WORKER_MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"],
        "distributed.worker.profile.enabled": False,
    }
    # Workers ignore SIGINT (the disposition survives their spawn): Ctrl-C reaches every process of the
    # terminal's group, and this process alone should stop the run and shut them down, in one line
    # rather than a traceback from each worker.
    with dask.config.set(tuned), _ignoring_sigint():
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=f"127.0.0.1:{dashboard_port}",
            # workers' own warnings (a task cancelled on Ctrl-C, memory notices) stay in the dashboard's logs
            silence_logs=logging.DEBUG if logging.getLogger().isEnabledFor(logging.DEBUG) else logging.ERROR,
        )
    with cluster, Client(cluster) as client:
        announce(f"Dask LocalCluster: {n} workers; dashboard: {client.dashboard_link}")
        yield client

"""The Dask client a command works through: a LocalCluster of its own, or an existing scheduler."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def dask_client(
    workers: int | None = None,
    scheduler: str | None = None,
    dashboard_port: int = 8787,
    announce=print,
) -> Iterator["distributed.Client"]:  # noqa: F821
    """Yield a connected client; a LocalCluster listens on 127.0.0.1 only and is shut down afterwards.

    Workers are single-threaded processes: decoding and numpy work per subject hold the GIL often
    enough that processes beat threads, and one subject per core keeps memory predictable.
    """
    import dask
    from distributed import Client, LocalCluster

    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # it logs every worker start and stop
        logging.getLogger("distributed").setLevel(logging.WARNING)

    if scheduler:
        with Client(scheduler) as client:
            announce(f"Dask scheduler {scheduler}; dashboard: {client.dashboard_link}")
            yield client
        return
    n = workers or os.cpu_count() or 1
    # Setting MALLOC_TRIM_THRESHOLD_ at all (the nanny's default) turns off glibc's dynamic mmap
    # threshold, so every 18 MB volume buffer is mmapped and page-faulted afresh (sys time was 30% of
    # the run). The statistical profiler samples every task's stack under the GIL every 10 ms; both
    # cost more than they show for a few hundred 50 ms tasks. The dashboard's task stream and
    # progress pages are unaffected; its Profile page stays empty.
    tuned = {
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
        "distributed.worker.profile.enabled": False,
    }
    with dask.config.set(tuned):
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=f"127.0.0.1:{dashboard_port}",
        )
    with cluster, Client(cluster) as client:
        announce(f"Dask LocalCluster: {n} workers; dashboard: {client.dashboard_link}")
        yield client

"""One writer at a time for a store or a run folder.

The lock is an ``flock`` on a small file beside the target (``.<name>.lock`` in the same folder: inside a
store, ``to_zarr(mode="w")`` would delete it). The kernel releases it when its process ends, however it
ends, so a killed run never leaves it stuck; the file records who holds it (process, host, command,
start), which is what a second writer is told. The holder removes the file when it finishes. On a file
system without ``flock`` the writer goes on unguarded, with a warning; on NFS a lock of a node that
crashed may outlive it until the server notices.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


class Busy(RuntimeError):
    """Another process is writing the target; the message names it."""


def lock_path(target: str | os.PathLike[str]) -> Path:
    target = Path(target).absolute()
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def exclusive(target: str | os.PathLike[str], what: str = "writing") -> Iterator[None]:
    """Hold the lock of ``target`` inside; raise :class:`Busy` at once if another process holds it."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise Busy(f"{target} is being written by another process ({holder}); wait for it to finish or stop it "
                       f"(the lock goes with the process: {path})") from None
        except OSError as err:  # a file system without flock (Lustre mounted without it, some NFS set-ups)
            os.close(fd)
            log.warning("cannot lock %s (%s): writing without the one-writer guard", path, err.strerror or err)
            yield
            return
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and lock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                                 "command": " ".join(sys.argv)[:300],
                                 "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"{info['what']}: pid {info['pid']} on {info['host']} since {info['since']}, `{info['command']}`"
    except (OSError, ValueError, KeyError):
        return "unknown holder"

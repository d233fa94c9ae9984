"""Shared fixtures: one real Dask LocalCluster per session, small phantom datasets, the real BraTS case,
and one two-rank training run that several test modules compare their runs with."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from store_factory import store_factory  # noqa: F401  (a fixture the ones below use)
from training_runs import PORTS, REPO, TINY, UNINTERRUPTED_STEPS, launch

SEMAPHORE_PREFIX = "sem.mp-"  # multiprocessing's named semaphores in /dev/shm

REAL_CASE = REPO.parent / "shared/data/brats2023-sample"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` run only where torch sees a GPU; elsewhere they are skipped with the reason."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch  # here: collecting the rest of the suite needs no torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
                                   "run `python -m pytest -m cuda` on a machine with one")
    for item in marked:
        item.add_marker(skip)


def cli(*args: str | Path) -> list[str]:
    """The command line of `brats-gan ARGS` run with this interpreter."""
    return [sys.executable, "-m", "brats_gan", *map(str, args)]


HEAVY_MODULES = ("torch", "deepspeed")
# `brats-gan ARGS`, then a last stdout line naming which of HEAVY_MODULES the command imported.
_WATCHING_IMPORTS = ("import json, sys\nfrom brats_gan.commands import main\nrc = main(sys.argv[1:])\n"
                     f"print('imported:', json.dumps([m for m in {HEAVY_MODULES!r} if m in sys.modules]))\n"
                     "sys.exit(rc)")


def run_cli(*args: str | Path, env: Mapping[str, str] | None = None, timeout: float = 600,
            ok: bool = False, watch_imports: bool = False) -> subprocess.CompletedProcess:
    """Run `brats-gan ARGS` as a user does and wait for it; ``env`` is added to this environment.

    The result has ``stdout`` and ``stderr`` apart and ``output`` (both). With ``ok=True`` a non-zero
    exit fails the test, with the output in the message; otherwise the exit status is the caller's to check.
    With ``watch_imports=True`` it also has ``imported``: the set of ``HEAVY_MODULES`` the command loaded
    (a command that needs neither torch nor DeepSpeed must not pay for their start-up).
    """
    command = [sys.executable, "-c", _WATCHING_IMPORTS, *map(str, args)] if watch_imports else cli(*args)
    proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env} if env else None)
    proc.output = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    if watch_imports:
        lines = [line for line in proc.stdout.splitlines() if line.startswith("imported: ")]
        proc.imported = set(json.loads(lines[-1].removeprefix("imported: "))) if lines else None  # type: ignore[attr-defined]
    if ok:
        assert proc.returncode == 0, f"brats-gan {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.output}"
    return proc


@pytest.fixture
def one_thread():
    """Small tensors: on a shared 2-core runner two OpenMP threads spin against other jobs (5 s vs 0.2 s)."""
    import torch  # here: the session's other fixtures need no torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shm_buffers(port: int | None = None) -> set[Path]:
    """DeepSpeed's /dev/shm all-reduce buffers (one per rank) that a test may call its own: with ``port``,
    those of the job with that master port (a launch's, whose port the test picked); without, this user's
    that no live process maps (what a one-process run, whose port the test cannot know, would leave), so
    that another job running beside the suite is never counted."""
    from brats_gan import distributed  # here: collecting the suite needs no torch

    if port is not None:
        return distributed.shm_buffers(port)
    mapped = distributed.mapped_shm_names()
    return {path for path in distributed.shm_buffers() if path.name not in mapped}


def _group_pids(pgid: int) -> list[int]:
    """The running processes of group ``pgid``; not zombies, which map nothing and wait on their parent."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(proc.name)) == pgid and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(proc.name))
        except (OSError, IndexError):
            continue
    return pids


def _mapped_shm_inodes(pids: list[int] | None = None) -> set[int]:
    """Inodes of the /dev/shm files that the processes ``pids`` (every visible one if None) map. By inode, not
    name: glibc's sem_open maps a temporary name, links it to the semaphore's and unlinks it, so the
    creator's map shows ``sem.XXXXXX (deleted)``."""
    inodes = set()
    maps = [Path(f"/proc/{pid}/maps") for pid in pids] if pids is not None else Path("/proc").glob("[0-9]*/maps")
    for path in maps:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].startswith("/dev/shm/"):
                inodes.add(int(fields[4]))
    return inodes


def kill_group(pgid: int, timeout: float = 30) -> set[Path]:
    """SIGKILL the process group ``pgid``, as a scheduler's last resort does, and unlink the multiprocessing
    semaphores its processes held; return those unlinked. A spawn-context process (Dask's workers) registers
    each with a resource tracker, which unlinks what its registrants leave; SIGKILL to the whole group takes
    the tracker too, and they would outlive the suite in the machine's /dev/shm. The group is stopped first, so
    none is made between the listing and the kill; only this user's that no live process still maps go."""
    held: set[int] = set()
    try:
        os.killpg(pgid, signal.SIGSTOP)
        held = _mapped_shm_inodes(_group_pids(pgid))
    except ProcessLookupError:
        pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while _group_pids(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    orphaned = held - _mapped_shm_inodes()
    removed = set()
    for path in Path("/dev/shm").glob(f"{SEMAPHORE_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            info = path.stat()
            if info.st_ino in orphaned and info.st_uid == os.getuid():
                path.unlink()
                removed.add(path)
    return removed


@pytest.fixture(scope="session", autouse=True)
def sweep_deepspeed_shm() -> Iterator[None]:
    """Remove the /dev/shm all-reduce buffers that DeepSpeed runs of this session left (runs killed with
    SIGKILL; a finished run unlinks its own): those of the master ports it handed out, no other job's."""
    yield
    for port in PORTS:
        for leftover in shm_buffers(port):
            leftover.unlink(missing_ok=True)


def _torch_extensions_dir(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The suite's own folder of built torch extensions, kept between runs for this interpreter
    environment and these torch and DeepSpeed versions (another virtualenv's build in the shared
    ~/.cache/torch_extensions made a run rebuild DeepSpeed's op inside a test's file-size limit)."""
    versions = "-".join(f"{name}{importlib.metadata.version(name)}" for name in ("torch", "deepspeed"))
    environment = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    key = f"py{sys.version_info[0]}{sys.version_info[1]}-{versions}-{environment}"
    cache = getattr(config, "cache", None)  # absent with -p no:cacheprovider: then this session's own
    root = cache.mkdir("torch_extensions") if cache is not None else tmp_path_factory.getbasetemp() / "torch_extensions"
    return root / key


@pytest.fixture(scope="session", autouse=True)
def torch_extensions(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """TORCH_EXTENSIONS_DIR of every process the suite starts: the suite's own (see above)."""
    folder = _torch_extensions_dir(pytestconfig, tmp_path_factory)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_EXTENSIONS_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def deepspeed_op(torch_extensions: Path) -> Path:
    """DeepSpeed's CPU shared-memory op built (~30 s the first time) or found in the suite's folder, by
    a process of its own without resource limits, before any test that launches DeepSpeed under one."""
    if (torch_extensions / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").exists():  # built for these versions
        return torch_extensions
    proc = subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"building DeepSpeed's op in {torch_extensions} failed:\n{proc.stderr[-3000:]}"
    return torch_extensions


@pytest.fixture(scope="session")
def dask_client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        yield client


@pytest.fixture(scope="session")
def real_case() -> Path:
    if not REAL_CASE.is_dir():
        pytest.skip(f"the real BraTS case is not at {REAL_CASE}")
    return REAL_CASE


@pytest.fixture(scope="session")
def phantoms_2020(tmp_path_factory) -> Path:
    """Six small subjects in the BraTS 2020 layout, all modalities and a segmentation."""
    from brats_gan.phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("brats2020") / "MICCAI_BraTS2020_TrainingData"
    write_phantom_dataset(root, n_subjects=6, layout="2020", shape=(64, 64, 40), seed=1)
    return root


@pytest.fixture
def env_unbuffered() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def store(store_factory) -> Path:  # noqa: F811
    """48 samples: with tiny.json's micro-batch of 4, six micro-batches per rank per epoch on two ranks."""
    return store_factory(subjects=4, slices=12)


@pytest.fixture(scope="session")
def uninterrupted(store: Path, tmp_path_factory: pytest.TempPathFactory, deepspeed_op: Path) -> Path:
    """Two ranks on one node, UNINTERRUPTED_STEPS (12) tiny steps, a checkpoint every 3: the reference the killed-and-resumed
    run (test_train.py) and the two-node run (test_multinode.py) must reproduce. Read-only."""
    run = tmp_path_factory.mktemp("runs") / "uninterrupted"
    proc = launch("--store", store, "--out", run, "--steps", str(UNINTERRUPTED_STEPS), *TINY)
    assert proc.returncode == 0, proc.output
    leaked = shm_buffers(proc.port)
    assert not leaked, f"a finished run must not leave DeepSpeed's shared memory behind: {leaked}"
    return run

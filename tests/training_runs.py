"""Launching real training runs from tests: the DeepSpeed command lines and what a finished run holds.

Shared by ``test_train.py`` (two ranks on one node) and ``test_multinode.py`` (two "nodes" on this
machine), which compare their runs with the same reference run (``uninterrupted`` in conftest.py).
"""

from __future__ import annotations

import contextlib
import csv
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--recipe", "poster", "--seed", "0", "--checkpoint-every", "3"]  # five critic steps a step
UNINTERRUPTED_STEPS = 12
LAUNCH_TIMEOUT = 300


#: every master port this session handed out: DeepSpeed names its /dev/shm buffers by it, so these and no
#: others are the session's own (conftest.py sweeps what its killed runs left, never another job's)
PORTS: set[int] = set()


def free_port() -> int:
    """A port free now: other suites may be running launchers on this machine too."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    PORTS.add(port)
    return port


def deepspeed_command() -> list[str]:
    exe = shutil.which("deepspeed")
    return [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]


def launcher(*args: str | Path, ranks: int = 2, port: int | None = None) -> list[str]:
    """``deepspeed --num_gpus N --master_port P --module brats_gan.train ARGS``, on a free port unless given."""
    return [*deepspeed_command(), "--num_gpus", str(ranks), "--master_port", str(port or free_port()),
            "--module", "brats_gan.train", *map(str, args)]


def master_port(command: list[str]) -> int:
    """The master port of a :func:`launcher` command line (its DeepSpeed buffers carry it)."""
    return int(command[command.index("--master_port") + 1])


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` (a launcher and its ranks) still runs."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def signal_after_steps(command: list[str], run: Path, log: Path, steps: int, signum: int,
                       env: dict[str, str] | None = None,
                       watch: Callable[[int], AbstractContextManager] | None = None) -> subprocess.Popen:
    """Launch ``command`` in a process group of its own (output to ``log``) and, once ``run`` has ``steps``
    metric rows, send ``signum`` to the whole group, as a terminal's Ctrl-C or a scheduler's SIGTERM does;
    return once every process of the group has exited (60 s at most; what is left is killed on failure).
    ``watch(pid)``, a context manager, is held from start-up to that step (e.g. :class:`Listeners`)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env=env)
        try:
            with watch(proc.pid) if watch else contextlib.nullcontext():
                deadline = time.monotonic() + LAUNCH_TIMEOUT
                while not (run / "metrics.csv").exists() or len(metric_steps(run)) < steps:
                    assert proc.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, f"no step {steps} within {LAUNCH_TIMEOUT} s"
                    time.sleep(0.02)
            os.killpg(proc.pid, signum)
            proc.wait(timeout=60)
            deadline = time.monotonic() + 60  # the launcher exits at once; the ranks finish their step
            while group_alive(proc.pid):
                assert time.monotonic() < deadline, \
                    f"the ranks did not stop within 60 s of {signal.Signals(signum).name}"
                time.sleep(0.05)
        finally:
            if proc.poll() is None or group_alive(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc


def launch(*args: str | Path, ranks: int = 2) -> subprocess.CompletedProcess:
    """A launch run to its end; ``output`` holds stdout and stderr, ``port`` its master port."""
    command = launcher(*args, ranks=ranks)
    proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=REPO)
    proc.output = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    proc.port = master_port(command)  # type: ignore[attr-defined]
    return proc


class Listeners:
    """Every TCP address that a process or any of its descendants listens on, sampled continuously by a
    thread from entering until leaving (a listener that lived only around one step is seen too)."""

    INTERVAL_S = 0.02

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: dict[tuple[str, int], tuple[int, str]] = {}  # (address, port) -> (pid, command) first seen
        self.samples = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Listeners:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        import psutil  # here: conftest.py imports this module for every test session

        while not self._done.wait(self.INTERVAL_S):
            try:
                root = psutil.Process(self.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in tree:
                try:
                    for conn in proc.net_connections(kind="tcp"):
                        if conn.status == psutil.CONN_LISTEN and tuple(conn.laddr) not in self.seen:
                            self.seen[tuple(conn.laddr)] = (proc.pid, " ".join(proc.cmdline()[:4]))
                except psutil.Error:
                    continue
            self.samples += 1

    def beyond_loopback(self) -> dict[tuple[str, int], tuple[int, str]]:
        """The listeners seen that other machines could reach (on ``::`` or ``0.0.0.0`` included)."""
        return {addr: who for addr, who in self.seen.items() if not ipaddress.ip_address(addr[0]).is_loopback}


def metric_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def metric_steps(run: Path) -> list[int]:
    return [int(row["step"]) for row in metric_rows(run)]


def model_states(run: Path, step: int) -> dict[str, dict]:
    import torch  # here, not at the top: conftest.py imports this module for every test session

    from brats_gan.checkpoints import ENGINES, ema_weights_path, model_states_path

    states = {tag: torch.load(model_states_path(run, step, tag), weights_only=True) for tag in ENGINES}
    if ema_weights_path(run, step).exists():  # the averaged generator (on by default)
        states["generator_ema"] = torch.load(ema_weights_path(run, step), weights_only=True)
    return states


def assert_same_weights(run: Path, reference: Path, step: int) -> None:
    """The generator, the critic and the averaged generator of ``run`` at ``step`` hold the reference run's
    weights there, to 1e-6."""
    import torch

    got, expected = model_states(run, step), model_states(reference, step)
    assert got.keys() == expected.keys()
    for tag in expected:
        assert got[tag]["module"].keys() == expected[tag]["module"].keys(), tag
        for name, tensor in expected[tag]["module"].items():
            torch.testing.assert_close(got[tag]["module"][name], tensor, rtol=0, atol=1e-6,
                                       msg=f"{tag}.{name} at step {step} of {run} differs from {reference}")

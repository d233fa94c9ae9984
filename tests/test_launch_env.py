"""What the launcher hands each rank (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): a partial or wrong
environment refused by name before anything starts, ranks that do not all come stopping with one line
within BRATS_GAN_RENDEZVOUS_TIMEOUT (and at once on SIGTERM), nothing listening beyond loopback on one
machine, a Ctrl-C of a two-rank launch stopping every rank with one line, and a run inside a longer-lived
process giving its environment back."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import cli, run_cli, shm_buffers
from training_runs import (
    LAUNCH_TIMEOUT,
    REPO,
    TINY,
    Listeners,
    free_port,
    launcher,
    master_port,
    signal_after_steps,
)

from brats_gan.commands import main as cli_main

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "BRATS_GAN_RENDEZVOUS_TIMEOUT")


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """This process as a shell without a launcher's variables (a test may then set some)."""
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_partial_or_wrong_launcher_environment_is_refused_by_name(
        store: Path, tmp_path: Path, no_launcher: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    argv = ["train", "--store", str(store), "--out", str(out), "--preset", "tiny", "--steps", "1"]
    whole = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    cases = [
        ({"RANK": "1"}, "RANK is set but WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not"),
        ({"RANK": "0"}, "RANK is set but WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not"),  # was: No module 'mpi4py'
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK, MASTER_ADDR and MASTER_PORT are not"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "RANK and WORLD_SIZE are set but MASTER_ADDR and MASTER_PORT are not"),
        ({**whole, "MASTER_PORT": "70000"},
         "MASTER_PORT '70000' (the launcher's --master_port) must be a whole number from 1 to 65535"),
        ({**whole, "RANK": "2"}, "RANK 2 is not below WORLD_SIZE 2"),
        ({**whole, "WORLD_SIZE": "two"}, "WORLD_SIZE 'two' must be a whole number"),
        ({**whole, "BRATS_GAN_RENDEZVOUS_TIMEOUT": "soon"}, "BRATS_GAN_RENDEZVOUS_TIMEOUT 'soon' must be a number"),
    ]
    for env, message in cases:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            assert cli_main(argv) == 2, env
        err = capsys.readouterr().err
        assert f"brats-gan train: error: {message}" in err, (env, err)
        assert "Traceback" not in err
    assert not out.exists(), "nothing is written for a refused launch"

    # what the launcher runs on each rank, as a user would try it by hand
    proc = subprocess.run([sys.executable, "-m", "brats_gan.train", *argv[1:]], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "RANK": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "brats_gan.train [rank 1]: error: RANK is set but WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not" \
           in proc.stderr and "unset RANK to train in one process" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_bad_master_port_is_refused_once_for_the_whole_launch(store: Path, tmp_path: Path) -> None:
    proc = subprocess.run(launcher("--store", store, "--out", tmp_path / "run", "--steps", "1", *TINY, port=70000),
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=REPO, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    line = "brats_gan.train: error: MASTER_PORT '70000' (the launcher's --master_port) must be a whole number from 1 to"
    assert output.count(line) == 1, output
    assert "port must have value" not in output and "Traceback" not in output, output
    assert not (tmp_path / "run").exists()


def test_ranks_that_do_not_all_start_stop_waiting_with_one_line_and_sigterm_ends_the_wait(
        store: Path, tmp_path: Path, no_launcher: pytest.MonkeyPatch) -> None:
    """One process of a job of two (the other never starts): a bounded wait, and SIGTERM ends it at once
    (it used to wait ten minutes and then take ~500 s more after SIGTERM)."""
    def rank_0_of_2(port: int, **env: str) -> dict[str, str]:
        return {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **env}

    short, waiting = free_port(), free_port()
    train = ["train", "--store", store, "--preset", "tiny", "--steps", "1"]
    with open(tmp_path / "waiting.log", "w") as log:  # the default wait (600 s), stopped by SIGTERM
        proc = subprocess.Popen(cli(*train, "--out", tmp_path / "waiting"), stdout=log, stderr=subprocess.STDOUT,
                                env=rank_0_of_2(waiting), start_new_session=True)
        try:
            refused = run_cli(*train, "--out", tmp_path / "short", timeout=120,  # meanwhile, a short wait
                              env=rank_0_of_2(short, BRATS_GAN_RENDEZVOUS_TIMEOUT="3"))
            deadline = time.monotonic() + 120
            while "waiting for 1 more of 2 ranks" not in (tmp_path / "waiting.log").read_text():
                assert proc.poll() is None, (tmp_path / "waiting.log").read_text()
                assert time.monotonic() < deadline, "rank 0 never said it waits"
                time.sleep(0.1)
            signalled = time.monotonic()
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=30) == 143, (tmp_path / "waiting.log").read_text()
            assert time.monotonic() - signalled < 10, "SIGTERM ends the wait at once"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert refused.returncode == 2, refused.output
    assert (f"brats-gan train: error: only 1 of WORLD_SIZE=2 ranks met at 127.0.0.1:{short} (MASTER_ADDR:MASTER_PORT) "
            "within 3 s: start every rank of the job, or give a slow start longer with "
            "BRATS_GAN_RENDEZVOUS_TIMEOUT=SECONDS") in refused.stderr
    waited = (tmp_path / "waiting.log").read_text()
    assert f"at 127.0.0.1:{waiting} (MASTER_ADDR:MASTER_PORT) (up to 600 s, BRATS_GAN_RENDEZVOUS_TIMEOUT)" in waited
    assert "brats-gan train: stopped by SIGTERM" in waited
    for output in (refused.output, waited):
        assert "Traceback" not in output, output
    assert not (tmp_path / "short").exists() and not (tmp_path / "waiting").exists()


def test_the_rendezvous_names_a_taken_port_and_an_absent_rank_0_and_meets_on_loopback() -> None:
    from brats_gan.distributed import DistEnv, LaunchError, rendezvous

    with socket.socket() as other:  # another job's master on the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        with pytest.raises(LaunchError, match=re.escape(f"127.0.0.1:{taken} (MASTER_ADDR:MASTER_PORT) is taken by "
                                                        "another process: pick a free port (the launcher's "
                                                        "--master_port)")):
            rendezvous(DistEnv(0, 2, 0, 2, "127.0.0.1", taken, 5.0))
    port = free_port()
    with pytest.raises(LaunchError, match=re.escape(f"rank 1 of 2 could not reach rank 0 at 127.0.0.1:{port} "
                                                    "(MASTER_ADDR:MASTER_PORT) within 0.5 s (Connection refused)")):
        rendezvous(DistEnv(1, 2, 1, 2, "127.0.0.1", port, 0.5))

    stores = _meet({rank: DistEnv(rank, 2, rank, 2, "localhost", port, 30.0) for rank in (0, 1)})
    assert sorted(stores) == [0, 1], "both ranks met"
    assert _listening(port) == ["127.0.0.1"]  # torch's own store listens on every address

    # A host name (a multi-node MASTER_ADDR, even one that resolves to loopback here): torch's binding, as before
    host, port = socket.gethostname(), free_port()
    try:
        socket.getaddrinfo(host, port)
    except OSError:
        return
    stores = _meet({rank: DistEnv(rank, 2, rank, 2, host, port, 30.0) for rank in (0, 1)})
    assert sorted(stores) == [0, 1], f"both ranks met at {host}"
    assert _listening(port), port


def _listening(port: int) -> list[str]:
    """The addresses on which this process listens at ``port``."""
    import psutil

    return [c.laddr.ip for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port]


def _meet(env_of_rank: dict[int, object]) -> dict[int, object]:
    """Each rank's :func:`brats_gan.distributed.rendezvous` in a thread of its own; the stores of those that met."""
    from brats_gan.distributed import rendezvous

    stores: dict[int, object] = {}
    threads = [threading.Thread(target=lambda r=rank: stores.update({r: rendezvous(env_of_rank[r])}))
               for rank in sorted(env_of_rank, reverse=True)]  # the last rank first: it waits for rank 0
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return stores


def test_under_torchrun_every_rank_joins_the_agents_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's agent serves the store on MASTER_PORT itself and keeps it across restarts of the ranks."""
    from datetime import timedelta

    import torch.distributed as dist

    from brats_gan.distributed import DistEnv

    port = free_port()
    agent = dist.TCPStore("127.0.0.1", port, 2, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    agent.add("brats_gan/ranks_joined/0", 2)  # both ranks of the first attempt, which then failed
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    stores = _meet({rank: DistEnv(rank, 2, rank, 2, "127.0.0.1", port, 30.0) for rank in (0, 1)})
    assert sorted(stores) == [0, 1], "rank 0 joined the agent's store instead of serving one on its port"
    assert agent.add("brats_gan/ranks_joined/1", 0) == 2


def test_a_run_in_this_process_gives_its_environment_back(store: Path, tmp_path: Path, one_thread: None,
                                                        deepspeed_op: Path, no_launcher: pytest.MonkeyPatch) -> None:
    """A one-process run names DeepSpeed's buffer with launcher variables of its own; left behind, they made
    every later run from the same process (a test session, a notebook) a launched one, listening on every
    address (torch's TCP store on ``::``)."""
    names = (*LAUNCHER_ENV, "GLOO_SOCKET_IFNAME")
    before = {name: os.environ.get(name) for name in names}
    assert cli_main(["train", "--store", str(store), "--out", str(tmp_path / "run"), "--preset", "tiny", "--steps", "1",
                     "--checkpoint-every", "1", "--sample-every", "0", "--swd-images", "0", "--num-workers", "0",
                     "--no-verify-store"]) == 0
    assert {name: os.environ.get(name) for name in names} == before


def test_two_ranks_listen_on_loopback_only_and_ctrl_c_stops_them_with_one_line(store: Path, deepspeed_op: Path,
                                                                              tmp_path: Path) -> None:
    """Ctrl-C in a terminal: SIGINT to the launcher's process group. DeepSpeed's launcher (its runner.py,
    not ours) has no handler for it and prints a KeyboardInterrupt traceback of its own: the one allowed."""
    run = tmp_path / "run"
    command = launcher("--store", store, "--out", run, "--steps", "1000", *TINY)
    port = master_port(command)
    watched: list[Listeners] = []

    def listeners(pid: int) -> Listeners:  # from start-up to the third step
        watched.append(Listeners(pid))
        return watched[0]

    proc = signal_after_steps(command, run, tmp_path / "run.log", 3, signal.SIGINT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, watch=listeners)
    listeners = watched[0]
    assert ("127.0.0.1", port) in listeners.seen and listeners.samples > 10, listeners.seen  # the master's store
    assert not listeners.beyond_loopback(), listeners.seen
    output = (tmp_path / "run.log").read_text()
    assert proc.returncode != 0
    assert len(re.findall(r"stopped by SIGINT after step \d+: ", output)) == 1, output
    assert not shm_buffers(port), "every rank left the process group and freed DeepSpeed's buffer"
    frames = re.findall(r'File "([^"]+)"', output)
    assert not [f for f in frames if "brats_gan" in f], output
    if "Traceback" in output:
        assert output.count("Traceback (most recent call last)") == 1 and \
               any(f.endswith("deepspeed/launcher/runner.py") for f in frames), output

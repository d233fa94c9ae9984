"""Training across nodes, on this one machine: two DeepSpeed launchers started independently, one per
node rank, with ``--no_ssh`` and a hostfile of two one-slot nodes, exactly as ``launch/train_slurm.sh``
starts one launcher per node of a SLURM allocation.

With ``--no_ssh`` the host names of the hostfile are labels: each launcher finds its own line by
``--node_rank`` and reaches rank 0 only through ``--master_addr``. The hostfile here names
``node-0.invalid`` and ``node-1.invalid`` (a top-level domain that never resolves), so a run that
works also shows that nothing looks the names up.

The strong check: a two-node run gives the same weights as two ranks on one node (``uninterrupted``
in conftest.py), because data order, noise and the all-reduce depend on the global rank and the
world size only, never on how ranks are spread over nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from training_runs import (
    LAUNCH_TIMEOUT,
    REPO,
    TINY,
    UNINTERRUPTED_STEPS,
    assert_same_weights,
    deepspeed_command,
    free_port,
    metric_steps,
    model_states,
)

from brats_gan.checkpoints import read_latest

HOSTS = ("node-0.invalid", "node-1.invalid")


@dataclass(frozen=True)
class NodeResult:
    node_rank: int
    returncode: int
    output: str


def write_hostfile(path: Path) -> Path:
    path.write_text("".join(f"{host} slots=1\n" for host in HOSTS))
    return path


def node_command(hostfile: Path, node_rank: int, port: int, *args: str | Path) -> list[str]:
    """What each node runs; the README shows the same two lines."""
    return [*deepspeed_command(), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "--module", "brats_gan.train",
            *map(str, args)]


def node_environment() -> dict[str, str]:
    """This machine's environment with the threads per rank of the one-node reference run.

    Each "node" sees every core of this machine and would give its only rank all of them
    (distributed.init_distributed: cores / ranks on this node), where the two-rank reference run gave each
    rank half. Intra-op threads change how convolutions sum, hence the weights (by about 1e-3
    after 12 steps), and two ranks both using every core oversubscribe the machine.
    """
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, len(os.sched_getaffinity(0)) // 2))
    return {**os.environ, "OMP_NUM_THREADS": threads}


def launch_nodes(hostfile: Path, logs: Path, *args: str | Path,
                 timeout: float = LAUNCH_TIMEOUT) -> list[NodeResult]:
    """Start one launcher per node rank and wait for both.

    When one node fails, the other would wait at its next collective until gloo gives up (minutes),
    and when time runs out both may hang: in either case both process groups (launcher and rank) are
    killed, so a failing test leaves no training processes behind.
    """
    port = free_port()
    procs: list[subprocess.Popen] = []
    log_paths = [logs / f"node{rank}.log" for rank in range(len(HOSTS))]
    try:
        for rank, log_path in enumerate(log_paths):
            with open(log_path, "w") as log:
                procs.append(subprocess.Popen(node_command(hostfile, rank, port, *args), stdout=log,
                                              stderr=subprocess.STDOUT, cwd=REPO, env=node_environment(),
                                              start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return [NodeResult(rank, p.returncode, path.read_text()) for rank, (p, path) in enumerate(zip(procs, log_paths))]


def assert_all_succeeded(nodes: list[NodeResult]) -> None:
    for node in nodes:
        assert node.returncode == 0, f"node {node.node_rank} exited {node.returncode}:\n{node.output[-6000:]}"
        assert "nnodes=2" in node.output, f"node {node.node_rank} did not start as one of two nodes"


@pytest.fixture(scope="module")
def two_node_run(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference run's arguments, launched as two nodes of one rank each. Tests copy it before
    changing it."""
    root = tmp_path_factory.mktemp("two_nodes")
    run = root / "run"
    nodes = launch_nodes(write_hostfile(root / "hostfile"), root, "--store", store, "--out", run,
                         "--steps", str(UNINTERRUPTED_STEPS), *TINY)
    assert_all_succeeded(nodes)
    return run


@pytest.mark.slow
def test_two_nodes_train_what_two_ranks_on_one_node_train(two_node_run: Path, uninterrupted: Path) -> None:
    run, steps = two_node_run, UNINTERRUPTED_STEPS
    assert read_latest(run) == steps, "`latest` names the last step's complete checkpoint"
    folder = run / "checkpoints" / str(steps)
    assert {"generator", "critic", "rng_rank0.pt", "rng_rank1.pt", "trainer_state.json"} <= {
        p.name for p in folder.iterdir()}, "rank 1 (the second node) saved its random state beside rank 0's"
    state = json.loads((folder / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"]) == (steps, 2)
    assert json.loads((run / "training_options.json").read_text())["world_size"] == 2
    assert metric_steps(run) == list(range(1, steps + 1))

    assert model_states(run, steps)["generator"]["global_steps"] == steps
    assert_same_weights(run, uninterrupted, steps)


@pytest.mark.slow
def test_two_nodes_resume_from_the_checkpoint(two_node_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(two_node_run, run)
    steps = UNINTERRUPTED_STEPS + 3
    nodes = launch_nodes(write_hostfile(tmp_path / "hostfile"), tmp_path, "--out", run, "--resume",
                         "--steps", str(steps))
    assert_all_succeeded(nodes)
    assert f"resumed from step {UNINTERRUPTED_STEPS}" in nodes[0].output
    assert metric_steps(run) == list(range(1, steps + 1)), "the log continues where the checkpoint was taken"
    assert read_latest(run) == steps
    state = json.loads((run / "checkpoints" / str(steps) / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"]) == (steps, 2)
    assert model_states(run, steps)["generator"]["global_steps"] == steps

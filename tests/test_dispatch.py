"""``benchmarks/dispatch.py``: the operators an iteration dispatches stay those ``benchmarks/README.md`` reports
(recorded in ``benchmarks/dispatch_counts.json``), so that a change that adds operators, or a host read of a
device tensor, fails here; and the counter tells launches, views and reads apart."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import shm_buffers
from training_runs import REPO

RECORD = REPO / "benchmarks" / "dispatch_counts.json"
TOLERANCE = 0.02  # of a count; counts are deterministic, this leaves room for a torch or DeepSpeed patch release
RERECORD = ("if the change is meant to change them, run `python benchmarks/dispatch.py --record` and update "
            "benchmarks/README.md's 'Operators per iteration' table")


def _close(got: int, want: int, slack: int = 0) -> bool:
    return abs(got - want) <= max(slack, TOLERANCE * want)


@pytest.mark.slow
def test_tiny_iteration_dispatches_what_the_readme_records() -> None:
    recorded = [r for r in json.loads(RECORD.read_text())["results"] if (r["preset"], r["dtype"]) == ("tiny", "fp32")]
    assert {r["side"] for r in recorded} == {"trainer", "deepspeed", "torch"}, f"{RECORD} lacks tiny fp32 sides"
    shm_before = shm_buffers()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dispatch.py"), "--preset", "tiny", "--dtype",
                           "fp32", "--json"], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shm_buffers() <= shm_before, "the benchmark left DeepSpeed's all-reduce buffer in /dev/shm"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "one JSON line on stdout"
    measured = {r["side"]: r for r in json.loads(lines[0])["results"]}
    for want in recorded:
        got = measured[want["side"]]
        where = f"tiny fp32 {want['side']}"
        assert (got["n_critic"], got["batch_size"], got["optimizer"]) == \
               (want["n_critic"], want["batch_size"], want["optimizer"]), f"{where}: measured otherwise; {RERECORD}"
        for key in ("ops", "launching_ops", "host_ops"):
            assert _close(got[key], want[key]), f"{where}: {key} {got[key]}, recorded {want[key]}; {RERECORD}"
        for phase, n in want["phases"].items():
            assert _close(got["phases"][phase], n, slack=2), \
                f"{where}: {phase} launches {got['phases'][phase]}, recorded {n}; {RERECORD}"
        assert got["host_reads"]["device"] == want["host_reads"]["device"], \
            f"{where}: reads of device tensors {got['host_reads']['device']}, recorded {want['host_reads']['device']}"
        for kind, n in want["host_reads"]["host"].items():
            assert _close(got["host_reads"]["host"].get(kind, 0), n), f"{where}: host reads {got['host_reads']['host']}"
    bare = [measured["deepspeed"]["phases"], measured["torch"]["phases"]]
    for phase in ("fakes", "critic_forward", "penalty"):
        assert bare[0][phase] == bare[1][phase], f"train_step.py's two sides run other networks ({phase})"
    trainer = measured["trainer"]
    assert trainer["host_reads"]["device"] == {}, "the trainer's iteration reads nothing back from the device"
    assert trainer["per_read"]["host_reads"]["device"] == {"tolist": 1}, "the figures are read back in one tolist"
    assert sum(trainer["phases"].values()) == trainer["launching_ops"]


def test_counter_tells_launches_views_and_reads_apart(one_thread: None) -> None:
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from dispatch import OpCounter, counting, host_step_counters
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    weight = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([weight], foreach=True)
    weight.sum().backward()
    adam.step()  # the state, with its step counter on the host as on CUDA
    counter = OpCounter(host_step_counters([adam]))
    x = torch.arange(6.0)
    backward = torch.Tensor.backward
    with counting(counter):
        y = x.view(2, 3).t().unsqueeze(0)  # views: no launch
        total = (y * 2).sum()  # two launches
        assert total.item() == 30.0
        assert bool(total > 0)  # a launch and a read
        assert x.tolist()[-1] == 5.0
        adam.zero_grad()
        (weight * weight).sum().backward()
        adam.step()
    assert counter.reads["device"] == {"item": 1, "bool": 1, "tolist": 1}
    assert counter.reads["host"] == {"item": 2}, "foreach Adam reads its host step counter twice, no sync"
    assert counter.host_ops == 1, "the step counter's increment runs on the host"
    assert not {"aten::view", "aten::t", "aten::unsqueeze"} & set(counter.by_op)
    assert counter.by_op["aten::mul"] >= 2 and counter.by_op["aten::sum"] == 2
    assert counter.launching["backward"] > 0 and counter.launching["readout"] > 0
    assert counter.ops > sum(counter.launching.values())
    assert "item" not in torch.Tensor.__dict__ and torch.Tensor.backward is backward
    assert torch.ones(()).item() == 1.0 and sum(counter.reads["device"].values()) == 3, "hooks removed after"


@pytest.mark.slow
def test_bf16_through_autocast_reads_nothing_back_inside_an_iteration() -> None:
    """bf16 as ``deepspeed_configs/paper_bf16_autocast.json`` trains it (fp32 weights, torch's Adam, forwards under
    autocast): the trainer's iteration reads no device tensor, where DeepSpeed's bf16 optimizer (paper_bf16.json)
    reads its gradient norm's finiteness at every optimiser step; and it launches what is recorded."""
    recorded = {r["dtype"]: r for r in json.loads(RECORD.read_text())["results"]
                if (r["preset"], r["side"]) == ("tiny", "trainer")}
    assert recorded["bf16"]["host_reads"]["device"], "the recorded bf16 optimizer's reads (the contrast)"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dispatch.py"), "--preset", "tiny", "--dtype",
                           "bf16-autocast", "--side", "trainer", "--json"], capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (got,) = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    assert got["host_reads"]["device"] == {}, got["host_reads"]
    assert got["per_read"]["host_reads"]["device"] == {"tolist": 1}
    want = recorded["bf16-autocast"]["launching_ops"]
    assert _close(got["launching_ops"], want), f"tiny bf16-autocast trainer: {got['launching_ops']}, recorded {want}; {RERECORD}"

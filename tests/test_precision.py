"""fp16 (``deepspeed_configs/paper_fp16.json``): it trains where DeepSpeed's accelerator has fp16, and is refused
by name where it has not; each branch is checked on every machine, forced where the machine lacks it.

Where fp16 is: the critic's loss is finite from step 1 (the gradient penalty's pass runs in fp32), the first
updates overflow at the initial loss scale and DeepSpeed skips them (the trainer logs each; the run goes on,
exit 0), and the updates after them are taken. Where it is not: a CPU that DeepSpeed offers fp16 on is made
one that it does not with oneDNN's own switch ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` (what DeepSpeed's CPU
accelerator asks is oneDNN's answer); a CPU without it is made to run fp16 anyway by telling DeepSpeed's CPU
accelerator it has it (torch computes fp16 on any CPU, only slower). On a GPU (``python -m pytest -m cuda``)
a few fp16 steps of the paper's networks run on the device.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli, run_cli
from test_device import PAPER, paper_stores  # noqa: F401  (a fixture used below)
from training_runs import LAUNCH_TIMEOUT, REPO, TINY, launch, metric_rows, model_states

from brats_gan.data import SliceStream, iterate_batches, to_model
from brats_gan.loss import WGANLoss
from brats_gan.models import build_models, get_config
from brats_gan.train_config import precision_supported

FP16 = str(REPO / "deepspeed_configs" / "paper_fp16.json")
LOSSES = ("critic_loss", "generator_loss", "wasserstein", "gradient_penalty")
HIDE_FP16 = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "CUDA_VISIBLE_DEVICES": ""}  # oneDNN below AVX512-FP16, no GPU
# `brats-gan ARGS` on a CPU without fp16, its DeepSpeed accelerator told it has it
FORCE_FP16 = ("import sys\n"
              "from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator\n"
              "CPU_Accelerator.is_fp16_supported = lambda self: True\n"
              "from brats_gan.commands import main\n"
              "sys.exit(main(sys.argv[1:]))")
SKIPPED = re.compile(r"step (\d+): fp16 gradients overflowed, so DeepSpeed skipped (\d+) critic and (\d+) generator "
                     r"update\(s\) \(loss scale now (\S+) and (\S+); (\d+) and (\d+) skipped in all\)")


def _accelerator() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def _skipped_in_all(output: str) -> tuple[int, int]:
    """(critic, generator) updates the run's log says DeepSpeed skipped, from its last overflow line."""
    lines = SKIPPED.findall(output)
    return (int(lines[-1][5]), int(lines[-1][6])) if lines else (0, 0)


def _assert_finite_losses(run: Path, steps: int) -> None:
    rows = metric_rows(run)
    assert [int(row["step"]) for row in rows] == list(range(1, steps + 1))
    for row in rows:
        assert all(math.isfinite(float(row[key])) for key in LOSSES), row


@pytest.mark.parametrize("preset", ["tiny", "tiny-faithful"])  # group norm; batch norm and its running statistics
def test_the_fp16_penalty_is_the_fp32_penalty_of_the_fp16_weights(store: Path, one_thread: None, preset: str) -> None:
    """The penalty of a half-precision critic, on the store's images: finite (plain fp16 autograd made it NaN at
    step 1), equal to fp32's on the same weights and interpolates, its gradients reaching the fp16 weights; and
    a whole critic step (both scores and the penalty, one backward) goes through."""
    torch.manual_seed(0)
    generator, critic = build_models(preset)
    generator.half()
    critic.half()
    phases = WGANLoss(critic=critic, critic_module=critic, generator=generator, generator_module=generator,
                      update_critic=lambda loss: loss.backward(), update_generator=lambda loss: None,
                      latent_dim=get_config(preset).latent_dim, channels=3, device="cpu", dtype=torch.float16)
    stream = SliceStream(str(store), batch_size=8, image_size=64, seed=0, cache="memory")
    for _, batch in itertools.islice(iterate_batches(stream, num_workers=0), 3):
        real = to_model(batch, "cpu", torch.float16, 3)
        with torch.no_grad():
            fake = generator(phases.noise(8))
        reference = copy.deepcopy(critic).float()
        critic.zero_grad()
        rng = torch.get_rng_state()
        penalty = phases.gradient_penalty(real, fake)
        penalty.backward()

        torch.set_rng_state(rng)  # the same interpolates and instance noise, in fp32 on a copy of the weights
        eps = torch.rand(8, 1, 1, 1, dtype=torch.float16)
        x_hat = (eps * real + (1 - eps) * fake).float().requires_grad_(True)
        (grad,) = torch.autograd.grad(reference(x_hat).sum(), x_hat, create_graph=True)
        expected = ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
        expected.backward()

        assert torch.isfinite(penalty) and penalty.dtype == torch.float32
        assert torch.equal(penalty, expected), (penalty.item(), expected.item())
        reached = 0
        for (name, weight), copied in zip(critic.named_parameters(), reference.parameters()):
            if copied.grad is None:  # the last bias: no part of an input gradient
                assert weight.grad is None, name
                continue
            assert weight.grad.dtype == torch.float16 and torch.equal(weight.grad, copied.grad.half()), name
            reached += 1
        assert reached == len(list(critic.parameters())) - 1
        for (name, kept), copied in zip(critic.named_buffers(), reference.buffers()):
            assert torch.equal(kept, copied.to(kept.dtype)), name  # running statistics updated as in fp32

        critic.zero_grad()
        loss, _, step_penalty = phases.critic_step(batch)
        assert torch.isfinite(loss) and torch.isfinite(step_penalty)
        assert all(torch.isfinite(p.grad).all() for p in critic.parameters() if p.grad is not None)


@pytest.mark.slow
def test_fp16_trains_through_its_first_overflows(store: Path, tmp_path: Path, deepspeed_op: Path) -> None:
    supported = precision_supported("fp16")
    if not supported and _accelerator() != "cpu":
        pytest.skip(f"DeepSpeed's {_accelerator()} accelerator reports no fp16 and cannot be told otherwise")
    run, steps = tmp_path / "run", 4
    args = ["train", "--store", str(store), "--out", str(run), *TINY, "--steps", str(steps),
            "--deepspeed-config", FP16, "--num-workers", "0"]
    command = cli(*args) if supported else [sys.executable, "-c", FORCE_FP16, *args]
    proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "non-finite" not in output
    _assert_finite_losses(run, steps)
    # at the initial scale (2^16) the critic's first gradients overflow fp16: skipped, not diverged ...
    assert SKIPPED.search(output), output
    critic_skipped, generator_skipped = _skipped_in_all(output)
    n_critic = 5  # TINY's poster recipe
    assert critic_skipped < steps * n_critic and generator_skipped < steps, output
    # ... and the updates after them are taken: the last step changed the critic's weights
    before, after = (model_states(run, step)["critic"]["module"] for step in (3, 4))
    assert all(torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(before[name], after[name]) for name in after)


def test_fp16_is_refused_by_name_where_the_accelerator_lacks_it(store: Path, tmp_path: Path) -> None:
    if platform.machine().lower() not in ("x86_64", "amd64") and precision_supported("fp16"):
        pytest.skip("ONEDNN_MAX_CPU_ISA hides fp16 from oneDNN on x86-64 only; this CPU has fp16")
    run = tmp_path / "run"
    proc = run_cli("train", "--store", store, "--out", run, "--preset", "tiny", "--steps", "2",
                   "--deepspeed-config", FP16, env=HIDE_FP16)
    assert proc.returncode == 2, proc.output
    assert (f"--deepspeed-config {FP16}: field 'fp16.enabled': this machine's accelerator (cpu) does not support "
            "fp16 training") in proc.stderr
    assert "use bf16 (deepspeed_configs/paper_bf16.json) or fp32" in proc.stderr
    assert "Traceback" not in proc.output and not run.exists(), "refused before any rank starts or writes"


@pytest.mark.cuda
def test_fp16_trains_the_paper_networks_on_the_gpu(paper_stores: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    train, _ = paper_stores
    run, steps = tmp_path / "run", 6
    proc = launch("--store", train, "--out", run, *PAPER, "--deepspeed-config", FP16, "--steps", str(steps),
                  "--recipe", "poster", ranks=1)
    assert proc.returncode == 0, proc.output
    assert "(cuda:0)" in proc.output, "the trainer must run on the GPU"
    _assert_finite_losses(run, steps)
    critic_skipped, generator_skipped = _skipped_in_all(proc.output)
    assert critic_skipped < steps * 5 and generator_skipped < steps, proc.output
    before, after = (model_states(run, step)["critic"]["module"] for step in (4, 6))
    assert {t.dtype for t in after.values() if t.is_floating_point()} == {torch.float16}
    assert all(torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(before[name], after[name]) for name in after), "steps 5-6 updated the critic"

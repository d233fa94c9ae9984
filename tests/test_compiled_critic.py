"""The functional critic step (``--compile``, brats_gan.compiled_critic): the same loss and gradients as the
autograd step, handed to DeepSpeed like any loss, and refused where it does not apply.

The suite runs the functional step eagerly: torch.compile's first compile of the tiny critic takes ~70 s
on a CPU core, so the CLI runs here set ``TORCHDYNAMO_DISABLE=1`` (torch's own switch: a compiled function
runs as written). The compiled run is the ``cuda``-marked test at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from training_runs import REPO, TINY, launch

from brats_gan.loss import WGANLoss
from brats_gan.models import build_models, get_config

EAGER = {"TORCHDYNAMO_DISABLE": "1"}


def critic_step(config, functional: str, noise_std: float, seed: int = 3, dtype: torch.dtype = torch.float32,
                autocast: torch.dtype | None = None):
    """Figures and every critic parameter's gradient of one critic step on fixed images, RNG seeded alike."""
    torch.manual_seed(0)
    generator, critic = (net.to(dtype) for net in build_models(config))
    critic.noise_std = noise_std
    grads = {}

    def keep(loss: torch.Tensor) -> None:
        loss.backward()
        grads.update({name: p.grad.float() for name, p in critic.named_parameters()})

    phases = WGANLoss(critic=critic, critic_module=critic, generator=generator, generator_module=generator,
                      update_critic=keep, update_generator=lambda loss: None, latent_dim=config.latent_dim,
                      channels=config.channels, device="cpu", dtype=dtype, functional=functional, autocast=autocast)
    real = torch.rand(4, 1, config.image_size, config.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.manual_seed(seed)
    figures = torch.stack(phases.critic_step(real))
    return figures, grads


@pytest.mark.parametrize("mbstd", [0, 2], ids=["one-forward", "minibatch-std"])
@pytest.mark.parametrize("noise_std", [0.0, 0.1], ids=["no-noise", "instance-noise"])
def test_the_functional_step_gives_the_autograd_steps_loss_and_every_gradient(one_thread, mbstd: int,
                                                                               noise_std: float) -> None:
    config = dataclasses.replace(get_config("tiny"), critic_mbstd_group=mbstd)
    figures, grads = critic_step(config, "off", noise_std)
    functional_figures, functional_grads = critic_step(config, "eager", noise_std)
    assert figures[2] > 0  # a penalty to differentiate
    torch.testing.assert_close(functional_figures, figures, rtol=1e-5, atol=1e-6)
    assert functional_grads.keys() == grads.keys()
    for name, g in grads.items():
        assert g.abs().max() > 0 or name == "fc.linear.bias", name  # the score's offset cancels in the loss
        torch.testing.assert_close(functional_grads[name], g, rtol=1e-4, atol=1e-5, msg=name)
    # another draw of the instance noise and the interpolates is another step: the comparison can tell
    other, _ = critic_step(config, "eager", noise_std, seed=4)
    assert not torch.allclose(other, figures, rtol=1e-5, atol=1e-6)


def test_in_bf16_the_functional_steps_gradients_are_the_autograd_steps_to_bf16_rounding(one_thread) -> None:
    config = get_config("tiny")
    figures, grads = critic_step(config, "off", 0.1, dtype=torch.bfloat16)
    functional_figures, functional_grads = critic_step(config, "eager", 0.1, dtype=torch.bfloat16)
    torch.testing.assert_close(functional_figures, figures, rtol=1e-3, atol=1e-4)
    for name, g in grads.items():
        assert (functional_grads[name] - g).norm() <= 1e-2 * g.norm() + 1e-6, name


def test_under_autocast_the_functional_steps_gradients_are_the_autograd_steps_to_bf16_rounding(one_thread) -> None:
    """``torch_autocast`` with ``--compile``: the functional step runs under the same autocast (fp32 weights, bf16
    convolutions): its figures and gradients are the autograd step's under autocast to rounding, not the fp32 step's."""
    config = get_config("tiny")
    figures, grads = critic_step(config, "off", 0.1, autocast=torch.bfloat16)
    functional_figures, functional_grads = critic_step(config, "eager", 0.1, autocast=torch.bfloat16)
    fp32_figures, _ = critic_step(config, "eager", 0.1)
    torch.testing.assert_close(functional_figures, figures, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(fp32_figures, functional_figures, rtol=1e-4, atol=1e-5), "bf16 arithmetic, not fp32"
    for name, g in grads.items():
        assert (functional_grads[name] - g).norm() <= 1e-2 * g.norm() + 1e-6, name


def test_compile_is_refused_by_name_where_the_functional_step_does_not_apply(store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    for args, why in ((["--preset", "tiny-faithful"], "a batch-norm critic"),
                      (["--preset", "tiny", "--loss", "wgan-clip"], "--loss wgan-clip has none"),
                      (["--preset", "tiny", "--deepspeed-config", REPO / "deepspeed_configs" / "paper_fp16.json"],
                       "fp16's loss scaling")):
        proc = run_cli("train", "--store", store, "--out", run, "--steps", "1", "--compile", *args)
        assert proc.returncode == 2, proc.output
        assert "--compile (training.compile)" in proc.stderr and why in proc.stderr, proc.stderr
        assert "Traceback" not in proc.output and not run.exists()


def test_two_ranks_with_compile_train_as_without(uninterrupted: Path, store: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The functional step's gradients go through each engine's backward: all-reduced across the two ranks
    (without, each rank's critic follows its own data, and step 1's losses already differ by ~0.1), so the
    losses are the run without --compile's. Two steps: the gradients differ at rounding (1e-6), which this
    recipe's updates amplify to ~1e-3 by step 3, as they do a 1e-7 perturbation of the autograd path's."""
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    run, steps = tmp_path / "run", 2
    proc = launch("--store", store, "--out", run, "--steps", str(steps), *TINY, "--compile")
    assert proc.returncode == 0, proc.output
    assert json.loads((run / "training_options.json").read_text())["training"]["compile"] is True
    losses = ("critic_loss", "generator_loss", "wasserstein", "gradient_penalty")

    def rows(folder: Path) -> torch.Tensor:
        with open(folder / "metrics.csv", newline="") as f:
            return torch.tensor([[float(row[k]) for k in losses] for row in csv.DictReader(f)][:steps],
                                dtype=torch.float64)

    compiled, reference = rows(run), rows(uninterrupted)
    assert compiled.shape == (steps, len(losses))
    torch.testing.assert_close(compiled, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_the_compiled_step_on_the_gpu_gives_the_eager_steps_loss_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile'd (inductor, Triton kernels) against the same function run eagerly, on the same
    interpolation weights and without instance noise (compiled, inductor draws random numbers with its own
    generator), TF32 off on both."""
    from brats_gan.compiled_critic import FunctionalCriticStep

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    _, critic = build_models("tiny")
    critic = critic.cuda()
    critic.noise_std = 0.0
    g = torch.Generator().manual_seed(1)
    real, fake = ((torch.rand(8, 3, 64, 64, generator=g) * 2 - 1).cuda() for _ in range(2))
    eps = torch.rand(8, 1, 1, 1, generator=g).cuda()
    results = []
    for compile in (False, True):
        step = FunctionalCriticStep(critic, 10.0, concatenate=True, compile=compile)
        for _ in range(2):  # the second call runs the compiled graph without compiling
            results.append(step(real, fake, eps))
    (eager, grads), (compiled, compiled_grads) = results[1], results[3]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for g_eager, g_compiled in zip(grads, compiled_grads, strict=True):
        assert (g_compiled - g_eager).norm() <= 1e-4 * g_eager.norm() + 1e-7


@pytest.mark.cuda
def test_tiny_trains_with_compile_on_the_gpu(store: Path, tmp_path: Path) -> None:
    run, steps = tmp_path / "run", 3
    proc = launch("--store", store, "--out", run, "--steps", str(steps), *TINY, "--compile", ranks=1)
    assert proc.returncode == 0, proc.output
    assert "(cuda:0)" in proc.output and "compiled the critic step in" in proc.output, proc.output
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor(float(r[k]))) for r in rows
               for k in ("critic_loss", "generator_loss", "wasserstein", "gradient_penalty"))
    assert float(rows[-1]["gradient_penalty"]) > 0

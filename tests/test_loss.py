"""``brats_gan.loss``: the critic step's one forward on real and fake together (issue 18) computes what two did."""

from __future__ import annotations

import pytest
import torch

from brats_gan.loss import WGANLoss
from brats_gan.models import build_models, get_config


def _phases(preset: str, concatenate: bool | None, grads: list) -> WGANLoss:
    torch.manual_seed(0)
    generator, critic = build_models(preset)
    generator.double()
    critic.double()
    critic.noise_std = 0.0  # instance noise draws in another order when concatenated: compare without it
    params = list(critic.parameters())
    return WGANLoss(critic=critic, critic_module=critic, generator=generator, generator_module=generator,
                    update_critic=lambda loss: grads.append(torch.autograd.grad(loss, params)),
                    update_generator=lambda loss: None, latent_dim=get_config(preset).latent_dim, channels=3,
                    device="cpu", dtype=torch.float64, concatenate=concatenate)


def test_one_concatenated_critic_forward_gives_the_separate_forwards_losses_and_gradients() -> None:
    real = torch.rand(4, 1, 64, 64) * 2 - 1
    results = {}
    for concatenate in (False, True):
        grads: list = []
        phases = _phases("tiny", concatenate, grads)
        torch.manual_seed(1)
        results[concatenate] = (phases.critic_step(real), grads[0])
    (two, two_grads), (one, one_grads) = results[False], results[True]
    assert _phases("tiny", None, []).concatenate, "the tiny critic (layer norm) is concatenated by default"
    for a, b in zip(two, one):  # loss, Wasserstein estimate, penalty
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), (a.item(), b.item())
    assert two[2] > 0
    for a, b in zip(two_grads, one_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_a_batch_norm_critic_keeps_separate_forwards() -> None:
    assert not _phases("tiny-faithful", None, []).concatenate, "batch norm would mix real and fake"
    with pytest.raises(ValueError, match="batch norm or minibatch std"):
        _phases("tiny-faithful", True, [])


def test_a_lazy_penalty_falls_on_every_nth_critic_step_of_the_run_weighted_n_times() -> None:
    """``--gp-every 3``: the penalty on critic steps 0, 3, 6, ... of the run (a resumed run goes on counting from
    its step), as lambda x 3; the steps between carry only the Wasserstein loss."""
    real = torch.rand(4, 1, 64, 64) * 2 - 1
    grads: list = []
    lazy = _phases("tiny", None, grads)
    lazy.gp_every = 3
    lazy.critic_steps = 6  # as Trainer.load sets it: step x n_critic
    torch.manual_seed(1)
    figures = [lazy.critic_step(real) for _ in range(4)]
    assert [bool(penalty > 0) for _, _, penalty in figures] == [True, False, False, True]
    for loss, wasserstein, penalty in figures:
        assert torch.allclose(loss, -wasserstein + 3 * lazy.gp_lambda * penalty, rtol=1e-12, atol=1e-12)
    eager = _phases("tiny", None, [])
    torch.manual_seed(1)
    every = eager.critic_step(real)
    assert torch.allclose(every[2], figures[0][2], rtol=1e-12), "the lazy step's penalty is the penalty"


def _autocast_step(autocast: torch.dtype | None, real: torch.Tensor) -> tuple:
    """One critic and one generator step of the tiny networks in fp32, under ``autocast`` if given: the figures,
    each network's gradients, and the dtypes the convolutions and linear layers computed in."""
    torch.manual_seed(0)
    generator, critic = build_models("tiny")
    critic.noise_std = 0.0
    computed: set[torch.dtype] = set()
    for module in [*generator.modules(), *critic.modules()]:
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
            module.register_forward_hook(lambda m, args, out: computed.add(out.dtype))
    grads: dict[str, tuple] = {}

    def keep(name: str, module: torch.nn.Module):
        return lambda loss: grads.__setitem__(name, torch.autograd.grad(loss, list(module.parameters())))

    phases = WGANLoss(critic=critic, critic_module=critic, generator=generator, generator_module=generator,
                      update_critic=keep("critic", critic), update_generator=keep("generator", generator),
                      latent_dim=get_config("tiny").latent_dim, channels=3, device="cpu", dtype=torch.float32,
                      autocast=autocast)
    torch.manual_seed(1)
    figures = phases.critic_step(real)
    torch.manual_seed(2)
    phases.generator_step(4)
    assert all(p.dtype == torch.float32 for p in [*generator.parameters(), *critic.parameters()])
    return figures, grads, computed


def test_autocast_runs_every_phases_convolutions_in_bf16_and_keeps_fp32_weights_and_gradients() -> None:
    """``torch_autocast`` (deepspeed_configs/paper_bf16_autocast.json): the critic step (its forwards and the
    penalty's, which call the module, not an engine) and the generator step compute their convolutions in bf16,
    while weights and gradients stay fp32; the gradients are the fp32 ones to bf16 rounding (from one RNG state)."""
    real = torch.rand(4, 1, 64, 64) * 2 - 1
    _, fp32_grads, fp32_computed = _autocast_step(None, real)
    bf16_figures, bf16_grads, bf16_computed = _autocast_step(torch.bfloat16, real)
    assert fp32_computed == {torch.float32} and bf16_computed == {torch.bfloat16}
    assert bf16_figures[2] > 0, "the penalty ran"
    for network in ("critic", "generator"):
        a, b = (torch.cat([g.flatten() for g in grads[network]]) for grads in (fp32_grads, bf16_grads))
        assert all(g.dtype == torch.float32 for g in bf16_grads[network])
        # bf16 rounding through the penalty's double backward: 15 % (critic) and 18 % (generator) here, where the
        # bf16 weights of paper_bf16.json give 16 % and 22 %; a wrong gradient is 100 % or more
        assert (a - b).norm() < 0.3 * a.norm(), (network, ((a - b).norm() / a.norm()).item())

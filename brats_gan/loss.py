"""The phases of a WGAN step, apart from whoever owns the networks and their optimisers.

``WGANLoss`` is StyleGAN2-ADA's loss class for this GAN: one method per phase (:meth:`critic_step` with its
:meth:`gradient_penalty`, :meth:`generator_step`) and :meth:`iteration`, ``n_critic`` critic steps then one
generator step. It is given the networks to call and the updates to apply, so the same code runs on
DeepSpeed engines (the trainer) and on plain modules with ``torch.optim.Adam`` (the baseline of
``benchmarks/train_step.py``): what the benchmark compares is then the engines, not two copies of the loss.

The loss (``wgan-gp``, the default) is WGAN-GP (Gulrajani et al. 2017): each critic step minimises
``D(fake) - D(real) + lambda * (|grad_x D(x_hat)| - 1)^2`` with ``x_hat`` a random interpolate of a real and
a fake image; the generator minimises ``-D(G(z))``. With ``gp_every`` N > 1 the penalty is lazy
(StyleGAN2's lazy regularisation, Karras et al. 2020): only every N-th critic step of the run carries it,
weighted N times, so its forward and double backward (most of a step's operators) run 1/N as often. ``wgan-clip`` is the original WGAN (Arjovsky et al.
2017): no penalty, critic weights clipped to ``[-clip, clip]`` after each critic step.

DeepSpeed allows a backward through a graph built by calling an engine only inside that engine's own
``backward()``. So ``critic`` (the engine) is called only for the scores its own update differentiates; the
penalty's ``autograd.grad`` and the generator's loss go through ``critic_module``, whose parameters are
frozen (``requires_grad_``) for the generator step, else their gradients would leak into the next critic step.

Where the critic treats each image on its own (layer norm or no norm, no minibatch standard deviation), a
critic step scores real and fake images in one engine forward on ``torch.cat([real, fake])``
instead of two (issue 18: each forward, and its backward, is hundreds of operators a GPU launches one by
one). The scores are the same functions of the same images; what changes is the instance noise's draw
order (one draw per layer for both halves), and DiffAugment's (one call for both). The interpolates keep their own forward: in the same
concatenation, the penalty's input gradient and its double backward would run over all three parts
(46 % more FLOP per image on the tiny preset, and slower on a CPU).
A batch-norm critic (``critic_norm`` ``batch``, the faithful presets) normalises over the batch, where
concatenation would change the statistics: it keeps a forward for each.

In fp16 the penalty's pass runs in fp32 on casts of the critic's weights (:func:`float32_call`), where its
input gradient cannot overflow; fp32 and bf16 run every phase in the networks' own precision. With
``autocast`` (DeepSpeed's ``torch_autocast``: fp32 weights, plain Adam) every phase's forwards run under
``torch.autocast`` in that dtype, the module calls too (DeepSpeed autocasts only its engines' forwards), and
each update outside it.

``functional`` (``--compile``) runs the WGAN-GP critic step as one function of the critic's weights
(:mod:`brats_gan.compiled_critic`), ``"compiled"`` through ``torch.compile``, ``"eager"`` without; its
gradients reach ``update_critic`` as the backward of the loss it hands over (``compiled_critic.hand_over``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from brats_gan.augment import diff_augment
from brats_gan.compiled_critic import FunctionalCriticStep, hand_over
from brats_gan.data import to_model
from brats_gan.models import MinibatchStd

Update = Callable[[torch.Tensor], None]


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients for ``module`` inside (the critic during the generator step)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def float32_call(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` in fp32 on fp32 copies of a half-precision module's weights and buffers.

    The copies are casts, so a backward through the result reaches the module's own (fp16) parameters, and
    buffers a layer updates (batch norm's running statistics) are written back. The gradient penalty needs
    it: in fp16, the differentiable backward of group norm (what ``create_graph`` runs) overflows on the
    critic's freshly initialised weights, and the penalty was NaN at step 1. Here the input gradient and
    its double backward are fp32, and only the parameters' gradients end in fp16, where the optimizer's
    dynamic loss scaling watches them for overflow.
    """
    params = {name: p.float() for name, p in module.named_parameters()}
    buffers = {name: b.float() if b.is_floating_point() else b for name, b in module.named_buffers()}
    out = torch.func.functional_call(module, {**params, **buffers}, (x,))
    for name, b in module.named_buffers():
        if b.is_floating_point():  # as batch norm updates its own: unseen by autograd, which saved them
            b.data.copy_(buffers[name])
    return out


def per_sample(critic: torch.nn.Module) -> bool:
    """Whether ``critic`` scores each image of a batch on its own (no batch norm, no minibatch std), so that
    one forward on a concatenation gives each part's scores."""
    return not any(isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, MinibatchStd)) for m in critic.modules())


@dataclass
class WGANLoss:
    """The phases of one WGAN iteration over the networks and updates it is given (see the module docstring).

    ``critic``/``generator``: what to call for outputs that their own update differentiates (an engine, or
    the module); ``critic_module``/``generator_module``: the plain modules; ``update_critic``/
    ``update_generator``: backward and optimiser step of a loss.
    """

    critic: Callable[[torch.Tensor], torch.Tensor]
    critic_module: torch.nn.Module
    generator: Callable[[torch.Tensor], torch.Tensor]
    generator_module: torch.nn.Module
    update_critic: Update
    update_generator: Update
    latent_dim: int
    channels: int
    device: str
    dtype: torch.dtype
    loss: str = "wgan-gp"
    gp_lambda: float = 10.0
    gp_every: int = 1  # the penalty on every gp_every-th critic step, lambda times gp_every (lazy regularisation)
    clip_value: float = 0.01
    augment_policies: Sequence[str] = ()
    augment_p: float = 1.0
    concatenate: bool | None = None  # one critic forward for real and fake; None: where it is exact
    functional: str = "off"  # the critic step as one function of its weights: "off", "eager" or "compiled"
    autocast: torch.dtype | None = None  # the forwards' dtype under torch.autocast; None: the networks' own

    def __post_init__(self) -> None:
        self.critic_steps = 0  # critic updates so far, over the whole run: which ones the lazy penalty falls on
        if self.concatenate is None:
            self.concatenate = per_sample(self.critic_module)
        if self.concatenate and not per_sample(self.critic_module):
            raise ValueError("concatenate: the critic mixes the images of a batch (batch norm or minibatch std)")
        if self.functional not in ("off", "eager", "compiled"):
            raise ValueError(f"functional must be 'off', 'eager' or 'compiled', got {self.functional!r}")
        if self.functional != "off" and self.loss != "wgan-gp":
            raise ValueError(f"functional: the functional critic step is WGAN-GP's, not {self.loss}'s")
        if self.functional != "off" and self.gp_every != 1:
            raise ValueError("functional: the functional critic step carries the penalty on every step (gp_every 1)")
        self.functional_step = (None if self.functional == "off" else FunctionalCriticStep(
            self.critic_module, self.gp_lambda, self.concatenate, compile=self.functional == "compiled"))

    def forwards(self) -> contextlib.AbstractContextManager:
        """Where a phase computes what it differentiates: under ``torch.autocast`` with ``autocast``."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.autocast)

    def noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, device=self.device, dtype=self.dtype)

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """DiffAugment (``--augment``) of what the critic sees, real and fake alike; identity by default."""
        return diff_augment(images, self.augment_policies, self.augment_p) if self.augment_policies else images

    def critic_step(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One critic update on a real micro-batch; returns (loss, Wasserstein estimate, penalty)."""
        real = to_model(real, self.device, self.dtype, self.channels)
        with torch.no_grad(), self.forwards():
            fake = self.generator_module(self.noise(real.shape[0])).to(self.dtype)
        if self.functional_step is not None:
            return self.functional_critic_step(real, fake)
        with self.forwards():
            if self.concatenate:
                both = self.augment(torch.cat([real, fake]))  # DiffAugment draws per image: one call serves
                real, fake = both.split(len(real))
                real_score, fake_score = (part.mean() for part in self.critic(both).float().split(len(real)))
            else:
                real, fake = self.augment(real), self.augment(fake)
                real_score = self.critic(real).float().mean()
                fake_score = self.critic(fake).float().mean()
            loss = fake_score - real_score
            penalty = torch.zeros((), device=self.device)
            if self.loss == "wgan-gp" and self.critic_steps % self.gp_every == 0:
                penalty = self.gradient_penalty(real, fake)
                loss = loss + self.gp_lambda * self.gp_every * penalty
        self.critic_steps += 1
        self.update_critic(loss)
        if self.loss == "wgan-clip":
            with torch.no_grad():
                for p in self.critic_module.parameters():
                    p.clamp_(-self.clip_value, self.clip_value)
        return loss.detach(), (real_score - fake_score).detach(), penalty.detach()

    def functional_critic_step(self, real: torch.Tensor,
                               fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`critic_step` by :class:`FunctionalCriticStep`, from its DiffAugment on."""
        if self.concatenate:
            real, fake = self.augment(torch.cat([real, fake])).split(len(real))
        else:
            real, fake = self.augment(real), self.augment(fake)
        with self.forwards():
            figures, grads = self.functional_step(real, fake)
        self.critic_steps += 1
        self.update_critic(hand_over(figures[0], grads, list(self.critic_module.parameters())))
        loss, wasserstein, penalty = figures.unbind()
        return loss, wasserstein, penalty

    def gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """``E[(|grad_x D(x_hat)| - 1)^2]`` at random interpolates, differentiable (double backward).

        In fp16 this pass runs in fp32 (:func:`float32_call`); fp32 and bf16 call the critic as it is.
        """
        eps = torch.rand(real.shape[0], 1, 1, 1, device=self.device, dtype=self.dtype)
        x_hat = eps * real + (1 - eps) * fake
        if self.dtype == torch.float16:
            x_hat = x_hat.float().requires_grad_(True)
            score = float32_call(self.critic_module, x_hat)
        else:
            x_hat.requires_grad_(True)
            score = self.critic_module(x_hat)
        (grad,) = torch.autograd.grad(score.float().sum(), x_hat, create_graph=True)
        return ((grad.float().flatten(1).norm(2, dim=1) - 1) ** 2).mean()

    def generator_step(self, batch_size: int) -> torch.Tensor:
        """One generator update against the frozen critic; returns its loss."""
        with frozen(self.critic_module):
            with self.forwards():
                fake = self.generator(self.noise(batch_size))
                loss = -self.critic_module(self.augment(fake)).float().mean()
            self.update_generator(loss)
        return loss.detach()

    def iteration(self, batches: Iterator[tuple[Any, torch.Tensor]], n_critic: int,
                  batch_size: int) -> tuple[torch.Tensor, Any]:
        """``n_critic`` critic steps on the next micro-batches, then a generator step: the step's four figures
        (critic loss, Wasserstein estimate and penalty averaged over the critic steps; generator loss) as one
        float32 tensor on the device, and the position of the last micro-batch used."""
        critic = []
        for _ in range(n_critic):
            position, real = next(batches)
            critic.append(torch.stack(self.critic_step(real)))
        g_loss = self.generator_step(batch_size)
        return torch.cat([torch.stack(critic).float().mean(0), g_loss.float().view(1)]), position

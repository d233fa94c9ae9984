"""The WGAN-GP critic step as one function of the critic's weights, which ``torch.compile`` can trace (issue 18).

The eager critic step (:meth:`brats_gan.loss.WGANLoss.critic_step`) builds the gradient penalty with
``autograd.grad(create_graph=True)`` and then runs a backward through it: thousands of small operators per
step, the penalty's double backward most of them, each a kernel launch on a GPU. ``torch.compile`` cannot
trace that double backward (pytorch#91469). Written with ``torch.func`` instead (``functional_call`` for the
critic, ``grad`` for the penalty's input gradient and ``grad`` again for the parameters' gradients), the
whole step, forwards, penalty and both backwards, is one function of (weights, real, fake) that dynamo
traces into one graph and inductor fuses.

The mathematics is the eager step's: the same scores (one forward on ``cat([real, fake])`` where the critic
scores each image on its own), the same interpolates drawn at the same point of the random stream, so with
the same RNG state the eager functional step gives the eager step's loss and gradients to rounding. Instance
noise is drawn inside the critic as before; compiled, inductor draws it with its own generator (the same
distribution, other numbers). DiffAugment stays outside: the step is given the augmented images.

The gradients come out as tensors, not in ``.grad``. :func:`hand_over` gives them back to autograd as the
gradient of a loss tensor, so that ``engine.backward(loss)`` does for them what DeepSpeed does for any loss
(gradient all-reduce across ranks, bf16's fp32 accumulation hooks on the parameters).

Refused (:func:`unsupported`): a batch-norm critic, whose running statistics a functional call would have to
return and write back, and fp16, whose loss scaling the penalty's fp32 pass (``loss.float32_call``) would
need threaded through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.func import functional_call, grad

log = logging.getLogger(__name__)

Figures = torch.Tensor  # (loss, Wasserstein estimate, penalty), float32


def unsupported(critic: torch.nn.Module, dtype: torch.dtype) -> str | None:
    """Why the functional step cannot serve ``critic`` in ``dtype``, or None where it can."""
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in critic.modules()):
        return "a batch-norm critic updates its running statistics, which the functional step does not write back"
    if dtype == torch.float16:
        return "fp16's loss scaling is not threaded through the functional step (its penalty runs in fp32)"
    return None


class _Unhooked(torch.nn.Module):
    """``module.forward`` without the hooks on ``module`` itself. DeepSpeed's engine hooks every call of its
    module for its timers: host work that dynamo cannot trace (a compiled run warned of ``time.time``, the
    throughput timer's, after its first steps), and nothing the critic step needs. Submodules keep theirs."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.forward(x)


class FunctionalCriticStep:
    """``step(real, fake)`` -> (figures, gradients): one WGAN-GP critic step of ``critic`` without touching
    its ``.grad``; ``gradients`` in the order of ``critic.parameters()``.

    ``concatenate``: score real and fake in one forward (exact where the critic scores each image on its
    own; :func:`brats_gan.loss.per_sample`). ``compile``: run the step through ``torch.compile`` (the first
    call compiles: about 70 s for the tiny critic on a CPU core).
    """

    def __init__(self, critic: torch.nn.Module, gp_lambda: float, concatenate: bool, compile: bool = False) -> None:
        dtype = next(critic.parameters()).dtype
        reason = unsupported(critic, dtype)
        if reason:
            raise ValueError(f"functional critic step: {reason}")
        self.critic, self.gp_lambda, self.concatenate = critic, float(gp_lambda), concatenate
        self.unhooked = _Unhooked(critic)
        self.names = [name for name, _ in self.unhooked.named_parameters()]
        self.compiled = compile
        self._step: Callable[..., Any] = torch.compile(self._grads, dynamic=False) if compile else self._grads
        self._calls = 0

    def _loss(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], real: torch.Tensor,
              fake: torch.Tensor, eps: torch.Tensor | None) -> tuple[torch.Tensor, Figures]:
        state = {**params, **buffers}

        def critic(x: torch.Tensor) -> torch.Tensor:
            return functional_call(self.unhooked, state, (x,))

        if self.concatenate:
            real_score, fake_score = (part.mean() for part in critic(torch.cat([real, fake])).float().split(len(real)))
        else:
            real_score, fake_score = critic(real).float().mean(), critic(fake).float().mean()
        if eps is None:
            eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
        x_hat = eps * real + (1 - eps) * fake
        input_grad = grad(lambda x: critic(x).float().sum())(x_hat)
        penalty = ((input_grad.float().flatten(1).norm(2, dim=1) - 1) ** 2).mean()
        loss = fake_score - real_score + self.gp_lambda * penalty
        return loss, torch.stack([loss, real_score - fake_score, penalty]).detach()

    def _grads(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], real: torch.Tensor,
               fake: torch.Tensor, eps: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], Figures]:
        return grad(self._loss, has_aux=True)(params, buffers, real, fake, eps)

    def __call__(self, real: torch.Tensor, fake: torch.Tensor,
                 eps: torch.Tensor | None = None) -> tuple[Figures, list[torch.Tensor]]:
        """``eps``: the interpolation weights, shape (B, 1, 1, 1); by default drawn where the eager step draws
        them, after the scores' forward (compiled: by inductor's generator)."""
        params = {name: p.detach() for name, p in self.unhooked.named_parameters()}
        buffers = dict(self.unhooked.named_buffers())
        start = time.perf_counter() if self.compiled and self._calls == 0 else None
        grads, figures = self._step(params, buffers, real, fake, eps)
        self._calls += 1
        if start is not None:
            log.info("compiled the critic step in %.1f s", time.perf_counter() - start)
        return figures, [grads[name] for name in self.names]


class _HandOver(torch.autograd.Function):
    """The loss as itself; its backward gives each parameter its precomputed gradient times the incoming one."""

    @staticmethod
    def forward(ctx: Any, loss: torch.Tensor, grads: list[torch.Tensor], *params: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grads = ctx.grads
        ctx.grads = None
        return None, None, *torch._foreach_mul(grads, grad_output.to(grads[0].dtype))


def hand_over(loss: torch.Tensor, grads: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """A tensor equal to ``loss`` whose backward accumulates ``grads`` into ``params`` (in their order), as if
    ``loss`` had been computed from them: what an optimiser wrapper (DeepSpeed's ``engine.backward``) expects."""
    return _HandOver.apply(loss, grads, *params)

"""The averaged generator (StyleGAN2-ADA's ``G_ema``): an exponential moving average of the generator's
weights, for sampling only.

A GAN's generator moves with every critic it meets; the average over the last few thousand images is
smoother and draws cleaner samples, at the cost of one copy of the generator and one ``lerp`` per step.
It changes nothing that is trained: the critic only ever sees the raw generator. The half-life is counted
in images (``half_life_images`` generated images halve a weight's say), and ramped up at the start as
StyleGAN2-ADA does (the half-life is at most ``rampup`` x the images seen so far), so that a short run is
not averaged with its first random weights.

Every rank updates its copy from the same synchronised weights, so the copies stay alike without
communication. The average is kept in float32 whatever the training dtype (bf16 weights would round the
small updates away).
"""

from __future__ import annotations

import copy
from typing import Any

import torch


class AveragedGenerator:
    """An fp32 copy of ``module`` that :meth:`update` moves towards the live weights after each generator step."""

    def __init__(self, module: torch.nn.Module, half_life_images: float, rampup: float | None = 0.05) -> None:
        """``rampup`` None or 0: no ramp-up."""
        if half_life_images <= 0:
            raise ValueError(f"half_life_images must be positive, got {half_life_images}")
        self.half_life_images = float(half_life_images)
        self.rampup = rampup
        self.module = copy.deepcopy(module).float().eval().requires_grad_(False)

    def beta(self, images_seen: int, batch: int) -> float:
        """The weight the average keeps at this step: ``0.5 ** (batch / half-life)``, with the ramped half-life."""
        half_life = self.half_life_images
        if self.rampup:
            half_life = min(half_life, images_seen * self.rampup)
        return 0.5 ** (batch / max(half_life, 1e-8))

    @torch.no_grad()
    def update(self, module: torch.nn.Module, images_seen: int, batch: int) -> None:
        """Move the average towards ``module`` after a generator step that has now seen ``images_seen`` images,
        ``batch`` of them in this step; buffers are copied as they are."""
        beta = self.beta(images_seen, batch)
        averaged = list(self.module.parameters())
        live = [p.detach().float() for p in module.parameters()]  # casts only in bf16/fp16
        if len(averaged) != len(live):
            raise ValueError(f"the averaged generator has {len(averaged)} parameters, the live one {len(live)}")
        # One operator for all tensors, not one per tensor (issue 18), and the same numbers as a per-tensor
        # ``live.lerp(averaged, beta)``: the lerp starts from the live weights, as it always did.
        torch._foreach_copy_(averaged, torch._foreach_lerp(live, averaged, beta))
        buffers, live_buffers = list(self.module.buffers()), [b.detach() for b in module.buffers()]
        if buffers:
            torch._foreach_copy_(buffers, live_buffers)

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)

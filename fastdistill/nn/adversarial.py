"""``AdversarialDistiller``: Adv-KD's discriminator and generator steps as a module."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..ops.adversarial import adversarial_losses, gradient_penalty


class AdversarialDistiller(nn.Module):
    """Adversarial distillation with a conditional discriminator (Adv-KD's ``kdgan_training.py``).

    Discriminator step (:meth:`discriminator_loss`), with ``D(x, *conditions)`` returning logits::

        L_D = mean softplus(-D(real, c)) + mean softplus(D(fake, c)) + gp_weight * GP

    where GP is the WGAN-GP penalty on per-sample interpolates (:func:`fastdistill.gradient_penalty`).
    After ``optimizer_d.step()``, :meth:`clip_discriminator_` clamps every D parameter to
    ``[-clip_value, clip_value]`` (Adv-KD's weight clipping) in one multi-tensor launch.

    Generator step (:meth:`generator_loss`): ``L_G = mean softplus(-D(fake, c))``.

    Args:
        student: the generator, called by :meth:`forward` (Adv-KD: ``student(inputs, step)``).
        discriminator: ``discriminator(x, *conditions) -> logits`` (Adv-KD: ``D(images, noise)``).
        gp_weight: lambda_gp (Adv-KD: 10).
        clip_value: bound of the weight clipping (Adv-KD: 0.1); None disables it.

    Difference from the official loop: the fake samples are detached in the discriminator loss. The
    official code lets that backward run into the student's graph and then zeroes the student's
    gradients, so the parameter updates are the same and the wasted backward is skipped.
    The loss parts of the last discriminator step are in ``last_terms`` (detached).
    """

    def __init__(self, student: nn.Module, discriminator: nn.Module, *, gp_weight: float = 10.0,
                 clip_value: float | None = 0.1) -> None:
        super().__init__()
        if gp_weight < 0:
            raise ValueError(f"AdversarialDistiller: gp_weight must be >= 0, got {gp_weight}")
        if clip_value is not None and not clip_value > 0:
            raise ValueError(f"AdversarialDistiller: clip_value must be > 0 or None, got {clip_value}")
        self.student = student
        self.discriminator = discriminator
        self.gp_weight = float(gp_weight)
        self.clip_value = clip_value
        self.last_terms: dict[str, Tensor] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The student's output (the fake samples)."""
        return self.student(*args, **kwargs)

    def discriminator_loss(self, real: Tensor, fake: Tensor, *conditions: Any,
                           generator: torch.Generator | None = None) -> Tensor:
        """``mean softplus(-D(real)) + mean softplus(D(fake)) + gp_weight * GP`` (both samples detached).

        ``generator`` seeds the random interpolation weights of the penalty (default: torch's RNG).
        """
        real, fake = real.detach(), fake.detach()
        real_logits = self.discriminator(real, *conditions)
        fake_logits = self.discriminator(fake, *conditions)
        losses = adversarial_losses(real_logits, fake_logits)
        total = losses.discriminator
        terms = {"adversarial": losses.discriminator.detach()}
        if self.gp_weight > 0:
            gp = gradient_penalty(self.discriminator, real, fake, *conditions, weight=self.gp_weight,
                                  generator=generator)
            total = total + gp
            terms["gradient_penalty"] = gp.detach()
        self.last_terms = terms
        return total

    def generator_loss(self, fake: Tensor, *conditions: Any) -> Tensor:
        """``mean softplus(-D(fake, *conditions))``; gradients flow into the student through ``fake``.

        Its backward also reaches D's parameters unless they are frozen; zero D's gradients before
        the next discriminator step (as Adv-KD does with ``requires_grad = False``).
        """
        return adversarial_losses(None, self.discriminator(fake, *conditions)).generator

    @torch.no_grad()
    def clip_discriminator_(self) -> None:
        """Clamp every discriminator parameter to ``[-clip_value, clip_value]`` in place (no-op if None)."""
        if self.clip_value is None:
            return
        from ..ops.multi_tensor import clip_parameters_  # exported as fastdistill.clip_parameters_

        clip_parameters_(self.discriminator, self.clip_value)

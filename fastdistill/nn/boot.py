"""``BootDistiller``: one BOOT training step (data-free distillation by bootstrapping) as a module."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..ops.boot import boot_loss
from ..ops._common import PREDICTION_TYPES, resolve_schedule, value_checks_enabled
from ._outputs import model_output


def _unwrap(out: Any) -> Tensor:
    """Model outputs as a tensor (see :func:`model_output`)."""
    return model_output(out, "BootDistiller")


class BootDistiller(nn.Module):
    """BOOT: the student g(eps, t) predicts the signal y_t of the teacher's DDIM trajectory from noise eps.

    Each :meth:`loss` call does the whole step for a batch of noise maps:

    1. ``y_t = student(eps, t)`` without gradient (the bootstrap target's start);
    2. the teacher at ``x_t = alpha_t y_t + sigma_t eps`` (twice under CFG), without gradient;
    3. ``y_s = student(eps, s)`` with gradient, ``s = t - step_size``;
    4. :func:`fastdistill.boot_loss`: ``w_t/delta^2 ||y_s - sg(y_t + delta (f - y_t))||^2`` with the
       teacher output converted to x space in fp32;
    5. plus ``boundary_weight`` times the boundary loss at the noise end,
       ``||student(eps, T-1) - f(eps, T-1)||^2`` (BOOT's boundary condition x_T = eps), through the
       same fused kernel (``delta = 1``).

    Args:
        student: called as ``student(noise, timesteps, **cond)`` -> signal prediction (B, ...).
        teacher: called as ``teacher(x, timesteps, **cond)`` -> its raw output (eps, x or v); diffusers
            UNet outputs (``.sample``) and tuples are unwrapped. It is frozen (``requires_grad_(False)``).
        scheduler_or_alphas_cumprod: a diffusers scheduler (its ``alphas_cumprod`` and
            ``config.prediction_type``) or a (T,) tensor of cumulative alpha products.
        step_size: t - s in timesteps (default ``max(1, T // 50)``: one step of a 50-step DDIM teacher).
        boundary_weight: beta, the weight of the boundary loss (0 turns it off).
        guidance_scale: classifier-free guidance scale for the teacher (None: no CFG).
        prediction_type: the teacher's output type; default from the scheduler, else ``"epsilon"``.
        weight_fn: ``weight_fn(alpha_t, sigma_t) -> (B,)`` per-sample w_t (default: uniform).

    Only the student has trainable parameters here: give ``distiller.student.parameters()`` to the
    optimizer. The loss parts of the last call are in ``last_terms`` (detached).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, scheduler_or_alphas_cumprod: Any, *,
                 step_size: int | None = None, boundary_weight: float = 1.0, guidance_scale: float | None = None,
                 prediction_type: str | None = None,
                 weight_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.requires_grad_(False)
        ac, _ = resolve_schedule("BootDistiller", scheduler_or_alphas_cumprod, None, torch.device("cpu"))
        if prediction_type is None:
            config = getattr(scheduler_or_alphas_cumprod, "config", None)
            prediction_type = getattr(config, "prediction_type", None) or "epsilon"
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"BootDistiller: prediction_type must be one of {list(PREDICTION_TYPES)}, "
                             f"got {prediction_type!r}")
        T = ac.shape[0]
        if step_size is None:
            step_size = max(1, T // 50)
        if isinstance(step_size, bool) or not isinstance(step_size, int) or not 1 <= step_size < T:
            raise ValueError(f"BootDistiller: step_size must be an int in [1, {T - 1}] (s = t - step_size must be a "
                             f"different, valid timestep), got {step_size!r}")
        if boundary_weight < 0:
            raise ValueError(f"BootDistiller: boundary_weight must be >= 0, got {boundary_weight}")
        self.step_size = step_size
        self.boundary_weight = float(boundary_weight)
        self.guidance_scale = guidance_scale
        self.prediction_type = prediction_type
        self.weight_fn = weight_fn
        # alpha = sqrt(abar), sigma = sqrt(1 - abar), computed in fp64 and kept in fp32 (buffers follow .to()).
        ac64 = ac.detach().to(torch.float64)
        self.register_buffer("alphas", ac64.sqrt().float(), persistent=False)
        self.register_buffer("sigmas", (1 - ac64).sqrt().float(), persistent=False)
        self.last_terms: dict[str, Tensor] = {}

    @property
    def num_timesteps(self) -> int:
        """T, the length of the schedule the distiller was given."""
        return self.alphas.shape[0]

    def _teacher(self, x: Tensor, t: Tensor, cond: dict[str, Any], uncond: dict[str, Any] | None
                 ) -> tuple[Tensor, Tensor | None]:
        f = _unwrap(self.teacher(x, t, **cond))
        fu = None
        if self.guidance_scale is not None:
            fu = _unwrap(self.teacher(x, t, **(uncond if uncond is not None else {})))
        return f, fu

    def _teacher_dtype(self, fallback: torch.dtype) -> torch.dtype:
        p = next(self.teacher.parameters(), None)
        return p.dtype if p is not None and p.dtype.is_floating_point else fallback

    def loss(self, noise: Tensor, timesteps: Tensor | None = None, *, uncond: dict[str, Any] | None = None,
             **cond: Any) -> Tensor:
        """The BOOT loss for a batch of noise maps ``noise`` (B, ...).

        ``timesteps``: (B,) integer t in ``[step_size, T-1]`` (default: uniform); ``cond``: conditioning
        passed to both networks; ``uncond``: the teacher's unconditional kwargs under CFG.
        The range of given ``timesteps`` is checked for CPU tensors; for CUDA tensors only with
        ``FASTDISTILL_VALUE_CHECKS=1`` (the check is a host sync; see
        :func:`fastdistill.ops._common.value_checks_enabled`). No other host sync.
        """
        B = noise.shape[0]
        T, dt = self.num_timesteps, self.step_size
        dev = noise.device
        if timesteps is None:
            t = torch.randint(dt, T, (B,), device=dev)
        else:
            t = timesteps.to(device=dev, dtype=torch.long).reshape(-1).expand(B) if timesteps.numel() == 1 \
                else timesteps.to(device=dev, dtype=torch.long)
            if t.shape != (B,):
                raise ValueError(f"BootDistiller.loss: timesteps must have shape ({B},), got {tuple(timesteps.shape)}")
            # A host read: on for CPU tensors, opt-in on CUDA (FASTDISTILL_VALUE_CHECKS=1), see value_checks_enabled.
            lo, hi = torch.stack([t.min(), t.max()]).tolist() if value_checks_enabled(dev) else (dt, T - 1)
            if lo < dt or hi >= T:
                raise ValueError(f"BootDistiller.loss: timesteps must lie in [{dt}, {T - 1}] (s = t - {dt} >= 0), "
                                 f"got [{lo}, {hi}]")
        s = t - dt
        alphas, sigmas = self.alphas.to(dev), self.sigmas.to(dev)
        a_t, s_t, a_s, s_s = alphas[t], sigmas[t], alphas[s], sigmas[s]
        w = self.weight_fn(a_t, s_t) if self.weight_fn is not None else None
        teacher_dtype = self._teacher_dtype(noise.dtype)
        shape = (B,) + (1,) * (noise.dim() - 1)

        with torch.no_grad():
            y_t = _unwrap(self.student(noise, t, **cond))
            # The teacher's input on the student's trajectory, formed in fp32 and cast once.
            x_t = (a_t.view(shape) * y_t.float() + s_t.view(shape) * noise.float()).to(teacher_dtype)
            f, fu = self._teacher(x_t, t, cond, uncond)
        y_s = _unwrap(self.student(noise, s, **cond))
        loss_bs = boot_loss(y_s, y_t, f, x_t=x_t, alpha_t=a_t, sigma_t=s_t, alpha_s=a_s, sigma_s=s_s, weight=w,
                            prediction_type=self.prediction_type, teacher_output_uncond=fu,
                            guidance_scale=self.guidance_scale if fu is not None else None)
        total = loss_bs
        self.last_terms = {"bootstrap": loss_bs.detach()}
        if self.boundary_weight > 0:
            t_end = torch.full((B,), T - 1, dtype=torch.long, device=dev)
            a_e, s_e = alphas[t_end], sigmas[t_end]
            with torch.no_grad():
                f_e, fu_e = self._teacher(noise.to(teacher_dtype), t_end, cond, uncond)
            y_e = _unwrap(self.student(noise, t_end, **cond))
            # alpha_s = 1, sigma_s = 0 gives delta = 1: target = f_x, loss = mean (y_e - f_x)^2.
            loss_bc = boot_loss(y_e, y_e.detach(), f_e, x_t=noise.to(teacher_dtype), alpha_t=a_e, sigma_t=s_e,
                                alpha_s=1.0, sigma_s=0.0, prediction_type=self.prediction_type,
                                teacher_output_uncond=fu_e,
                                guidance_scale=self.guidance_scale if fu_e is not None else None)
            total = total + self.boundary_weight * loss_bc
            self.last_terms["boundary"] = loss_bc.detach()
        return total

    def forward(self, noise: Tensor, timesteps: Tensor | None = None, **cond: Any) -> Tensor:
        """Same as :meth:`loss` (so the distiller can be wrapped by DDP / torch.compile)."""
        return self.loss(noise, timesteps, **cond)

    @torch.no_grad()
    def sample(self, noise: Tensor, **cond: Any) -> Tensor:
        """One-step generation: ``x_0 = student(noise, 0)``."""
        t0 = torch.zeros(noise.shape[0], dtype=torch.long, device=noise.device)
        return _unwrap(self.student(noise, t0, **cond))

"""Moment Matching distillation (Salimans et al. 2024, "Multistep Distillation of Diffusion Models via
Moment Matching", arXiv 2406.04103) as a drop-in module around diffusers-style denoisers.

The student is a k-step stochastic sampler: at grid time t it proposes ``x~ = g(z_t)`` and moves to
``z_s ~ q(z_s | z_t, x~)``. Training matches the first conditional moment ``E[x | z_s]`` along the
student's trajectory with the teacher's ``x_theta(z_s)``. Two estimators:

* ``variant="alternating"`` (Alg. 2): an auxiliary denoiser ``x_phi`` fit on student samples
  (:meth:`MomentMatchingDistiller.aux_loss`) stands in for ``E_g[x | z_s]``; the student minimises
  ``mean(w x~ sg(x_phi(z_s) - x_theta(z_s)))`` (:meth:`~MomentMatchingDistiller.student_loss`).
* ``variant="parameter"`` (Alg. 3): no auxiliary network. With the teacher loss
  ``l_theta(x~, z_s) = mean(w (x~ - x_theta(z_s))^2)`` and two half-batches, the student minimises
  ``F = g1^T Lambda grad_theta l(x~_2)`` with ``g1 = sg(grad_theta l(x~_1))`` and a diagonal
  ``Lambda = 1 / (sqrt(v) + eps)``. Its gradient in ``x~_2`` (z_s held fixed) is
  ``-(2 w / N) J_theta Lambda g1``; a forward difference of the teacher along ``Lambda g1`` gives it:
  ``(2 w / (N eps)) (x_theta'(z_s) - x_theta(z_s))`` with ``theta' = theta - eps Lambda g1``. So the
  surrogate is the alternating one with the auxiliary network replaced by the teacher after one
  preconditioned step, computed with :func:`fastdistill.preconditioned_perturb_` (one multi-tensor
  launch to perturb, one to restore). Cost: a teacher forward+backward on half 1, two teacher forwards
  on half 2.

Models are called as ``model(z, t, **cond)`` (diffusers ``UNet2DModel`` / ``UNet2DConditionModel``;
``.sample`` or the first tuple element is taken) and their output (``epsilon``, ``sample`` or
``v_prediction``) is converted to an x-prediction in fp32. The schedule is a diffusers scheduler's
``alphas_cumprod``: ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``.

Host syncs: none in the losses, their backward or :meth:`MomentMatchingDistiller.sample` (statistics
stay 0-d device tensors; a CPU ``generator``'s draws are moved with non-blocking pinned copies). The
range of user-given ``timesteps`` is checked for CPU tensors; for CUDA tensors only with
``FASTDISTILL_VALUE_CHECKS=1`` (a host read; see :func:`fastdistill.ops._common.value_checks_enabled`).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..ops.moment_matching import auxiliary_denoiser_loss, moment_matching_loss, posterior_sample
from ..ops._common import PREDICTION_TYPES, bcast, host_to_device, value_checks_enabled
from ..ops.multi_tensor import moment_dot, preconditioned_perturb_
from ._outputs import model_output

__all__ = ["MomentMatchingDistiller"]



def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _wide(x: Tensor) -> Tensor:
    """fp32 for half types, else as is (fp64 stays fp64: the finite-difference checks need it)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class MomentMatchingDistiller(nn.Module):
    """Moment Matching distillation of ``teacher`` into the few-step stochastic sampler ``student``.

    Args:
        student: the generator g(z_t, t) (initialise it from the teacher). Trained.
        teacher: the frozen teacher denoiser (its parameters get ``requires_grad_(False)``; the
            parameter variant perturbs them in place and restores them inside each call).
        aux: alternating variant only: the auxiliary denoiser; ``None`` makes a deep copy of the
            teacher (the paper's initialisation). Trained by :meth:`aux_loss`.
        variant: ``"alternating"`` or ``"parameter"``.
        scheduler: a diffusers scheduler: ``alphas_cumprod`` and ``config.prediction_type`` are read.
        alphas_cumprod: the (T,) schedule instead of ``scheduler``.
        prediction_type: what the three models predict (``"epsilon"``, ``"sample"``, ``"v_prediction"``);
            default: the scheduler's, else ``"epsilon"``.
        num_student_steps: k, the student's sampling steps. Grid: ``t_i = (i + 1) T / k - 1``; a step
            at t goes to ``s = max(t - T / k, 0)``.
        sampler: ``"ancestral"`` (the posterior q(z_s | z_t, x~), the paper) or ``"ddim"`` (the
            deterministic update the unofficial port trains with).
        teacher_weight: weight of the teacher-regression term in :meth:`aux_loss` (the port uses 1).
        guidance_scale: classifier-free guidance scale for the teacher, or None. With it, every loss
            call needs ``uncond=`` (the kwargs of the unconditional teacher call).
        weighting: ``f(alpha_s, sigma_s) -> (B,)`` per-sample weights w(s); default uniform.
        perturb_step: parameter variant: eps of ``theta' = theta - eps Lambda g1`` (finite, > 0).
        preconditioner: parameter variant: ``"rms"`` (``v`` = EMA of ``g1^2``, Adam-style) or
            ``"identity"`` (Lambda = I).
        precond_beta: EMA factor of ``v``; ``precond_eps``: added to ``sqrt(v)``.
        restore: parameter variant: ``"copy"`` (keep a copy of the teacher weights and copy it back:
            bit-exact, one extra weight-sized buffer) or ``"inverse"`` (perturb again with ``-eps``:
            no buffer, each element within one ulp; see :func:`fastdistill.preconditioned_perturb_`).
        clip_sample: clamp every x-prediction to ``[-clip_sample, clip_sample]`` (diffusers' ``clip_sample``;
            None: no clamp). Use 1.0 for data in [-1, 1] when an epsilon-prediction schedule has alpha_T
            near 0 (e.g. ``squaredcos_cap_v2``): there ``(z - sigma eps) / alpha`` at the top grid time
            ``T - 1`` is unbounded. The clamp passes no gradient to clamped elements.

    Call :meth:`student_loss` (and, alternating, :meth:`aux_loss` on alternate steps) and optimise
    ``distiller.student.parameters()`` (and ``distiller.aux.parameters()``). ``last_stats`` holds
    monitoring values of the last call.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, aux: nn.Module | None = None, *,
                 variant: str = "alternating", scheduler: Any = None, alphas_cumprod: Tensor | None = None,
                 prediction_type: str | None = None, num_student_steps: int = 8, sampler: str = "ancestral",
                 teacher_weight: float = 1.0, guidance_scale: float | None = None,
                 weighting: Callable[[Tensor, Tensor], Tensor] | None = None, perturb_step: float = 1e-3,
                 preconditioner: str = "rms", precond_beta: float = 0.999, precond_eps: float = 1e-8,
                 restore: str = "copy", clip_sample: float | None = None) -> None:
        super().__init__()
        name = "MomentMatchingDistiller"
        for arg, value in (("student", student), ("teacher", teacher)):
            if not isinstance(value, nn.Module):
                raise TypeError(f"{name}: {arg} must be an nn.Module, got {type(value).__name__}")
        if variant not in ("alternating", "parameter"):
            raise ValueError(f"{name}: variant must be 'alternating' or 'parameter', got {variant!r}")
        if variant == "parameter" and aux is not None:
            raise ValueError(f"{name}: the parameter variant has no auxiliary network; got aux")
        if aux is not None and not isinstance(aux, nn.Module):
            raise TypeError(f"{name}: aux must be an nn.Module or None, got {type(aux).__name__}")
        if (scheduler is None) == (alphas_cumprod is None):
            raise ValueError(f"{name}: pass exactly one of scheduler or alphas_cumprod")
        if scheduler is not None:
            if not hasattr(scheduler, "alphas_cumprod"):
                raise TypeError(f"{name}: scheduler has no alphas_cumprod (use a diffusers DDPM/DDIM-style one)")
            alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod)
            if prediction_type is None:
                prediction_type = getattr(getattr(scheduler, "config", None), "prediction_type", None)
        if not isinstance(alphas_cumprod, Tensor) or alphas_cumprod.dim() != 1 or alphas_cumprod.numel() < 2:
            raise ValueError(f"{name}: alphas_cumprod must be a 1-D tensor of at least 2 entries")
        abar = alphas_cumprod.detach().double().cpu()
        if not bool(((abar > 0) & (abar < 1)).all()):
            raise ValueError(f"{name}: alphas_cumprod must lie in (0, 1)")
        prediction_type = prediction_type or "epsilon"
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"{name}: prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        T = abar.numel()
        if isinstance(num_student_steps, bool) or not isinstance(num_student_steps, int) \
                or not 1 <= num_student_steps <= T:
            raise ValueError(f"{name}: num_student_steps must be an int in [1, {T}], got {num_student_steps!r}")
        if sampler not in ("ancestral", "ddim"):
            raise ValueError(f"{name}: sampler must be 'ancestral' or 'ddim', got {sampler!r}")
        for arg, value, positive in (("teacher_weight", teacher_weight, False), ("perturb_step", perturb_step, True),
                                     ("precond_eps", precond_eps, False)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (positive and value == 0):
                raise ValueError(f"{name}: {arg} must be a finite number {'> 0' if positive else '>= 0'}, "
                                 f"got {value!r}")
        if not (isinstance(precond_beta, (int, float)) and 0 <= precond_beta < 1):
            raise ValueError(f"{name}: precond_beta must be in [0, 1), got {precond_beta!r}")
        if preconditioner not in ("rms", "identity"):
            raise ValueError(f"{name}: preconditioner must be 'rms' or 'identity', got {preconditioner!r}")
        if restore not in ("copy", "inverse"):
            raise ValueError(f"{name}: restore must be 'copy' or 'inverse', got {restore!r}")
        if guidance_scale is not None and (isinstance(guidance_scale, bool)
                                           or not isinstance(guidance_scale, (int, float))):
            raise TypeError(f"{name}: guidance_scale must be a number or None")

        self.student = student
        self.teacher = teacher.requires_grad_(False)
        if variant == "alternating":
            self.aux = aux if aux is not None else copy.deepcopy(teacher).requires_grad_(True)
        else:
            self.aux = None
        self.variant = variant
        self.prediction_type = prediction_type
        self.num_student_steps = num_student_steps
        self.sampler = sampler
        self.teacher_weight = float(teacher_weight)
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.weighting = weighting
        self.perturb_step = float(perturb_step)
        self.preconditioner = preconditioner
        self.precond_beta = float(precond_beta)
        self.precond_eps = float(precond_eps)
        self.restore = restore
        if clip_sample is not None and not (isinstance(clip_sample, (int, float)) and clip_sample > 0):
            raise ValueError(f"{name}: clip_sample must be a number > 0 or None, got {clip_sample!r}")
        self.clip_sample = None if clip_sample is None else float(clip_sample)
        self.num_train_timesteps = T
        self.stride = T // num_student_steps
        self.register_buffer("alphas", abar.sqrt().float(), persistent=False)
        self.register_buffer("sigmas", (1 - abar).sqrt().float(), persistent=False)
        self.precond_state: list[Tensor] | None = None  # v, fp32, one per teacher parameter
        self._backup: list[Tensor] | None = None
        # Detached 0-d tensors (no host sync): "moment_gap" = mean (x_aux - x_teacher)^2 (alternating);
        # "moment_estimate" ~ g1^T Lambda g2 and "g1_norm_sq" = g1^T Lambda g1 (parameter variant).
        self.last_stats: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ schedule and models

    def student_timesteps(self) -> Tensor:
        """The student's grid ``t_i = (i + 1) T / k - 1`` (ascending, int64)."""
        return torch.arange(1, self.num_student_steps + 1, device=self.alphas.device) * self.stride - 1

    def _times(self, x0: Tensor, timesteps: Tensor | None, generator: torch.Generator | None):
        B = x0.shape[0]
        if timesteps is None:
            grid = self.student_timesteps()
            device = grid.device if generator is None else generator.device
            idx = host_to_device(torch.randint(0, grid.numel(), (B,), generator=generator, device=device), grid.device)
            t = grid[idx]
        else:
            if not isinstance(timesteps, Tensor) or timesteps.dtype.is_floating_point or timesteps.shape != (B,):
                raise ValueError(f"MomentMatchingDistiller: timesteps must be an integer tensor of shape ({B},)")
            t = timesteps.to(self.alphas.device).long()
            # A host read: on for CPU tensors, opt-in on CUDA (FASTDISTILL_VALUE_CHECKS=1).
            if value_checks_enabled(t.device) and bool(((t < 0) | (t >= self.num_train_timesteps)).any()):
                raise ValueError(f"MomentMatchingDistiller: timesteps must lie in [0, {self.num_train_timesteps})")
        s = torch.clamp(t - self.stride, min=0)
        return t, s

    def _diffuse(self, x0: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        device = x0.device if generator is None else generator.device
        noise = host_to_device(torch.randn(x0.shape, generator=generator, device=device, dtype=torch.float32),
                               x0.device)
        a, s = self.alphas[t], self.sigmas[t]
        return bcast(a, x0) * _wide(x0) + bcast(s, x0) * noise

    def x_prediction(self, model: nn.Module, z: Tensor, t: Tensor, cond: dict[str, Any] | None = None) -> Tensor:
        """``model(z, t, **cond)`` converted to an x-prediction (fp32, or fp64 for an fp64 model)."""
        out = _wide(model_output(model(z.to(_model_dtype(model)), t, **(cond or {})), "MomentMatchingDistiller"))
        a, s = bcast(self.alphas[t], z), bcast(self.sigmas[t], z)
        zf = _wide(z)
        if self.prediction_type == "epsilon":
            x = (zf - s * out) / a
        elif self.prediction_type == "v_prediction":
            x = a * zf - s * out
        else:
            x = out
        return x if self.clip_sample is None else x.clamp(-self.clip_sample, self.clip_sample)

    def _teacher_x(self, z: Tensor, s: Tensor, cond: dict, uncond: dict | None) -> tuple[Tensor, Tensor | None]:
        x = self.x_prediction(self.teacher, z, s, cond)
        if self.guidance_scale is None:
            return x, None
        return x, self.x_prediction(self.teacher, z, s, uncond)

    def _guided(self, x: Tensor, xu: Tensor | None) -> Tensor:
        return x if xu is None else xu + self.guidance_scale * (x - xu)

    def _weights(self, s: Tensor) -> Tensor | None:
        if self.weighting is None:
            return None
        w = self.weighting(self.alphas[s], self.sigmas[s])
        return torch.as_tensor(w, dtype=torch.float32, device=s.device).expand(s.shape[0])

    def _check_uncond(self, uncond: dict | None) -> None:
        if self.guidance_scale is not None and uncond is None:
            raise ValueError("MomentMatchingDistiller: guidance_scale is set, so pass uncond= (the kwargs of the "
                             "unconditional teacher call; {} for a model without conditioning inputs)")

    def _posterior(self, z_t: Tensor, x: Tensor, t: Tensor, s: Tensor, generator) -> Tensor:
        return posterior_sample(z_t, x, self.alphas[t], self.sigmas[t], self.alphas[s], self.sigmas[s],
                                mode=self.sampler, generator=generator)

    # ------------------------------------------------------------------ alternating variant

    def student_loss(self, x0: Tensor, timesteps: Tensor | None = None, *, generator: torch.Generator | None = None,
                     uncond: dict[str, Any] | None = None, **cond: Any) -> Tensor:
        """The student's moment-matching loss on data ``x0`` (B, ...); gradients reach the student only.

        ``timesteps``: (B,) int student times t (default: uniform on the student grid). ``cond``: the
        models' conditioning kwargs (e.g. ``encoder_hidden_states=``, ``class_labels=``); ``uncond``:
        the unconditional teacher kwargs under CFG. Dispatches on ``variant``.
        """
        self._check_uncond(uncond)
        t, s = self._times(x0, timesteps, generator)
        z_t = self._diffuse(x0, t, generator)
        x_s = self.x_prediction(self.student, z_t, t, cond)
        if self.variant == "parameter":
            return self._parameter_student_loss(x_s, z_t, t, s, generator, cond, uncond)
        with torch.no_grad():
            z_s = self._posterior(z_t, x_s.detach(), t, s, generator)
            x_aux = self.x_prediction(self.aux, z_s, s, cond)
            x_teacher, x_uncond = self._teacher_x(z_s, s, cond, uncond)
        loss = moment_matching_loss(x_s, x_aux, x_teacher, weight=self._weights(s), x_teacher_uncond=x_uncond,
                                    guidance_scale=self.guidance_scale)
        self.last_stats = {"moment_gap": (x_aux - self._guided(x_teacher, x_uncond)).pow(2).mean()}
        return loss

    def aux_loss(self, x0: Tensor, timesteps: Tensor | None = None, *, generator: torch.Generator | None = None,
                 uncond: dict[str, Any] | None = None, **cond: Any) -> Tensor:
        """The auxiliary denoiser's loss on student samples (alternating variant); gradients reach ``aux`` only:
        ``mean(w (x~ - x_phi(z_s))^2) + teacher_weight * mean(w (x_theta(z_s) - x_phi(z_s))^2)``."""
        if self.variant != "alternating":
            raise RuntimeError("MomentMatchingDistiller: aux_loss exists only for variant='alternating'")
        self._check_uncond(uncond)
        t, s = self._times(x0, timesteps, generator)
        z_t = self._diffuse(x0, t, generator)
        with torch.no_grad():
            x_s = self.x_prediction(self.student, z_t, t, cond)
            z_s = self._posterior(z_t, x_s, t, s, generator)
            x_teacher = self._guided(*self._teacher_x(z_s, s, cond, uncond))
        x_aux = self.x_prediction(self.aux, z_s, s, cond)
        return auxiliary_denoiser_loss(x_aux, x_s, x_teacher, teacher_weight=self.teacher_weight,
                                       weight=self._weights(s))

    def forward(self, x0: Tensor, timesteps: Tensor | None = None, *, phase: str = "student", **kwargs: Any) -> Tensor:
        """``phase="student"``: :meth:`student_loss`; ``phase="aux"``: :meth:`aux_loss`."""
        if phase == "student":
            return self.student_loss(x0, timesteps, **kwargs)
        if phase == "aux":
            return self.aux_loss(x0, timesteps, **kwargs)
        raise ValueError(f"MomentMatchingDistiller: phase must be 'student' or 'aux', got {phase!r}")

    # ------------------------------------------------------------------ parameter-space variant

    def teacher_parameters(self) -> list[Tensor]:
        """The teacher's parameters (perturbed and restored by the parameter variant)."""
        return [p for p in self.teacher.parameters() if p.is_floating_point()]

    def teacher_loss(self, x_clean: Tensor, z_s: Tensor, s: Tensor, cond: dict | None = None,
                     uncond: dict | None = None) -> Tensor:
        """``l_theta = mean(w (x_clean - x_theta(z_s))^2)`` (CFG-guided teacher when set), differentiable in theta."""
        x_theta = self._guided(*self._teacher_x(z_s, s, cond or {}, uncond))
        per = (_wide(x_clean) - x_theta).pow(2)
        w = self._weights(s)
        if w is not None:
            per = bcast(w, per) * per
        return per.mean()

    def teacher_grad(self, x_clean: Tensor, z_s: Tensor, s: Tensor, cond: dict | None = None,
                     uncond: dict | None = None) -> list[Tensor]:
        """``grad_theta l_theta(x_clean, z_s)`` for every teacher parameter (zeros where unused); leaves
        no ``.grad`` on the teacher."""
        params = self.teacher_parameters()
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad():
                loss = self.teacher_loss(x_clean.detach(), z_s.detach(), s, cond, uncond)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    def update_preconditioner(self, grads: list[Tensor]) -> list[Tensor] | None:
        """``v <- beta v + (1 - beta) g^2`` (``v = g^2`` on the first call); None for ``"identity"``."""
        if self.preconditioner == "identity":
            return None
        g32 = [g.float() for g in grads]
        if self.precond_state is None or len(self.precond_state) != len(g32):
            self.precond_state = [g * g for g in g32]
        else:
            torch._foreach_mul_(self.precond_state, self.precond_beta)
            torch._foreach_addcmul_(self.precond_state, g32, g32, value=1 - self.precond_beta)
        return self.precond_state

    def parameter_surrogate(self, x_student: Tensor, z_s: Tensor, s: Tensor, g1: list[Tensor],
                            precond: list[Tensor] | None, cond: dict | None = None,
                            uncond: dict | None = None) -> Tensor:
        """The student surrogate whose gradient in ``x_student`` is that of ``F = g1^T Lambda grad_theta
        l_theta(x_student, z_s)`` (z_s fixed), from the teacher at theta and at
        ``theta' = theta - perturb_step * Lambda g1``. The teacher comes back unchanged (``restore``)."""
        cond = cond or {}
        params = self.teacher_parameters()
        eps = self.perturb_step
        with torch.no_grad():
            x_theta = self._guided(*self._teacher_x(z_s, s, cond, uncond))
            if self.restore == "copy":
                if self._backup is None or len(self._backup) != len(params) or any(
                        b.shape != p.shape or b.dtype != p.dtype or b.device != p.device
                        for b, p in zip(self._backup, params)):
                    self._backup = [torch.empty_like(p) for p in params]
                torch._foreach_copy_(self._backup, params)
            preconditioned_perturb_(params, g1, precond, step=eps, eps=self.precond_eps)
            try:
                x_theta_p = self._guided(*self._teacher_x(z_s, s, cond, uncond))
            finally:
                if self.restore == "copy":
                    torch._foreach_copy_(params, self._backup)
                else:
                    preconditioned_perturb_(params, g1, precond, step=-eps, eps=self.precond_eps)
        w = self._weights(s)
        w = torch.ones(x_student.shape[0], device=x_student.device) if w is None else w
        loss = moment_matching_loss(x_student, x_theta_p, x_theta, weight=2.0 * w / eps)
        with torch.no_grad():  # forward-difference estimate of F itself, for monitoring
            xs = _wide(x_student.detach())
            wb = bcast(w, xs)
            f_est = ((wb * (xs - x_theta).pow(2)).mean() - (wb * (xs - x_theta_p).pow(2)).mean()) / eps
        self.last_stats = {"moment_estimate": f_est}
        return loss

    def _parameter_student_loss(self, x_s: Tensor, z_t: Tensor, t: Tensor, s: Tensor, generator, cond, uncond):
        B = x_s.shape[0]
        if B < 2:
            raise ValueError("MomentMatchingDistiller: the parameter variant needs a batch of at least 2 "
                             "(two independent half-batches)")
        h = B // 2
        with torch.no_grad():
            z_s = self._posterior(z_t, x_s.detach(), t, s, generator)
        c1, c2 = _split_cond(cond, B, h), _split_cond(cond, B, h, second=True)
        u1 = _split_cond(uncond, B, h) if uncond is not None else None
        u2 = _split_cond(uncond, B, h, second=True) if uncond is not None else None
        g1 = self.teacher_grad(x_s[:h].detach(), z_s[:h], s[:h], c1, u1)
        precond = self.update_preconditioner(g1)
        loss = self.parameter_surrogate(x_s[h:], z_s[h:], s[h:], g1, precond, c2, u2)
        self.last_stats["g1_norm_sq"] = moment_dot(g1, g1, precond, eps=self.precond_eps)
        return loss

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, noise: Tensor, *, generator: torch.Generator | None = None, **cond: Any) -> Tensor:
        """Run the k-step student sampler from pure noise at the top grid time; returns the final x~."""
        z = _wide(noise)
        B = z.shape[0]
        x = z
        # The grid on the host (the same values as student_timesteps()): no device read per step.
        host_grid = [(i + 1) * self.stride - 1 for i in reversed(range(self.num_student_steps))]
        for i, tt in enumerate(host_grid):
            t = torch.full((B,), tt, dtype=torch.long, device=z.device)
            x = self.x_prediction(self.student, z, t, cond)
            if i + 1 < len(host_grid):
                s = torch.full((B,), host_grid[i + 1], dtype=torch.long, device=z.device)
                z = self._posterior(z, x, t, s, generator)
        return x


def _split_cond(cond: dict[str, Any], B: int, h: int, second: bool = False) -> dict[str, Any]:
    """Half of every batch-major tensor kwarg (dim 0 == B); other values as they are."""
    out = {}
    for k, v in cond.items():
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == B:
            out[k] = v[h:] if second else v[:h]
        else:
            out[k] = v
    return out

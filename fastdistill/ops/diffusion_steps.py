"""Per-sample diffusion arithmetic for distillation loops.

diffusers' ``scheduler.step`` takes one scalar timestep; distillation batches carry one timestep per
sample. These ops do the same arithmetic vectorised over the batch, in fp32 whatever the input
dtype, with a fused forward and backward:

* :func:`ddim_step`: the deterministic DDIM update (eta = 0), returning ``(prev_sample,
  pred_original_sample)`` exactly as ``DDIMScheduler.step(..., eta=0)`` with ``clip_sample=False``
  does for each sample;
* :func:`progressive_distillation_target`: the (x, eps) targets of progressive distillation such that
  one student DDIM step from z_t lands on the teacher's two-step result;
* :func:`pd_loss`: the truncated-SNR loss ``mean_b max(MSE_x, MSE_eps)`` of progressive distillation.

Each op has a plain-PyTorch reference (``*_reference``), the ground truth and the CPU path, and a
Triton backend registered as a ``torch.library`` custom op (fake kernel + autograd), chosen by
:mod:`fastdistill.dispatch`.

No host syncs by default: the value checks (timestep ranges, positive scales, s != t) are on for CPU
tensors and opt-in for CUDA tensors (``validate=True``, or ``FASTDISTILL_VALUE_CHECKS=1``); see
:func:`fastdistill.ops._common.value_checks_enabled`, the one switch every opt-in check of
fastdistill goes through.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import dispatch
from .._validation import check_choice, check_same_device, check_same_shape, check_tensor
from ._common import (PRED_CODE, PREDICTION_TYPES, as_rows, autocast_op, bcast, check_batched, check_batched_pair,
                      compute_dtype, not_positive, per_sample, raise_on_bad_values, resolve_schedule)

dispatch.register_op("ddim_step", ["triton"])
dispatch.register_op("progressive_distillation_target", ["triton"])
dispatch.register_op("pd_loss", ["triton"])


# ----------------------------------------------------------------------------------------------
# ddim_step
# ----------------------------------------------------------------------------------------------


class DDIMStepOutput(NamedTuple):
    """``prev_sample``: x at the previous timestep; ``pred_original_sample``: the x0 prediction."""

    prev_sample: Tensor
    pred_original_sample: Tensor


def _timesteps(op: str, name: str, value: Any, batch: int, device: torch.device) -> Tensor:
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int or an integer tensor, got bool")
    if isinstance(value, int):
        return torch.full((batch,), value, dtype=torch.int64, device=device)
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be an int or an integer tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{op}: {name} must be an integer tensor, got {value.dtype}")
    value = value.to(device=device, dtype=torch.int64)
    if value.dim() == 0:
        return value.expand(batch).contiguous()
    if value.dim() == 1 and value.shape[0] == batch:
        return value.contiguous()
    raise ValueError(f"{op}: {name} must be an int, a 0-d tensor or have shape ({batch},), got {tuple(value.shape)}")


def _check_timestep_range(op: str, t: Tensor, p: Tensor, n: int, validate: bool | None = None) -> None:
    raise_on_bad_values(op, t.device, [
        (lambda: (t < 0).any() | (t >= n).any(),
         lambda: f"timesteps must lie in [0, {n - 1}] (the range of alphas_cumprod, length {n}); got values in "
                 f"[{int(t.min())}, {int(t.max())}]"),
        (lambda: (p >= n).any(),
         lambda: f"prev_timesteps must be < {n} (the length of alphas_cumprod; negative values mean "
                 f"final_alpha_cumprod); got max {int(p.max())}"),
    ], validate)


def ddim_step_reference(x_t: Tensor, model_output: Tensor, timesteps: Tensor, prev_timesteps: Tensor,
                        alphas_cumprod: Tensor, prediction_type: str = "epsilon",
                        final_alpha_cumprod: float = 1.0) -> DDIMStepOutput:
    """Plain-PyTorch DDIM step (eta = 0) with per-sample (B,) int64 timesteps; the ground truth."""
    cdt = compute_dtype(x_t.dtype, model_output.dtype, alphas_cumprod.dtype)
    out_dtype = torch.promote_types(x_t.dtype, model_output.dtype)
    ac = alphas_cumprod.to(cdt)
    a_t = ac[timesteps]
    a_p = torch.where(prev_timesteps >= 0, ac[prev_timesteps.clamp(min=0)],
                      torch.full_like(a_t, final_alpha_cumprod))
    alpha, sigma = bcast(a_t.sqrt(), x_t), bcast((1 - a_t).sqrt(), x_t)
    alpha_p, sigma_p = bcast(a_p.sqrt(), x_t), bcast((1 - a_p).sqrt(), x_t)
    x, m = x_t.to(cdt), model_output.to(cdt)
    if prediction_type == "epsilon":
        x0, eps = (x - sigma * m) / alpha, m
    elif prediction_type == "sample":
        x0, eps = m, (x - alpha * m) / sigma
    else:
        x0, eps = alpha * x - sigma * m, alpha * m + sigma * x
    prev = alpha_p * x0 + sigma_p * eps
    return DDIMStepOutput(prev.to(out_dtype), x0.to(out_dtype))


@torch.library.custom_op("fastdistill::ddim_step_triton", mutates_args=())
def _ddim_step_triton(x: Tensor, m: Tensor, t: Tensor, p: Tensor, ac: Tensor, final_ac: float,
                      pred: int) -> tuple[Tensor, Tensor]:
    from fastdistill.kernels import diffusion_steps as k

    return k.ddim_step_fwd(x, m, t, p, ac, final_ac, pred, torch.promote_types(x.dtype, m.dtype))


@_ddim_step_triton.register_fake
def _(x, m, t, p, ac, final_ac, pred):
    dt = torch.promote_types(x.dtype, m.dtype)
    return x.new_empty(x.shape, dtype=dt), x.new_empty(x.shape, dtype=dt)


@torch.library.custom_op("fastdistill::ddim_step_triton_bwd", mutates_args=())
def _ddim_step_triton_bwd(g_prev: Tensor | None, g_x0: Tensor | None, t: Tensor, p: Tensor, ac: Tensor,
                          final_ac: float, pred: int, x_like: Tensor, m_like: Tensor) -> tuple[Tensor, Tensor]:
    from fastdistill.kernels import diffusion_steps as k

    g_prev = g_prev.contiguous() if g_prev is not None else None
    g_x0 = g_x0.contiguous() if g_x0 is not None else None
    return k.ddim_step_bwd(g_prev, g_x0, t, p, ac, final_ac, pred, tuple(x_like.shape), x_like.dtype,
                           m_like.dtype, x_like.device)


@_ddim_step_triton_bwd.register_fake
def _(g_prev, g_x0, t, p, ac, final_ac, pred, x_like, m_like):
    return torch.empty_like(x_like), torch.empty_like(m_like)


def _ddim_setup(ctx, inputs, output):
    x, m, t, p, ac, final_ac, pred = inputs
    ctx.save_for_backward(t, p, ac)
    ctx.final_ac, ctx.pred = final_ac, pred
    # Only metadata of x and m is needed: keep 0-stride views, not the tensors' storage.
    ctx.x_meta = x.new_empty(()).expand(x.shape)
    ctx.m_meta = m.new_empty(()).expand(m.shape)


def _ddim_backward(ctx, g_prev, g_x0):
    t, p, ac = ctx.saved_tensors
    gx, gm = _ddim_step_triton_bwd(g_prev, g_x0, t, p, ac, ctx.final_ac, ctx.pred, ctx.x_meta, ctx.m_meta)
    return gx, gm, None, None, None, None, None


_ddim_step_triton.register_autograd(_ddim_backward, setup_context=_ddim_setup)


@autocast_op("none")  # elementwise: nothing cast; the body never sees the caller's autocast
def ddim_step(x_t: Tensor, model_output: Tensor, timesteps: Tensor | int, prev_timesteps: Tensor | int,
              alphas_cumprod: Tensor | Any, *, prediction_type: str = "epsilon",
              final_alpha_cumprod: float | None = None, validate: bool | None = None) -> DDIMStepOutput:
    """Deterministic DDIM update (eta = 0) with one timestep per sample.

    Sample by sample equal to ``DDIMScheduler.step(model_output[b], timesteps[b], x_t[b], eta=0)``
    with ``clip_sample=False`` (and no thresholding), where ``prev_timesteps[b]`` is the scheduler's
    previous timestep.

    Args:
        x_t: (B, ...) current samples, any float dtype.
        model_output: (B, ...) the model's output at ``x_t`` (same shape).
        timesteps: (B,) integer tensor (or an int / 0-d tensor for all samples), in
            ``[0, len(alphas_cumprod))``.
        prev_timesteps: like ``timesteps``; a negative value selects ``final_alpha_cumprod``
            (the step past the end of the schedule, as diffusers does).
        alphas_cumprod: (T,) cumulative alpha products, or a diffusers scheduler (its
            ``alphas_cumprod`` and ``final_alpha_cumprod`` are used).
        prediction_type: what the model predicts: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        final_alpha_cumprod: alpha-bar used for negative ``prev_timesteps`` (default: the scheduler's,
            else 1.0, diffusers' ``set_alpha_to_one=True``).
        validate: check the timestep ranges (ValueError on a bad value). ``None`` (default): on for
            CPU tensors, off for CUDA tensors, where the check costs a host sync (``True`` opts in;
            ``FASTDISTILL_VALUE_CHECKS=1`` does it process-wide, see
            :func:`~fastdistill.ops._common.value_checks_enabled`).
            Without it an out-of-range timestep reads out of bounds of the schedule.

    Returns:
        ``DDIMStepOutput(prev_sample, pred_original_sample)``, a tuple of two tensors shaped like
        ``x_t`` in ``promote_types(x_t.dtype, model_output.dtype)``, computed in fp32.
        Differentiable with respect to ``x_t`` and ``model_output`` (the schedule is a constant).
    """
    op = "ddim_step"
    device = check_batched_pair(op, ("x_t", x_t), ("model_output", model_output))
    check_choice(op, "prediction_type", prediction_type, PREDICTION_TYPES)
    ac, final = resolve_schedule(op, alphas_cumprod, final_alpha_cumprod, device)
    B = x_t.shape[0]
    t = _timesteps(op, "timesteps", timesteps, B, device)
    p = _timesteps(op, "prev_timesteps", prev_timesteps, B, device)
    _check_timestep_range(op, t, p, ac.shape[0], validate)
    backend = dispatch.select_backend(op, x_t, model_output)
    if backend == "triton":
        prev, x0 = _ddim_step_triton(as_rows(x_t), as_rows(model_output), t, p, ac.float().contiguous(), final,
                                     PRED_CODE[prediction_type])
        return DDIMStepOutput(prev.reshape(x_t.shape), x0.reshape(x_t.shape))
    return ddim_step_reference(x_t, model_output, t, p, ac, prediction_type, final)


# ----------------------------------------------------------------------------------------------
# progressive_distillation_target
# ----------------------------------------------------------------------------------------------


class PDTarget(NamedTuple):
    """``x_target``: the student's x-target x~; ``eps_target``: the matching eps~."""

    x_target: Tensor
    eps_target: Tensor


def progressive_distillation_target_reference(z_t: Tensor, z_target: Tensor, alpha_t: Tensor, sigma_t: Tensor,
                                              alpha_s: Tensor, sigma_s: Tensor) -> PDTarget:
    """Plain-PyTorch PD target with (B,) coefficient tensors; the ground truth."""
    cdt = compute_dtype(z_t.dtype, z_target.dtype, alpha_t.dtype)
    out_dtype = torch.promote_types(z_t.dtype, z_target.dtype)
    a_t, s_t, a_s, s_s = (bcast(v.to(cdt), z_t) for v in (alpha_t, sigma_t, alpha_s, sigma_s))
    zt, zs = z_t.to(cdt), z_target.to(cdt)
    frac = s_s / s_t
    x = (zs - frac * zt) / (a_s - frac * a_t)
    e = (zt - a_t * x) / s_t
    return PDTarget(x.to(out_dtype), e.to(out_dtype))


@torch.library.custom_op("fastdistill::progressive_distillation_target_triton", mutates_args=())
def _pd_target_triton(zt: Tensor, zs: Tensor, at: Tensor, st: Tensor, as_: Tensor, ss: Tensor
                      ) -> tuple[Tensor, Tensor]:
    from fastdistill.kernels import diffusion_steps as k

    return k.pd_target_fwd(zt, zs, at, st, as_, ss, torch.promote_types(zt.dtype, zs.dtype))


@_pd_target_triton.register_fake
def _(zt, zs, at, st, as_, ss):
    dt = torch.promote_types(zt.dtype, zs.dtype)
    return zt.new_empty(zt.shape, dtype=dt), zt.new_empty(zt.shape, dtype=dt)


@torch.library.custom_op("fastdistill::progressive_distillation_target_triton_bwd", mutates_args=())
def _pd_target_triton_bwd(gx: Tensor | None, ge: Tensor | None, at: Tensor, st: Tensor, as_: Tensor, ss: Tensor,
                          zt_like: Tensor, zs_like: Tensor) -> tuple[Tensor, Tensor]:
    from fastdistill.kernels import diffusion_steps as k

    gx = gx.contiguous() if gx is not None else None
    ge = ge.contiguous() if ge is not None else None
    return k.pd_target_bwd(gx, ge, at, st, as_, ss, tuple(zt_like.shape), zt_like.dtype, zs_like.dtype,
                           zt_like.device)


@_pd_target_triton_bwd.register_fake
def _(gx, ge, at, st, as_, ss, zt_like, zs_like):
    return torch.empty_like(zt_like), torch.empty_like(zs_like)


def _pd_target_setup(ctx, inputs, output):
    zt, zs, at, st, as_, ss = inputs
    ctx.save_for_backward(at, st, as_, ss)
    ctx.zt_meta = zt.new_empty(()).expand(zt.shape)
    ctx.zs_meta = zs.new_empty(()).expand(zs.shape)


def _pd_target_backward(ctx, gx, ge):
    at, st, as_, ss = ctx.saved_tensors
    gzt, gzs = _pd_target_triton_bwd(gx, ge, at, st, as_, ss, ctx.zt_meta, ctx.zs_meta)
    return gzt, gzs, None, None, None, None


_pd_target_triton.register_autograd(_pd_target_backward, setup_context=_pd_target_setup)


@autocast_op("none")  # elementwise: nothing cast; the body never sees the caller's autocast
def progressive_distillation_target(z_t: Tensor, z_target: Tensor, alpha_t: Tensor | float,
                                    sigma_t: Tensor | float, alpha_s: Tensor | float,
                                    sigma_s: Tensor | float, *, validate: bool | None = None) -> PDTarget:
    """Targets of progressive distillation (Salimans & Ho 2022; RDD's ``diffusion.py``).

    With ``frac = sigma_s / sigma_t``::

        x_target   = (z_target - frac * z_t) / (alpha_s - frac * alpha_t)
        eps_target = (z_t - alpha_t * x_target) / sigma_t

    so that one DDIM step of the student from ``z_t`` (time t) with x-prediction ``x_target`` lands
    exactly on ``z_target``, the teacher's two-step result at time s < t.

    Args:
        z_t: (B, ...) noisy input at time t.
        z_target: (B, ...) the teacher's result at time s (same shape).
        alpha_t, sigma_t, alpha_s, sigma_s: per-sample signal/noise scales (``alpha = sqrt(abar)``,
            ``sigma = sqrt(1 - abar)``): numbers, 0-d or (B,) tensors; sigma_t > 0 and s != t.
        validate: check sigma_t > 0 and s != t (ValueError otherwise). ``None`` (default): on for CPU
            tensors, off for CUDA tensors, where it costs a host sync; ``True`` opts in (or
            ``FASTDISTILL_VALUE_CHECKS=1``, see :func:`~fastdistill.ops._common.value_checks_enabled`).

    Returns:
        ``PDTarget(x_target, eps_target)`` shaped like ``z_t``, computed in fp32. Differentiable with
        respect to ``z_t`` and ``z_target`` (the coefficients are constants).
    """
    op = "progressive_distillation_target"
    device = check_batched_pair(op, ("z_t", z_t), ("z_target", z_target))
    B = z_t.shape[0]
    at, st, as_, ss = (per_sample(op, n, v, B, device) for n, v in
                       (("alpha_t", alpha_t), ("sigma_t", sigma_t), ("alpha_s", alpha_s), ("sigma_s", sigma_s)))
    def same_time() -> Tensor:
        den = (as_.double() * st.double() - ss.double() * at.double()).abs()
        return (den <= 1e-6 * (as_.double().abs() * st.double())).any()

    raise_on_bad_values(op, device, [
        not_positive("sigma_t", st),
        (same_time,
         lambda: "alpha_s*sigma_t == sigma_s*alpha_t for some sample, i.e. s == t: the target is undefined "
                 "(the two times must differ)"),
    ], validate)
    backend = dispatch.select_backend(op, z_t, z_target)
    if backend == "triton":
        x, e = _pd_target_triton(as_rows(z_t), as_rows(z_target), at.float(), st.float(), as_.float(), ss.float())
        return PDTarget(x.reshape(z_t.shape), e.reshape(z_t.shape))
    return progressive_distillation_target_reference(z_t, z_target, at, st, as_, ss)


# ----------------------------------------------------------------------------------------------
# pd_loss
# ----------------------------------------------------------------------------------------------


def pd_loss_reference(x_student: Tensor, x_target: Tensor, eps_target: Tensor, z_t: Tensor, alpha_t: Tensor,
                      sigma_t: Tensor) -> Tensor:
    """Plain-PyTorch truncated-SNR PD loss with (B,) coefficients; the ground truth."""
    cdt = compute_dtype(x_student.dtype, x_target.dtype, eps_target.dtype, z_t.dtype, alpha_t.dtype)
    B = x_student.shape[0]
    xs = x_student.to(cdt).reshape(B, -1)
    xt, et, zt = (v.detach().to(cdt).reshape(B, -1) for v in (x_target, eps_target, z_t))
    a, s = alpha_t.to(cdt)[:, None], sigma_t.to(cdt)[:, None]
    eps_s = (zt - a * xs) / s
    mse_x = (xs - xt).pow(2).mean(1)
    mse_e = (eps_s - et).pow(2).mean(1)
    return torch.maximum(mse_x, mse_e).mean()


@torch.library.custom_op("fastdistill::pd_loss_triton", mutates_args=())
def _pd_loss_triton(xs: Tensor, xt: Tensor, et: Tensor, zt: Tensor, a: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    from fastdistill.kernels import diffusion_steps as k

    return k.pd_loss_fwd(xs, xt, et, zt, a, s)


@_pd_loss_triton.register_fake
def _(xs, xt, et, zt, a, s):
    return xs.new_empty((), dtype=torch.float32), xs.new_empty((xs.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastdistill::pd_loss_triton_bwd", mutates_args=())
def _pd_loss_triton_bwd(go: Tensor, xs: Tensor, xt: Tensor, et: Tensor, zt: Tensor, a: Tensor, s: Tensor,
                        sel: Tensor) -> Tensor:
    from fastdistill.kernels import diffusion_steps as k

    return k.pd_loss_bwd(go.contiguous(), xs, xt, et, zt, a, s, sel)


@_pd_loss_triton_bwd.register_fake
def _(go, xs, xt, et, zt, a, s, sel):
    return torch.empty_like(xs)


def _pd_loss_setup(ctx, inputs, output):
    xs, xt, et, zt, a, s = inputs
    ctx.save_for_backward(xs, xt, et, zt, a, s, output[1])


def _pd_loss_backward(ctx, go, _gsel):
    xs, xt, et, zt, a, s, sel = ctx.saved_tensors
    return _pd_loss_triton_bwd(go, xs, xt, et, zt, a, s, sel), None, None, None, None, None


_pd_loss_triton.register_autograd(_pd_loss_backward, setup_context=_pd_loss_setup)


@autocast_op("none")  # elementwise: nothing cast; the body never sees the caller's autocast
def pd_loss(x_student: Tensor, x_target: Tensor, eps_target: Tensor, z_t: Tensor, alpha_t: Tensor | float,
            sigma_t: Tensor | float, *, validate: bool | None = None) -> Tensor:
    """Truncated-SNR loss of progressive distillation: ``mean_b max(MSE_b(x_S, x~), MSE_b(eps_S, eps~))``.

    ``eps_S = (z_t - alpha_t x_S) / sigma_t`` is the student's implied noise; MSE_b averages over the
    non-batch elements of sample b. This is RDD's ``--logits`` term and the PD loss of Salimans & Ho.

    Args:
        x_student: (B, ...) the student's x-prediction at ``z_t`` (receives the gradient).
        x_target, eps_target: (B, ...) the targets of :func:`progressive_distillation_target`.
        z_t: (B, ...) the noisy input.
        alpha_t, sigma_t: per-sample scales at t (numbers, 0-d or (B,) tensors); sigma_t > 0.
        validate: check sigma_t > 0 (ValueError otherwise). ``None`` (default): on for CPU tensors,
            off for CUDA tensors, where it costs a host sync; ``True`` opts in (or
            ``FASTDISTILL_VALUE_CHECKS=1``, see :func:`~fastdistill.ops._common.value_checks_enabled`).

    Returns:
        A 0-d fp32 tensor (fp64 on the reference backend with fp64 inputs). Only ``x_student``
        gets a gradient: targets and ``z_t`` are constants (stop-gradient), as in the official code.
    """
    op = "pd_loss"
    check_batched(op, "x_student", x_student)
    for name, v in (("x_target", x_target), ("eps_target", eps_target), ("z_t", z_t)):
        check_tensor(op, name, v)
    check_same_shape(op, x_student=x_student, x_target=x_target, eps_target=eps_target, z_t=z_t)
    device = check_same_device(op, x_student=x_student, x_target=x_target, eps_target=eps_target, z_t=z_t)
    B = x_student.shape[0]
    a = per_sample(op, "alpha_t", alpha_t, B, device)
    s = per_sample(op, "sigma_t", sigma_t, B, device)
    raise_on_bad_values(op, device, [not_positive("sigma_t", s)], validate)
    backend = dispatch.select_backend(op, x_student, x_target, eps_target, z_t)
    if backend == "triton":
        loss, _ = _pd_loss_triton(as_rows(x_student), as_rows(x_target.detach()), as_rows(eps_target.detach()),
                                  as_rows(z_t.detach()), a.float(), s.float())
        return loss
    return pd_loss_reference(x_student, x_target, eps_target, z_t, a, s)

"""BOOT's bootstrapping loss (Gu et al., "BOOT: Data-free Distillation of Denoising Diffusion Models
with Bootstrapping"), fused: CFG combine, teacher output to x space (fp32), the signal-space DDIM
target and the weighted, delta-normalised MSE in one pass, with a fused backward.

The student g(eps, t) predicts the signal y_t = (x_t - sigma_t eps)/alpha_t. The teacher's DDIM step
t -> s written in signal space is exactly ``y_s = y_t + delta (f - y_t)`` with
``delta = 1 - (sigma_s alpha_t)/(alpha_s sigma_t)`` and f the teacher's x-prediction at x_t, so::

    loss = mean_b  w_b / delta_b^2 * mean_d (y_s - sg(y_t + delta_b (f - y_t)))^2
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import dispatch
from .._validation import check_choice, check_same_device, check_same_shape, check_tensor
from ._common import (PRED_CODE, PREDICTION_TYPES, as_rows, autocast_op, check_batched, compute_dtype, not_positive,
                      per_sample, raise_on_bad_values)

dispatch.register_op("boot_loss", ["triton"])


def boot_delta(alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor) -> Tensor:
    """``delta = 1 - (sigma_s alpha_t)/(alpha_s sigma_t) = 1 - exp(lambda_s - lambda_t)``."""
    return 1 - (sigma_s * alpha_t) / (alpha_s * sigma_t)


def teacher_to_x(f: Tensor, x_t: Tensor | None, alpha_t: Tensor, sigma_t: Tensor, prediction_type: str) -> Tensor:
    """The teacher output as an x-prediction (``alpha_t``, ``sigma_t`` broadcastable against ``f``)."""
    if prediction_type == "epsilon":
        return (x_t - sigma_t * f) / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t * x_t - sigma_t * f
    return f


def boot_loss_reference(y_s: Tensor, y_t: Tensor, teacher_output: Tensor, x_t: Tensor | None, alpha_t: Tensor,
                        sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor, weight: Tensor, prediction_type: str,
                        teacher_output_uncond: Tensor | None, guidance_scale: Tensor | None) -> Tensor:
    """Plain-PyTorch BOOT loss with (B,) coefficient tensors; the ground truth."""
    dts = [y_s.dtype, y_t.dtype, teacher_output.dtype, alpha_t.dtype]
    cdt = compute_dtype(*dts)
    B = y_s.shape[0]
    ys = y_s.to(cdt).reshape(B, -1)
    yt = y_t.detach().to(cdt).reshape(B, -1)
    f = teacher_output.detach().to(cdt).reshape(B, -1)
    if teacher_output_uncond is not None:
        fu = teacher_output_uncond.detach().to(cdt).reshape(B, -1)
        f = fu + guidance_scale.to(cdt)[:, None] * (f - fu)
    xt = x_t.detach().to(cdt).reshape(B, -1) if x_t is not None else None
    a_t, s_t, a_s, s_s = (v.to(cdt)[:, None] for v in (alpha_t, sigma_t, alpha_s, sigma_s))
    fx = teacher_to_x(f, xt, a_t, s_t, prediction_type)
    delta = boot_delta(a_t, s_t, a_s, s_s)
    target = yt + delta * (fx - yt)
    per = (ys - target).pow(2).mean(1) * weight.to(cdt) / delta[:, 0].pow(2)
    return per.mean()


@torch.library.custom_op("fastdistill::boot_loss_triton", mutates_args=())
def _boot_loss_triton(ys: Tensor, yt: Tensor, f: Tensor, fu: Tensor | None, xt: Tensor | None, gs: Tensor,
                      at: Tensor, st: Tensor, as_: Tensor, ss: Tensor, w: Tensor, pred: int,
                      need_grad: bool) -> tuple[Tensor, Tensor]:
    from fastdistill.kernels import boot as k

    return k.boot_loss_fwd(ys, yt, f, fu, xt, gs, at, st, as_, ss, w, pred, need_grad)


@_boot_loss_triton.register_fake
def _(ys, yt, f, fu, xt, gs, at, st, as_, ss, w, pred, need_grad):
    return ys.new_empty((), dtype=torch.float32), ys.new_empty(ys.shape if need_grad else (0,))


@torch.library.custom_op("fastdistill::boot_loss_triton_bwd", mutates_args=())
def _boot_loss_triton_bwd(go: Tensor, grad: Tensor) -> Tensor:
    from fastdistill.kernels import boot as k

    return k.scale_grad(go.contiguous(), grad)


@_boot_loss_triton_bwd.register_fake
def _(go, grad):
    return torch.empty_like(grad)


def _boot_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _boot_backward(ctx, go, _ggrad):
    (grad,) = ctx.saved_tensors
    return (_boot_loss_triton_bwd(go, grad),) + (None,) * 12


_boot_loss_triton.register_autograd(_boot_backward, setup_context=_boot_setup)


@autocast_op("none")  # elementwise: nothing cast; the body never sees the caller's autocast
def boot_loss(y_s: Tensor, y_t: Tensor, teacher_output: Tensor, *, x_t: Tensor | None = None,
              alpha_t: Tensor | float, sigma_t: Tensor | float, alpha_s: Tensor | float, sigma_s: Tensor | float,
              weight: Tensor | float | None = None, prediction_type: str = "epsilon",
              teacher_output_uncond: Tensor | None = None, guidance_scale: Tensor | float | None = None,
              validate: bool | None = None) -> Tensor:
    """BOOT bootstrapping loss ``mean_b w_b/delta_b^2 * mean_d (y_s - sg(y_t + delta_b (f - y_t)))^2``.

    Args:
        y_s: (B, ...) the student's signal prediction g(eps, s) at the earlier time s (gets the gradient).
        y_t: (B, ...) the student's prediction g(eps, t) at time t (a constant: stop-gradient).
        teacher_output: (B, ...) the raw teacher output at ``x_t`` (conditional output under CFG).
        x_t: (B, ...) the teacher's input ``alpha_t y_t + sigma_t eps``; needed for ``epsilon`` and
            ``v_prediction`` teachers, ignored for ``sample``.
        alpha_t, sigma_t, alpha_s, sigma_s: per-sample scales at t and s (numbers, 0-d or (B,)
            tensors), with ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``; s != t.
        weight: per-sample w_t (number, 0-d or (B,) tensor); default 1.
        prediction_type: what the teacher predicts: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``;
            it is converted to an x-prediction in fp32 (``(x_t - sigma_t eps)/alpha_t`` or
            ``alpha_t x_t - sigma_t v``).
        teacher_output_uncond: (B, ...) the unconditional teacher output for classifier-free
            guidance; then ``f = f_u + guidance_scale (f_c - f_u)``.
        guidance_scale: CFG scale (number, 0-d or (B,) tensor); required with ``teacher_output_uncond``.
        validate: check alpha_t, sigma_t, alpha_s > 0 and s != t (ValueError otherwise). ``None``
            (default): on for CPU tensors, off for CUDA tensors, where it costs a host sync; ``True``
            opts in (or ``FASTDISTILL_VALUE_CHECKS=1``, see
            :func:`fastdistill.ops._common.value_checks_enabled`).

    Returns:
        A 0-d fp32 tensor (fp64 on the reference backend with fp64 inputs). Only ``y_s`` receives a
        gradient, ``2 w_b (y_s - target) / (delta_b^2 B D)``.
    """
    op = "boot_loss"
    check_batched(op, "y_s", y_s)
    check_tensor(op, "y_t", y_t)
    check_tensor(op, "teacher_output", teacher_output)
    check_choice(op, "prediction_type", prediction_type, PREDICTION_TYPES)
    if x_t is None and prediction_type != "sample":
        raise ValueError(f"{op}: x_t is required to convert a {prediction_type!r} teacher output to x space")
    if x_t is not None:
        check_tensor(op, "x_t", x_t)
    if teacher_output_uncond is not None:
        check_tensor(op, "teacher_output_uncond", teacher_output_uncond)
        if guidance_scale is None:
            raise ValueError(f"{op}: guidance_scale is required when teacher_output_uncond is given")
    elif guidance_scale is not None:
        raise ValueError(f"{op}: guidance_scale was given without teacher_output_uncond")
    tensors = dict(y_s=y_s, y_t=y_t, teacher_output=teacher_output, x_t=x_t,
                   teacher_output_uncond=teacher_output_uncond)
    check_same_shape(op, **tensors)
    device = check_same_device(op, **tensors)
    B = y_s.shape[0]
    at, st, as_, ss = (per_sample(op, n, v, B, device) for n, v in
                       (("alpha_t", alpha_t), ("sigma_t", sigma_t), ("alpha_s", alpha_s), ("sigma_s", sigma_s)))
    w = per_sample(op, "weight", 1.0 if weight is None else weight, B, device)
    gs = per_sample(op, "guidance_scale", 1.0 if guidance_scale is None else guidance_scale, B, device)
    raise_on_bad_values(op, device, [
        not_positive("alpha_t", at), not_positive("sigma_t", st), not_positive("alpha_s", as_),
        (lambda: (boot_delta(at.double(), st.double(), as_.double(), ss.double()).abs() < 1e-6).any(),
         lambda: "delta = 1 - (sigma_s alpha_t)/(alpha_s sigma_t) is 0 for some sample (s == t): the loss divides "
                 "by delta^2; use two different times"),
    ], validate)
    backend = dispatch.select_backend(op, y_s, y_t, teacher_output, x_t, teacher_output_uncond)
    if backend == "triton":
        rows = lambda t: as_rows(t.detach()) if t is not None else None  # noqa: E731
        need_grad = y_s.requires_grad and torch.is_grad_enabled()
        loss, _ = _boot_loss_triton(as_rows(y_s), rows(y_t), rows(teacher_output), rows(teacher_output_uncond),
                                    rows(x_t) if prediction_type != "sample" else None, gs.float(), at.float(),
                                    st.float(), as_.float(), ss.float(), w.float(), PRED_CODE[prediction_type],
                                    need_grad)
        return loss
    return boot_loss_reference(y_s, y_t, teacher_output, x_t if prediction_type != "sample" else None, at, st, as_,
                               ss, w, prediction_type, teacher_output_uncond,
                               gs if teacher_output_uncond is not None else None)


__all__ = ["boot_loss", "boot_delta", "teacher_to_x", "boot_loss_reference"]

"""Adv-KD (adversarial distillation with a conditional discriminator) losses, fused.

* :func:`gradient_penalty`: WGAN-GP penalty ``weight * mean_b (||d D(x_hat, *c)/d x_hat||_2 - 1)^2`` on
  ``x_hat = alpha real + (1 - alpha) fake`` with per-sample ``alpha ~ U(0, 1)`` drawn inside the
  interpolation kernel. The norm/penalty has a fused first-order backward; the double backward
  through the discriminator stays with autograd (``create_graph=True``).
* :func:`compute_gradient_penalty`: drop-in for Adv-KD's ``compute_gradient_penalty(D, noise,
  real_samples, fake_samples, device)`` (unweighted; the caller multiplies by lambda_gp = 10).
* :func:`adversarial_losses`: the softplus (logistic) discriminator and generator losses.

Building blocks with their own reference: :func:`gan_interpolate` and :func:`gradient_norm_penalty`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from .. import dispatch
from .._validation import check_positive, check_same_device, check_tensor
from ._common import (as_rows, autocast_op, bcast, check_batched, check_batched_pair, compute_dtype, draw_seed,
                      host_to_device)

dispatch.register_op("gradient_penalty", ["triton"])
dispatch.register_op("adversarial_losses", ["triton"])


# ----------------------------------------------------------------------------------------------
# Interpolation with per-sample random mixing
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdistill::gan_interpolate_triton", mutates_args=())
def _interp_triton(real: Tensor, fake: Tensor, alpha: Tensor | None, seed: int) -> tuple[Tensor, Tensor]:
    from fastdistill.kernels import adversarial as k

    return k.interp_fwd(real, fake, alpha, seed, torch.promote_types(real.dtype, fake.dtype))


@_interp_triton.register_fake
def _(real, fake, alpha, seed):
    return (real.new_empty(real.shape, dtype=torch.promote_types(real.dtype, fake.dtype)),
            real.new_empty((real.shape[0],), dtype=torch.float32))


@torch.library.custom_op("fastdistill::gan_interpolate_triton_bwd", mutates_args=())
def _interp_triton_bwd(g: Tensor, alpha: Tensor, r_like: Tensor, f_like: Tensor) -> tuple[Tensor, Tensor]:
    from fastdistill.kernels import adversarial as k

    return k.interp_bwd(g.contiguous(), alpha, r_like.dtype, f_like.dtype)


@_interp_triton_bwd.register_fake
def _(g, alpha, r_like, f_like):
    return torch.empty_like(g, dtype=r_like.dtype), torch.empty_like(g, dtype=f_like.dtype)


def _interp_setup(ctx, inputs, output):
    real, fake, _, _ = inputs
    ctx.save_for_backward(output[1])
    ctx.r_meta = real.new_empty(())
    ctx.f_meta = fake.new_empty(())


def _interp_backward(ctx, g, _galpha):
    (alpha,) = ctx.saved_tensors
    gr, gf = _interp_triton_bwd(g, alpha, ctx.r_meta, ctx.f_meta)
    return gr, gf, None, None


_interp_triton.register_autograd(_interp_backward, setup_context=_interp_setup)


def _draw_seed(generator: torch.Generator | None) -> int:
    # Drawn from torch's RNG (the CPU one unless a generator is given), so torch.manual_seed makes
    # the in-kernel mixing weights reproducible; a CUDA generator's seed comes from its host-side
    # state (draw_seed): no device sync.
    return draw_seed(generator, 2**31 - 1)


@autocast_op("none")  # elementwise: nothing cast; the body never sees the caller's autocast
def gan_interpolate(real: Tensor, fake: Tensor, alpha: Tensor | None = None, *,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``x_hat[b] = alpha_b real[b] + (1 - alpha_b) fake[b]``; returns ``(x_hat, alpha)``.

    ``alpha``: (B,) mixing weights; None draws them from U(0, 1) (inside the kernel on the triton
    backend, seeded from torch's RNG or ``generator``). Differentiable w.r.t. ``real`` and ``fake``.
    No host sync: the kernel seed comes from the CPU RNG or, for a CUDA ``generator``, from its
    host-side state (:func:`fastdistill.ops._common.draw_seed`; same state, same weights).
    """
    op = "gradient_penalty"
    device = check_batched_pair(op, ("real", real), ("fake", fake))
    B = real.shape[0]
    if alpha is not None:
        check_tensor(op, "alpha", alpha)
        if tuple(alpha.shape) != (B,) and alpha.numel() != B:
            raise ValueError(f"{op}: alpha must hold one weight per sample ({B}), got shape {tuple(alpha.shape)}")
        if alpha.device != device:
            raise ValueError(f"{op}: alpha is on {alpha.device} but real/fake are on {device}")
        alpha = alpha.reshape(B)
    backend = dispatch.select_backend(op, real, fake)
    if backend == "triton":
        x, a = _interp_triton(as_rows(real), as_rows(fake),
                              alpha.detach().float().contiguous() if alpha is not None else None,
                              _draw_seed(generator) if alpha is None else 0)
        return x.reshape(real.shape), a.detach()  # the weights are sampled constants, not differentiable
    if alpha is None:
        dev = generator.device if generator is not None else device
        alpha = host_to_device(torch.rand(B, generator=generator, device=dev), device)
    out_dtype = torch.promote_types(real.dtype, fake.dtype)
    cdt = compute_dtype(out_dtype, alpha.dtype)
    a = bcast(alpha.detach().to(cdt), real)
    x = a * real.to(cdt) + (1 - a) * fake.to(cdt)
    return x.to(out_dtype), alpha.detach().to(torch.promote_types(alpha.dtype, torch.float32))


# ----------------------------------------------------------------------------------------------
# Gradient-norm penalty
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdistill::gradient_norm_penalty_triton", mutates_args=())
def _gp_triton(g: Tensor, weight: float) -> tuple[Tensor, Tensor]:
    from fastdistill.kernels import adversarial as k

    return k.gp_fwd(g, weight)


@_gp_triton.register_fake
def _(g, weight):
    return g.new_empty((), dtype=torch.float32), g.new_empty((g.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastdistill::gradient_norm_penalty_triton_bwd", mutates_args=())
def _gp_triton_bwd(go: Tensor, g: Tensor, norms: Tensor, weight: float) -> Tensor:
    from fastdistill.kernels import adversarial as k

    return k.gp_bwd(go.contiguous(), g, norms, weight)


@_gp_triton_bwd.register_fake
def _(go, g, norms, weight):
    return torch.empty_like(g)


def _gp_setup(ctx, inputs, output):
    g, weight = inputs
    ctx.save_for_backward(g, output[1])
    ctx.weight = weight


def _gp_backward(ctx, go, _gnorms):
    g, norms = ctx.saved_tensors
    return _gp_triton_bwd(go, g, norms, ctx.weight), None


_gp_triton.register_autograd(_gp_backward, setup_context=_gp_setup)


@autocast_op("none")  # elementwise: nothing cast; the body never sees the caller's autocast
def gradient_norm_penalty(grads: Tensor, weight: float = 1.0) -> Tensor:
    """``weight * mean_b (||grads_b||_2 - 1)^2`` over the flattened per-sample gradients (B, ...).

    Returns a 0-d fp32 tensor (fp64 on the reference backend for fp64 input); differentiable
    w.r.t. ``grads`` (first order), with a zero subgradient where a norm is 0.
    """
    op = "gradient_penalty"
    check_batched(op, "grads", grads)
    weight = check_positive(op, "weight", weight, allow_zero=True)
    backend = dispatch.select_backend(op, grads)
    if backend == "triton":
        loss, _ = _gp_triton(as_rows(grads), weight)
        return loss
    g = grads.to(compute_dtype(grads.dtype)).reshape(grads.shape[0], -1)
    return weight * ((torch.linalg.vector_norm(g, dim=1) - 1) ** 2).mean()


def gradient_penalty(discriminator: Callable[..., Tensor], real: Tensor, fake: Tensor, *conditions: Any,
                     weight: float = 10.0, alpha: Tensor | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
    """WGAN-GP penalty ``weight * mean_b (||d D(x_hat, *conditions)/d x_hat||_2 - 1)^2``.

    ``x_hat = alpha real + (1 - alpha) fake`` with per-sample ``alpha ~ U(0, 1)``; the gradient is
    taken w.r.t. the image ``x_hat`` only (not the conditions), summed over D's outputs (grad_outputs
    of ones), with ``create_graph=True`` so that backward reaches D's parameters (double backward).

    Args:
        discriminator: called as ``discriminator(x_hat, *conditions)``.
        real, fake: (B, ...) real and generated samples (same shape). Gradients flow into them only if
            they require grad (Adv-KD passes detached samples).
        *conditions: extra discriminator inputs (Adv-KD: the 4x4 noise thumbnail).
        weight: lambda_gp (default 10, Adv-KD's value).
        alpha: optional (B,) mixing weights, instead of random ones (reproducibility, tests).
        generator: torch.Generator for the random weights (default: torch's global RNG).

    Returns:
        A 0-d fp32 tensor.

    ``torch.compile``: the discriminator call and ``torch.autograd.grad`` run eagerly behind a
    ``torch.compiler.disable`` boundary (``autograd.grad`` cannot be traced into a graph), so a compiled
    training step calls this function with ``fullgraph=False`` (the default): the interpolation, the norm
    penalty and the rest of the step are compiled, with a graph break around D. ``fullgraph=True`` raises.
    """
    op = "gradient_penalty"
    if not callable(discriminator):
        raise TypeError(f"{op}: discriminator must be callable, got {type(discriminator).__name__}")
    weight = check_positive(op, "weight", weight, allow_zero=True)
    with torch.enable_grad():
        x_hat, _ = gan_interpolate(real, fake, alpha, generator=generator)
        grads = _eager_discriminator_input_grad()(discriminator, x_hat, conditions)
        return gradient_norm_penalty(grads, weight)


_EAGER_INPUT_GRAD: list[Callable[..., Tensor]] = []


def _eager_discriminator_input_grad() -> Callable[..., Tensor]:
    """:func:`_discriminator_input_grad` under ``torch.compiler.disable``, wrapped on first use: the
    decorator imports ``torch._dynamo`` (and with it triton), which must not happen when fastdistill is
    imported (``TRITON_INTERPRET`` may still be set after that, e.g. by ``fastdistill selftest``)."""
    if not _EAGER_INPUT_GRAD:
        _EAGER_INPUT_GRAD.append(torch.compiler.disable(_discriminator_input_grad))
    return _EAGER_INPUT_GRAD[0]


def _discriminator_input_grad(discriminator: Callable[..., Tensor], x_hat: Tensor, conditions: tuple) -> Tensor:
    """``d sum(D(x_hat, *conditions)) / d x_hat`` with ``create_graph=True``: the ``torch.compile`` boundary.

    ``torch.autograd.grad`` cannot be traced into a graph (dynamo breaks the graph there, and D's output
    computed in one compiled graph is not connected to an ``x_hat`` returned by it), so this step always
    runs eagerly: a compiled step (``fullgraph=False``) compiles the interpolation and the norm penalty and
    calls D and the gradient here, between two graphs. ``fullgraph=True`` cannot include it.
    """
    with torch.enable_grad():
        if not x_hat.requires_grad:
            x_hat.requires_grad_(True)
        d_out = discriminator(x_hat, *conditions)
        if not isinstance(d_out, Tensor):
            raise TypeError(f"gradient_penalty: discriminator must return a tensor, got {type(d_out).__name__}")
        (grads,) = torch.autograd.grad(d_out, x_hat, grad_outputs=torch.ones_like(d_out), create_graph=True,
                                       retain_graph=True)
    return grads


def compute_gradient_penalty(D: Callable[..., Tensor], noise: Tensor, real_samples: Tensor, fake_samples: Tensor,
                             device: torch.device | str | None = None) -> Tensor:
    """Drop-in for Adv-KD's ``compute_gradient_penalty(D, noise, real_samples, fake_samples, device)``.

    Returns the unweighted penalty ``mean_b (||grad D(x_hat, noise)||_2 - 1)^2`` (the official loop
    multiplies by ``lambda_gp = 10``). ``device`` is accepted for signature compatibility; the
    computation runs on the samples' device (a different device is an error).
    """
    if device is not None and torch.device(device).type != real_samples.device.type:
        raise ValueError(f"compute_gradient_penalty: device={device} but real_samples are on {real_samples.device}")
    return gradient_penalty(D, real_samples, fake_samples, noise, weight=1.0)


# ----------------------------------------------------------------------------------------------
# Softplus (logistic) GAN losses
# ----------------------------------------------------------------------------------------------


class AdversarialLosses(NamedTuple):
    """``discriminator``: mean softplus(-real) + mean softplus(fake); ``generator``: mean softplus(-fake)."""

    discriminator: Tensor
    generator: Tensor


@torch.library.custom_op("fastdistill::adversarial_losses_triton", mutates_args=())
def _adv_triton(real: Tensor | None, fake: Tensor) -> Tensor:
    from fastdistill.kernels import adversarial as k

    return k.adv_fwd(real, fake)


@_adv_triton.register_fake
def _(real, fake):
    return fake.new_empty((2,), dtype=torch.float32)


@torch.library.custom_op("fastdistill::adversarial_losses_triton_bwd", mutates_args=())
def _adv_triton_bwd(gout: Tensor, real: Tensor | None, fake: Tensor) -> tuple[Tensor, Tensor]:
    from fastdistill.kernels import adversarial as k

    gr, gf = k.adv_bwd(gout.contiguous(), real, fake)
    # Custom ops cannot return None: an empty tensor stands for "no real logits".
    return (gr if gr is not None else fake.new_empty((0,))), gf


@_adv_triton_bwd.register_fake
def _(gout, real, fake):
    return (torch.empty_like(real) if real is not None else fake.new_empty((0,))), torch.empty_like(fake)


def _adv_setup(ctx, inputs, output):
    real, fake = inputs
    ctx.save_for_backward(real, fake)


def _adv_backward(ctx, gout):
    real, fake = ctx.saved_tensors
    gr, gf = _adv_triton_bwd(gout, real, fake)
    return (gr if real is not None else None), gf


_adv_triton.register_autograd(_adv_backward, setup_context=_adv_setup)


@autocast_op("none")  # elementwise: nothing cast; the body never sees the caller's autocast
def adversarial_losses(real_logits: Tensor | None, fake_logits: Tensor) -> AdversarialLosses:
    """Softplus (logistic, non-saturating) GAN losses of Adv-KD, in one launch.

    ``discriminator = mean softplus(-real_logits) + mean softplus(fake_logits)`` and
    ``generator = mean softplus(-fake_logits)`` (means over all elements; logits of any shape, e.g.
    (B, 1)). ``real_logits=None`` leaves the real term out of the discriminator loss (generator step).

    Returns:
        ``AdversarialLosses(discriminator, generator)``: 0-d fp32 tensors (fp64 on the reference
        backend for fp64 logits), differentiable w.r.t. both logits.
    """
    op = "adversarial_losses"
    check_tensor(op, "fake_logits", fake_logits)
    if fake_logits.numel() == 0:
        raise ValueError(f"{op}: fake_logits is empty")
    if real_logits is not None:
        check_tensor(op, "real_logits", real_logits)
        if real_logits.numel() == 0:
            raise ValueError(f"{op}: real_logits is empty")
    check_same_device(op, real_logits=real_logits, fake_logits=fake_logits)
    backend = dispatch.select_backend(op, real_logits, fake_logits)
    if backend == "triton":
        out = _adv_triton(real_logits.reshape(-1).contiguous() if real_logits is not None else None,
                          fake_logits.reshape(-1).contiguous())
        return AdversarialLosses(out[0], out[1])
    sp = torch.nn.functional.softplus
    dts = [fake_logits.dtype] + ([real_logits.dtype] if real_logits is not None else [])
    cdt = compute_dtype(*dts)
    f = fake_logits.to(cdt)
    d = sp(f).mean()
    if real_logits is not None:
        d = sp(-real_logits.to(cdt)).mean() + d
    return AdversarialLosses(d, sp(-f).mean())

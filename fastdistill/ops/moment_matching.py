"""Moment Matching (Salimans et al. 2024, arXiv 2406.04103) per-sample ops.

* :func:`posterior_sample`: z_s ~ q(z_s | z_t, x = x_pred) (ancestral) or the DDIM update, with the
  noise drawn inside the kernel from a Philox seed (no noise tensor is materialised);
* :func:`moment_matching_loss`: the alternating variant's student surrogate
  ``mean(w_b * x_student * sg(x_aux - x_teacher))`` with the CFG combine fused;
* :func:`auxiliary_denoiser_loss`: ``mean(w (x_student - x_aux)^2) + gamma mean(w (x_teacher - x_aux)^2)``;
* :func:`moment_statistics`: mean and variance over any dims in one read (Chan-merged, stable), with
  backward and optional cross-rank merging.

Backends: ``triton`` (kernels/moment_matching.py) and the plain-PyTorch ``reference`` beside each op.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .. import dispatch
from .._validation import check_choice, check_per_sample, check_same_device, check_tensor
from ._common import autocast_op, draw_seed

__all__ = [
    "posterior_sample",
    "moment_matching_loss",
    "auxiliary_denoiser_loss",
    "moment_statistics",
    "MomentStatistics",
    "philox_randn",
    "posterior_coefficients",
    "posterior_sample_reference",
    "moment_matching_loss_reference",
    "auxiliary_denoiser_loss_reference",
    "moment_statistics_reference",
]

dispatch.register_op("posterior_sample", ["triton"], fp64=["triton"])
dispatch.register_op("moment_matching_loss", ["triton"], fp64=["triton"])
dispatch.register_op("auxiliary_denoiser_loss", ["triton"], fp64=["triton"])
dispatch.register_op("moment_statistics", ["triton"], fp64=["triton"])

_MODES = {"ancestral": 0, "ddim": 1}
_SEED_LIMIT = 2**31 - 1  # seeds are passed to Triton as int32 scalars


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _rows(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


# ============================================================================ Philox noise

_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo32(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of a * m for uint32 values held in int64 (split in 16-bit halves: no overflow)."""
    t1 = (a & 0xFFFF) * m
    t2 = (a >> 16) * m
    hi = (t2 + (t1 >> 16)) >> 16
    lo = (((t2 & 0xFFFF) << 16) + t1) & _MASK32
    return hi, lo


def philox_randn(seed: int, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """Standard normal fp32 noise ``n[i] = triton.language.randn(seed, i)`` for ``i < numel``, in plain PyTorch.

    The noise of :func:`posterior_sample` is defined by this function: element ``i`` of the flattened
    (contiguous) z_s draws ``randn(seed, i)``, Triton's Philox4x32-10 (counter ``(i_lo, i_hi, 0, 0)``,
    key ``(seed, 0)``) followed by its uint->uniform map and the Box-Muller cosine branch. Integer bits
    match Triton exactly; the fp32 ``log``/``cos`` may differ from the GPU's by a few ulps.

    It runs as the opaque custom op ``torch.ops.fastdistill.philox_randn`` (with a fake kernel), so
    ``torch.compile`` (inductor) calls it as one extern kernel instead of lowering the ten unrolled
    Philox rounds (which took inductor over 500 s); the values are the same compiled or not.
    """
    return _philox_randn_op(seed, numel, torch.device(device))


@torch.library.custom_op("fastdistill::philox_randn", mutates_args=())
def _philox_randn_op(seed: int, numel: int, device: torch.device) -> Tensor:
    """The body of :func:`philox_randn` (plain PyTorch, int64 arithmetic on uint32 values)."""
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    c0 = idx & _MASK32
    c1 = (idx >> 32) & _MASK32
    c2 = torch.zeros_like(idx)
    c3 = torch.zeros_like(idx)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo32(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32

    def uniform(u32: Tensor) -> Tensor:
        x = torch.where(u32 >= 2**31, u32 - 2**32, u32)  # bitcast to int32
        x = torch.where(x < 0, -x - 1, x)
        return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)

    u1 = torch.clamp_min(uniform(c0), 1.0e-7)
    u2 = uniform(c1)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(torch.tensor(6.283185307179586, dtype=torch.float32) * u2)


@_philox_randn_op.register_fake
def _(seed, numel, device):
    return torch.empty((numel,), dtype=torch.float32, device=device)


def _draw_seed(op: str, seed: int | None, generator: torch.Generator | None) -> int:
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{op}: seed must be an int, got {type(seed).__name__}")
        if not 0 <= seed < _SEED_LIMIT:
            raise ValueError(f"{op}: seed must be in [0, 2**31 - 1), got {seed}")
        if generator is not None:
            raise ValueError(f"{op}: pass either seed or generator, not both")
        return seed
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator, got {type(generator).__name__}")
    # Host-side: a CPU draw, or the state of a CUDA generator (no device read, no sync).
    return draw_seed(generator, _SEED_LIMIT)


# ============================================================================ posterior_sample

def posterior_coefficients(alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor,
                           mode: str = "ancestral") -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample ``(c_z, c_x, std)`` with ``z_s = c_z z_t + c_x x + std * noise``.

    ancestral (q(z_s | z_t, x) of the forward process z = alpha x + sigma eps), with
    ``alpha_{t|s} = alpha_t / alpha_s`` and ``sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2``::

        c_z = alpha_{t|s} sigma_s^2 / sigma_t^2,  c_x = alpha_s sigma_{t|s}^2 / sigma_t^2,
        std = sigma_s sigma_{t|s} / sigma_t

    ddim: ``c_z = sigma_s / sigma_t``, ``c_x = alpha_s - alpha_t sigma_s / sigma_t``, ``std = 0``.
    """
    if mode == "ancestral":
        a_ts = alpha_t / alpha_s
        var_t = sigma_t * sigma_t
        var_s = sigma_s * sigma_s
        var_ts = torch.clamp_min(var_t - a_ts * a_ts * var_s, 0.0)
        return a_ts * var_s / var_t, alpha_s * var_ts / var_t, torch.sqrt(var_s * var_ts / var_t)
    c_z = sigma_s / sigma_t
    return c_z, alpha_s - alpha_t * c_z, torch.zeros_like(c_z)


def posterior_sample_reference(z_t: Tensor, x_pred: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor,
                               sigma_s: Tensor, mode: str = "ancestral", seed: int = 0) -> Tensor:
    """Plain PyTorch, (B,) coefficient tensors; noise from :func:`philox_randn` (same seed, same noise)."""
    cdt = _compute_dtype(z_t, x_pred, alpha_t)
    out_dtype = torch.promote_types(z_t.dtype, x_pred.dtype)
    c_z, c_x, std = (c.to(cdt)[:, None] for c in posterior_coefficients(
        alpha_t.to(cdt), sigma_t.to(cdt), alpha_s.to(cdt), sigma_s.to(cdt), mode))
    out = c_z * _rows(z_t).to(cdt) + c_x * _rows(x_pred).to(cdt)
    if mode == "ancestral":
        noise = philox_randn(seed, z_t.numel(), z_t.device).to(cdt).reshape(out.shape)
        out = out + std * noise
    return out.to(out_dtype).reshape(z_t.shape)


@torch.library.custom_op("fastdistill::posterior_sample_triton", mutates_args=())
def _posterior_triton(z: Tensor, x: Tensor, at: Tensor, st: Tensor, as_: Tensor, ss: Tensor, seed: int,
                      mode: int) -> Tensor:
    from fastdistill.kernels import moment_matching as k

    return k.posterior_fwd(z, x, at, st, as_, ss, seed, mode, torch.promote_types(z.dtype, x.dtype))


@_posterior_triton.register_fake
def _(z, x, at, st, as_, ss, seed, mode):
    return torch.empty(z.shape, dtype=torch.promote_types(z.dtype, x.dtype), device=z.device)


@torch.library.custom_op("fastdistill::posterior_sample_triton_bwd", mutates_args=())
def _posterior_triton_bwd(g: Tensor, at: Tensor, st: Tensor, as_: Tensor, ss: Tensor, mode: int,
                          x_dtype: torch.dtype, z_dtype: torch.dtype, need_x: bool,
                          need_z: bool) -> tuple[Tensor, Tensor]:
    from fastdistill.kernels import moment_matching as k

    gx, gz = k.posterior_bwd(g.contiguous(), at, st, as_, ss, mode, x_dtype if need_x else None,
                             z_dtype if need_z else None)
    return (gx if gx is not None else g.new_empty((0,), dtype=x_dtype),
            gz if gz is not None else g.new_empty((0,), dtype=z_dtype))


@_posterior_triton_bwd.register_fake
def _(g, at, st, as_, ss, mode, x_dtype, z_dtype, need_x, need_z):
    return (torch.empty(g.shape if need_x else (0,), dtype=x_dtype, device=g.device),
            torch.empty(g.shape if need_z else (0,), dtype=z_dtype, device=g.device))


def _posterior_setup(ctx, inputs, output):
    z, x, at, st, as_, ss, seed, mode = inputs
    ctx.save_for_backward(at, st, as_, ss)
    ctx.mode = mode
    ctx.x_dtype, ctx.z_dtype = x.dtype, z.dtype


def _posterior_backward(ctx, g):
    at, st, as_, ss = ctx.saved_tensors
    need_z, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx, gz = _posterior_triton_bwd(g, at, st, as_, ss, ctx.mode, ctx.x_dtype, ctx.z_dtype, need_x, need_z)
    return (gz if need_z else None, gx if need_x else None, None, None, None, None, None, None)


_posterior_triton.register_autograd(_posterior_backward, setup_context=_posterior_setup)


def _check_pair_inputs(op: str, **tensors: Tensor) -> tuple[int, torch.device]:
    names = list(tensors)
    first = tensors[names[0]]
    for name, t in tensors.items():
        check_tensor(op, name, t)
        if t.dim() < 1:
            raise ValueError(f"{op}: {name} must have a batch dimension, got a 0-d tensor")
        if t.shape != first.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but {names[0]} has shape {tuple(first.shape)}")
    device = check_same_device(op, **tensors)
    return first.shape[0], device


@autocast_op("none")  # elementwise: nothing cast; the body never sees the caller's autocast
def posterior_sample(z_t: Tensor, x_pred: Tensor, alpha_t: Tensor | float, sigma_t: Tensor | float,
                     alpha_s: Tensor | float, sigma_s: Tensor | float, *, mode: str = "ancestral",
                     generator: torch.Generator | None = None, seed: int | None = None) -> Tensor:
    """One step of Moment Matching's stochastic student sampler: ``z_s = c_z z_t + c_x x_pred + std * noise``.

    ``mode="ancestral"`` samples the Gaussian posterior q(z_s | z_t, x = x_pred) of the forward process
    ``z = alpha x + sigma eps`` (coefficients in :func:`posterior_coefficients`); ``mode="ddim"`` is the
    deterministic update ``alpha_s x + sigma_s (z_t - alpha_t x) / sigma_t`` (the form the unofficial
    port trains with).

    Args:
        z_t: (B, ...) noisy input at time t (any floating dtype).
        x_pred: (B, ...) the generator's clean prediction, same shape.
        alpha_t, sigma_t, alpha_s, sigma_s: per-sample scales (numbers, 0-d or (B,) tensors), computed
            in fp32. Need ``sigma_t > 0`` and ``alpha_s > 0``; ``sigma_s = 0`` gives ``z_s = alpha_s x_pred``.
        mode: ``"ancestral"`` or ``"ddim"``.
        generator: the ``torch.Generator`` the noise seed is drawn from (default: torch's global CPU
            one). No host sync either way: a CPU generator draws on the host; a CUDA generator's seed
            is derived from its host-side state (seed, Philox offset), which then advances
            (:func:`fastdistill.ops._common.draw_seed`): the same generator state gives the same noise.
        seed: an explicit Philox seed in ``[0, 2**31 - 1)`` instead of a generator (use it under
            ``torch.compile``: drawing a seed reads a value to the host).

    The noise of element ``i`` of the flattened z_s is ``philox_randn(seed)[i]``: every backend draws the
    same noise for the same seed (to a few fp32 ulps). Returns a tensor of ``promote(z_t, x_pred)`` dtype.
    Differentiable in ``x_pred`` (``c_x``) and ``z_t`` (``c_z``); the coefficients are constants.
    Under ``torch.compile`` (inductor, ``fullgraph=True``) the reference noise is the opaque op
    ``fastdistill::philox_randn`` (compiles in seconds, same values); without ``seed`` under
    ``fullgraph=True``, set ``torch._dynamo.config.capture_scalar_outputs = True`` for the seed draw.
    """
    op = "posterior_sample"
    B, device = _check_pair_inputs(op, z_t=z_t, x_pred=x_pred)
    check_choice(op, "mode", mode, tuple(_MODES))
    coefs = [check_per_sample(op, n, v, B, device=device)
             for n, v in (("alpha_t", alpha_t), ("sigma_t", sigma_t), ("alpha_s", alpha_s), ("sigma_s", sigma_s))]
    s = _draw_seed(op, seed, generator) if mode == "ancestral" else 0
    backend = dispatch.select_backend(op, z_t, x_pred)
    if backend == "reference":
        return posterior_sample_reference(z_t, x_pred, *coefs, mode=mode, seed=s)
    return _posterior_triton(z_t.contiguous(), x_pred.contiguous(), *coefs, s, _MODES[mode])


# ============================================================================ the two losses

def moment_matching_loss_reference(x_student: Tensor, x_aux: Tensor, x_teacher: Tensor, weight: Tensor,
                                   x_teacher_uncond: Tensor | None = None,
                                   guidance_scale: Tensor | None = None) -> Tensor:
    """Plain PyTorch: ``mean(w_b * x_student * sg(x_aux - x_teacher'))`` with (B,) ``weight``/``guidance_scale``."""
    cdt = _compute_dtype(x_student, x_aux, x_teacher, x_teacher_uncond)
    t = _rows(x_teacher.detach()).to(cdt)
    if x_teacher_uncond is not None:
        u = _rows(x_teacher_uncond.detach()).to(cdt)
        t = u + guidance_scale.to(cdt)[:, None] * (t - u)
    diff = _rows(x_aux.detach()).to(cdt) - t
    return (weight.to(cdt)[:, None] * _rows(x_student).to(cdt) * diff).mean()


def auxiliary_denoiser_loss_reference(x_aux: Tensor, x_student: Tensor, x_teacher: Tensor,
                                      teacher_weight: float, weight: Tensor) -> Tensor:
    """Plain PyTorch: ``mean(w (x_student - x_aux)^2) + teacher_weight * mean(w (x_teacher - x_aux)^2)``."""
    cdt = _compute_dtype(x_aux, x_student, x_teacher)
    a = _rows(x_aux).to(cdt)
    w = weight.to(cdt)[:, None]
    return ((w * (_rows(x_student.detach()).to(cdt) - a) ** 2).mean()
            + teacher_weight * (w * (_rows(x_teacher.detach()).to(cdt) - a) ** 2).mean())


@torch.library.custom_op("fastdistill::mm_loss_triton", mutates_args=())
def _mm_loss_triton(p: Tensor, a: Tensor, t: Tensor, u: Tensor | None, w: Tensor, g: Tensor, gamma: float,
                    mode: int, need_grad: bool) -> tuple[Tensor, Tensor]:
    from fastdistill.kernels import moment_matching as k

    return k.mm_loss_fwd(p, a, t, u, w, g, gamma, mode, need_grad)


@_mm_loss_triton.register_fake
def _(p, a, t, u, w, g, gamma, mode, need_grad):
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    return (torch.empty((), dtype=acc, device=p.device),
            torch.empty(p.shape if need_grad else (0,), dtype=p.dtype, device=p.device))


@torch.library.custom_op("fastdistill::mm_loss_triton_bwd", mutates_args=())
def _mm_loss_triton_bwd(src: Tensor, go: Tensor) -> Tensor:
    from fastdistill.kernels import moment_matching as k

    return k.scale(src, go)


@_mm_loss_triton_bwd.register_fake
def _(src, go):
    return torch.empty_like(src)


def _mm_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _mm_loss_backward(ctx, go, _go_grad):
    (grad,) = ctx.saved_tensors
    # The gradient was written by the forward pass; only the upstream scalar is applied here.
    return _mm_loss_triton_bwd(grad, go.reshape(())), None, None, None, None, None, None, None, None


_mm_loss_triton.register_autograd(_mm_loss_backward, setup_context=_mm_loss_setup)


def _per_sample_or_ones(op: str, name: str, value, B: int, device: torch.device) -> Tensor:
    if value is None:
        return torch.ones(B, dtype=torch.float32, device=device)
    return check_per_sample(op, name, value, B, device=device)


def _need_grad(t: Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


@autocast_op("none")  # elementwise: nothing cast; the body never sees the caller's autocast
def moment_matching_loss(x_student: Tensor, x_aux: Tensor, x_teacher: Tensor, *, weight: Tensor | float | None = None,
                         x_teacher_uncond: Tensor | None = None,
                         guidance_scale: Tensor | float | None = None) -> Tensor:
    """The alternating variant's student surrogate ``mean(w_b * x_student * sg(x_aux - x_teacher))``.

    Its gradient ``w_b (x_aux - x_teacher) / N`` (N = all elements) is the estimator of the gradient of
    ``1/2 ||E_g[x | z_s] - x_teacher(z_s)||^2``; the value itself is not meaningful. With classifier-free
    guidance the teacher term is ``x_teacher_uncond + g (x_teacher - x_teacher_uncond)``, fused.

    Args:
        x_student: (B, ...) the generator's x-prediction (receives the gradient).
        x_aux: (B, ...) the auxiliary denoiser's x-prediction at z_s (a constant).
        x_teacher: (B, ...) the teacher's x-prediction at z_s (conditional one under CFG; a constant).
        weight: per-sample w(s) (number, 0-d or (B,) tensor); default 1.
        x_teacher_uncond: (B, ...) the unconditional teacher x-prediction, for CFG.
        guidance_scale: g (number, 0-d or (B,) tensor); required with ``x_teacher_uncond``.

    Returns:
        A 0-d fp32 tensor (fp64 for fp64 inputs). The forward pass writes the gradient too (one pass over
        the inputs); backward only scales it by the upstream gradient.
    """
    op = "moment_matching_loss"
    tensors = dict(x_student=x_student, x_aux=x_aux, x_teacher=x_teacher)
    if x_teacher_uncond is not None:
        tensors["x_teacher_uncond"] = x_teacher_uncond
        if guidance_scale is None:
            raise ValueError(f"{op}: guidance_scale is required when x_teacher_uncond is given")
    elif guidance_scale is not None:
        raise ValueError(f"{op}: guidance_scale was given without x_teacher_uncond")
    B, device = _check_pair_inputs(op, **tensors)
    w = _per_sample_or_ones(op, "weight", weight, B, device)
    g = _per_sample_or_ones(op, "guidance_scale", guidance_scale, B, device)
    backend = dispatch.select_backend(op, x_student, x_aux, x_teacher, x_teacher_uncond)
    if backend == "reference":
        return moment_matching_loss_reference(x_student, x_aux, x_teacher, w, x_teacher_uncond,
                                              g if x_teacher_uncond is not None else None)
    u = x_teacher_uncond.detach().contiguous() if x_teacher_uncond is not None else None
    loss, _ = _mm_loss_triton(x_student.contiguous(), x_aux.detach().contiguous(), x_teacher.detach().contiguous(),
                              u, w, g, 0.0, 0, _need_grad(x_student))
    return loss


@autocast_op("none")  # elementwise: nothing cast; the body never sees the caller's autocast
def auxiliary_denoiser_loss(x_aux: Tensor, x_student: Tensor, x_teacher: Tensor, *, teacher_weight: float = 1.0,
                            weight: Tensor | float | None = None) -> Tensor:
    """The auxiliary denoiser's loss ``mean(w (x_student - x_aux)^2) + teacher_weight * mean(w (x_teacher - x_aux)^2)``.

    Means run over all elements; ``w`` is a per-sample weight. Only ``x_aux`` receives a gradient,
    ``2 w [(x_aux - x_student) + teacher_weight (x_aux - x_teacher)] / N``, written in the forward pass.

    Args:
        x_aux: (B, ...) the auxiliary denoiser's x-prediction at z_s.
        x_student: (B, ...) the generator's sample x (a constant).
        x_teacher: (B, ...) the teacher's x-prediction at z_s (a constant).
        teacher_weight: weight of the teacher-regression term (finite, >= 0; the port uses 1).
        weight: per-sample weights (number, 0-d or (B,) tensor); default 1.

    Returns:
        A 0-d fp32 tensor (fp64 for fp64 inputs).
    """
    op = "auxiliary_denoiser_loss"
    B, device = _check_pair_inputs(op, x_aux=x_aux, x_student=x_student, x_teacher=x_teacher)
    if isinstance(teacher_weight, bool) or not isinstance(teacher_weight, (int, float)):
        raise TypeError(f"{op}: teacher_weight must be a number, got {type(teacher_weight).__name__}")
    teacher_weight = float(teacher_weight)
    if not math.isfinite(teacher_weight) or teacher_weight < 0:
        raise ValueError(f"{op}: teacher_weight must be finite and >= 0, got {teacher_weight}")
    w = _per_sample_or_ones(op, "weight", weight, B, device)
    backend = dispatch.select_backend(op, x_aux, x_student, x_teacher)
    if backend == "reference":
        return auxiliary_denoiser_loss_reference(x_aux, x_student, x_teacher, teacher_weight, w)
    loss, _ = _mm_loss_triton(x_aux.contiguous(), x_student.detach().contiguous(), x_teacher.detach().contiguous(),
                              None, w, w, teacher_weight, 1, _need_grad(x_aux))
    return loss


# ============================================================================ moment_statistics

class MomentStatistics(NamedTuple):
    """Mean and variance over the reduced dims (fp32, fp64 for fp64 input)."""

    mean: Tensor
    var: Tensor


def _normalize_dims(op: str, dims, ndim: int) -> tuple[int, ...]:
    if dims is None:
        if ndim == 0:
            raise ValueError(f"{op}: x must have at least one dim")
        return tuple(range(ndim))
    if isinstance(dims, bool):
        raise TypeError(f"{op}: dims must be an int, a sequence of ints or None, got bool")
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"{op}: dims must be an int, a sequence of ints or None, got {dims!r}")
    out = []
    for d in dims:
        if not -ndim <= d < ndim:
            raise ValueError(f"{op}: dims entry {d} is out of range for a tensor with {ndim} dims")
        d = d % ndim
        if d in out:
            raise ValueError(f"{op}: dims repeats dimension {d}")
        out.append(d)
    if not out:
        raise ValueError(f"{op}: dims must name at least one dim to reduce")
    return tuple(sorted(out))


def moment_statistics_reference(x: Tensor, dims: Sequence[int], weight: Tensor | None = None,
                                correction: int = 0) -> tuple[Tensor, Tensor]:
    """Plain PyTorch, two-pass: ``mean = sum(w x)/W``, ``var = sum(w (x - mean)^2)/(W - correction)``."""
    cdt = _compute_dtype(x, weight)
    xd = x.to(cdt)
    dims = tuple(dims)
    if weight is None:
        n = 1
        for d in dims:
            n *= x.shape[d]
        mean = xd.mean(dim=dims, keepdim=True)
        var = ((xd - mean) ** 2).sum(dim=dims) / (n - correction)
        return mean.squeeze(dims) if dims else mean, var
    w = weight.to(cdt).expand_as(xd)
    W = w.sum(dim=dims, keepdim=True)
    mean = (w * xd).sum(dim=dims, keepdim=True) / W
    var = (w * (xd - mean) ** 2).sum(dim=dims) / (W.squeeze(dims) - correction)
    return mean.squeeze(dims), var


@torch.library.custom_op("fastdistill::moment_statistics_triton", mutates_args=())
def _stats_triton(x3: Tensor, w3: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    from fastdistill.kernels import moment_matching as k

    return k.stats_fwd(x3, w3)


@_stats_triton.register_fake
def _(x3, w3):
    acc = _compute_dtype(x3, w3)
    K = x3.shape[1]
    return tuple(torch.empty((K,), dtype=acc, device=x3.device) for _ in range(3))


@torch.library.custom_op("fastdistill::moment_statistics_triton_bwd", mutates_args=())
def _stats_triton_bwd(x3: Tensor, w3: Tensor | None, coef_mean: Tensor, coef_m2: Tensor, gn: Tensor, mean: Tensor,
                      need_w: bool) -> tuple[Tensor, Tensor]:
    from fastdistill.kernels import moment_matching as k

    gx, gw = k.stats_bwd(x3, w3, coef_mean.contiguous(), coef_m2.contiguous(), gn.contiguous(), mean, need_w)
    return gx, (gw if gw is not None else x3.new_empty((0,)))


@_stats_triton_bwd.register_fake
def _(x3, w3, coef_mean, coef_m2, gn, mean, need_w):
    return (torch.empty(x3.shape, dtype=x3.dtype, device=x3.device),
            torch.empty(x3.shape if need_w else (0,), dtype=w3.dtype if (need_w and w3 is not None) else x3.dtype,
                        device=x3.device))


def _stats_setup(ctx, inputs, output):
    x3, w3 = inputs
    n, mean, _ = output
    ctx.has_w = w3 is not None
    ctx.save_for_backward(x3, w3 if w3 is not None else None, n, mean)


def _stats_backward(ctx, gn, gmean, gm2):
    x3, w3, n, mean = ctx.saved_tensors
    zeros = torch.zeros_like(mean)
    gmean = zeros if gmean is None else gmean
    gm2 = zeros if gm2 is None else gm2
    gn = zeros if gn is None else gn
    need_w = ctx.has_w and ctx.needs_input_grad[1]
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    gx, gw = _stats_triton_bwd(x3, w3, gmean / safe_n, gm2, gn, mean, need_w)
    return (gx if ctx.needs_input_grad[0] else None), (gw if need_w else None)


_stats_triton.register_autograd(_stats_backward, setup_context=_stats_setup)


def _three_d(x: Tensor, weight: Tensor | None, red: tuple[int, ...]):
    """(O, K, I) views of x and of the broadcast weight, with the kept dims as K, and the kept shape."""
    nd = x.dim()
    kept = [d for d in range(nd) if d not in red]
    shape = list(x.shape)
    if weight is not None:
        weight = weight.expand(x.shape)
    if not kept:
        x3 = x.contiguous().reshape(1, 1, -1)
        w3 = weight.reshape(1, 1, -1) if weight is not None else None
        return x3, w3, []
    if kept == list(range(kept[0], kept[-1] + 1)):
        k0, k1 = kept[0], kept[-1] + 1
        O = math.prod(shape[:k0])
        K = math.prod(shape[k0:k1])
        I = math.prod(shape[k1:])
        x3 = x.contiguous().reshape(O, K, I)
        w3 = weight.reshape(O, K, I) if weight is not None else None  # a view when the broadcast allows
        return x3, w3, [shape[d] for d in kept]
    # Kept dims not adjacent: one permuted copy first.
    perm = kept + list(red)
    K = math.prod(shape[d] for d in kept)
    x3 = x.permute(perm).contiguous().reshape(1, K, -1)
    w3 = weight.permute(perm).reshape(1, K, -1) if weight is not None else None
    return x3, w3, [shape[d] for d in kept]


@autocast_op("none")  # elementwise: nothing cast; the body never sees the caller's autocast
def moment_statistics(x: Tensor, *, dims: int | Sequence[int] | None, weight: Tensor | None = None,
                      correction: int = 0, keepdim: bool = False, process_group=None) -> MomentStatistics:
    """Mean and variance of ``x`` over ``dims``, in one read, numerically stable, differentiable.

    ``mean = sum(w x) / W`` and ``var = sum(w (x - mean)^2) / (W - correction)`` over the reduced dims,
    where ``W = sum(w)`` (the element count without weights). The kernel merges per-tile (count, mean,
    M2) triples with Chan's formula; it never forms E[x^2] - E[x]^2.

    Args:
        x: any floating tensor.
        dims: the dims to reduce (int, sequence, or None for all): e.g. ``(1, 2, 3)`` per sample,
            ``(0, 2, 3)`` per channel of (B, C, H, W), ``None`` global. One read of ``x`` when the kept
            dims are adjacent; otherwise x is permuted into a copy first.
        weight: optional non-negative weights broadcastable to ``x`` (e.g. (B, 1, 1, 1) per sample);
            differentiable too.
        correction: subtracted from W in the variance's denominator (0: population, 1: Bessel).
        keepdim: keep the reduced dims as size 1.
        process_group: ``None`` (default): this rank's moments, no collective.
            ``fastdistill.distributed.WORLD`` (``"world"``) or a ProcessGroup: the per-rank triples are
            merged across ranks (Chan, autograd-aware) so every rank gets the global moments of the kept
            indices (every rank must call); meaningful when ``dims`` includes the batch dim. See
            docs/distributed.md.

    Returns:
        ``MomentStatistics(mean, var)`` in fp32 (fp64 for fp64 input), of the kept dims' shape.
    """
    op = "moment_statistics"
    check_tensor(op, "x", x)
    red = _normalize_dims(op, dims, x.dim())
    if weight is not None:
        check_tensor(op, "weight", weight)
        check_same_device(op, x=x, weight=weight)
        try:
            ok = torch.broadcast_shapes(weight.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{op}: weight of shape {tuple(weight.shape)} does not broadcast to x of shape "
                             f"{tuple(x.shape)}")
    if isinstance(correction, bool) or not isinstance(correction, int) or correction < 0:
        raise ValueError(f"{op}: correction must be a non-negative int, got {correction!r}")
    out_shape = [1 if d in red else x.shape[d] for d in range(x.dim())] if keepdim else \
        [x.shape[d] for d in range(x.dim()) if d not in red]
    group = None
    if process_group is not None:
        import torch.distributed as dist

        if not (isinstance(process_group, str) and not (dist.is_available() and dist.is_initialized())):
            from .. import distributed as fd_dist  # imported only when a group can be active

            group = fd_dist.resolve_group(process_group)
    backend = dispatch.select_backend(op, x, weight)
    if backend == "reference" and group is None:
        mean, var = moment_statistics_reference(x, red, weight, correction)
        return MomentStatistics(mean.reshape(out_shape), var.reshape(out_shape))
    if backend == "reference":
        cdt = _compute_dtype(x, weight)
        mean_r, _ = moment_statistics_reference(x, red, weight, 0)
        keep = mean_r.reshape([1 if d in red else x.shape[d] for d in range(x.dim())])
        xd = x.to(cdt)
        if weight is None:
            n = torch.full_like(mean_r, float(math.prod(x.shape[d] for d in red)))
            m2 = ((xd - keep) ** 2).sum(dim=red)
        else:
            w = weight.to(cdt).expand_as(xd)
            n = w.sum(dim=red)
            m2 = (w * (xd - keep) ** 2).sum(dim=red)
        n, mean, m2 = n.reshape(-1), mean_r.reshape(-1), m2.reshape(-1)
    else:
        x3, w3, _ = _three_d(x, weight, red)
        n, mean, m2 = _stats_triton(x3, w3)
    if group is not None:
        from .. import distributed as fd_dist

        n, mean, m2 = fd_dist.all_reduce_moments(n, mean, m2, group)
    var = m2 / (n - correction)
    return MomentStatistics(mean.reshape(out_shape), var.reshape(out_shape))

"""``fused_attention``: FlashAttention-style softmax attention (Triton forward and backward).

``out = softmax(scale * q @ k^T + attn_mask) @ v`` per batch and head, without materialising
the Lq x Lk score matrix on the Triton backend. Kernels: :mod:`fastdistill.kernels.attention`.

Backends (see :mod:`fastdistill.dispatch`): ``triton`` (CUDA tensors; CPU tensors under
``TRITON_INTERPRET=1``) and ``reference`` (plain PyTorch, the CPU path and the ground truth;
it materialises the score matrix).

Semantics follow ``torch.nn.functional.scaled_dot_product_attention``: a query row whose keys are
all masked (every mask entry ``-inf``) gives 0 and a zero, finite gradient, not NaN.

Calls the Triton kernel cannot take (head dim above :data:`MAX_HEAD_DIM`, an ``attn_mask`` that
requires grad -- the kernel computes no mask gradient -- or float64 inputs) run the reference when
the backend is chosen automatically, with a one-time :class:`fastdistill.dispatch.FallbackWarning`
naming the reason; with ``triton`` forced they raise. :func:`triton_fallback_reason` says in advance.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import dispatch
from .._validation import check_choice, check_same_device, check_tensor
from ._common import autocast_device_type, autocast_op, no_autocast

OP = "fused_attention"
LAYOUTS = ("bhld", "blhd")
MAX_HEAD_DIM = 256
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

dispatch.register_op(OP, ["triton"])


def _dims(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    b, x, y, d = t.shape
    return (b, x, y, d) if layout == "bhld" else (b, y, x, d)


def _check_inputs(q: object, k: object, v: object, scale: object, attn_mask: object,
                  layout: object) -> tuple[float, Optional[torch.Tensor]]:
    """Validate and return ``(scale, mask as a 4-D view or None)``."""
    check_choice(OP, "layout", layout, LAYOUTS)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t, ndim=4)
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    check_same_device(OP, q=q, k=k, v=v, attn_mask=attn_mask if isinstance(attn_mask, torch.Tensor) else None)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{OP}: q, k and v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype} "
                        f"(as in F.scaled_dot_product_attention; under torch.autocast they are cast to its dtype)")
    axes = "(B, H, L, D)" if layout == "bhld" else "(B, L, H, D)"
    B, H, Lq, D = _dims(q, layout)
    Bk, Hk, Lk, Dk = _dims(k, layout)
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"{OP}: k and v must have the same shape {axes}; got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if Dk != D:
        raise ValueError(f"{OP}: head dims differ: q has head dim {D} but k has {Dk} "
                         f"(shapes q {tuple(q.shape)}, k {tuple(k.shape)}, layout {layout!r} = {axes})")
    if (Bk, Hk) != (B, H):
        raise ValueError(f"{OP}: q and k must have the same batch and head counts in layout {layout!r} {axes}; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if D < 1:
        raise ValueError(f"{OP}: head dim must be >= 1, got {D} (q shape {tuple(q.shape)})")
    if Lq < 1 or Lk < 1:
        raise ValueError(f"{OP}: sequence lengths must be >= 1; got Lq={Lq}, Lk={Lk}")
    if scale is None:
        scale_f = 1.0 / math.sqrt(D)
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"{OP}: scale must be a float or None, got {type(scale).__name__}")
        scale_f = float(scale)
        if not math.isfinite(scale_f):
            raise ValueError(f"{OP}: scale must be finite, got {scale_f}")
    return scale_f, _check_mask(attn_mask, B, H, Lq, Lk)


def _check_mask(attn_mask: object, B: int, H: int, Lq: int, Lk: int) -> Optional[torch.Tensor]:
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{OP}: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if not attn_mask.dtype.is_floating_point:
        raise TypeError(f"{OP}: attn_mask must be an additive floating mask (0 keeps, large negative drops), got "
                        f"{attn_mask.dtype}; convert a boolean keep-mask with "
                        f"torch.zeros(m.shape).masked_fill(~m, float('-inf'))")
    want = f"(B, 1, Lk) = ({B}, 1, {Lk}) or 4-D broadcastable to (B, H, Lq, Lk) = ({B}, {H}, {Lq}, {Lk})"
    if attn_mask.dim() == 3:
        # diffusers' encoder mask: one additive row of key biases per sample.
        if tuple(attn_mask.shape) != (B, 1, Lk):
            raise ValueError(f"{OP}: attn_mask must have shape {want}; got {tuple(attn_mask.shape)}")
        return attn_mask.unsqueeze(1)  # (B, 1, 1, Lk): a view
    if attn_mask.dim() == 4:
        full = (B, H, Lq, Lk)
        ok = attn_mask.shape[3] == Lk and all(attn_mask.shape[i] in (1, full[i]) for i in range(3))
        if not ok:
            raise ValueError(f"{OP}: attn_mask must have shape {want}; got {tuple(attn_mask.shape)}")
        return attn_mask
    raise ValueError(f"{OP}: attn_mask must have shape {want}; got {attn_mask.dim()} dims "
                     f"{tuple(attn_mask.shape)}")


def _masked_softmax(s: torch.Tensor) -> torch.Tensor:
    """``softmax(s, -1)``, except that a row of all ``-inf`` gives zeros (as SDPA does), with a zero,
    finite gradient: the row max is replaced by 0 there and the zero normaliser by 1."""
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    return p / torch.where(l == 0, torch.ones_like(l), l)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                        attn_mask: torch.Tensor | None = None, layout: str = "bhld") -> torch.Tensor:
    """Plain-PyTorch attention (materialises the scores; fp32 math for half inputs, fp64 for fp64).

    Any head dim; the mask is differentiated like any other input (broadcast dims get the summed
    gradient). A fully masked query row gives 0 (SDPA's convention), with zero gradient.
    """
    scale_f, mask = _check_inputs(q, k, v, scale, attn_mask, layout)
    if layout == "blhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale_f
    if mask is not None:
        s = s + mask.to(ct)
    out = torch.matmul(_masked_softmax(s), v.to(ct)).to(q.dtype)
    return out.transpose(1, 2) if layout == "blhd" else out


def _kernel_limits(q: torch.Tensor, attn_mask: object, layout: str) -> Optional[str]:
    """Why the Triton kernel cannot compute this (validated) call, or None when it can."""
    D = _dims(q, layout)[3]
    if D > MAX_HEAD_DIM:
        return f"head dim {D} > {MAX_HEAD_DIM}, the Triton kernel's limit"
    if isinstance(attn_mask, torch.Tensor) and attn_mask.requires_grad and torch.is_grad_enabled():
        return "attn_mask requires grad and the Triton kernel computes no mask gradient"
    # float64 is not a kernel limit but dispatch's rule (fastdistill.dispatch): it runs on the reference.
    return None


def _triton_would_run(device: torch.device) -> bool:
    forced = dispatch.forced_backend(OP)
    if forced is not None:
        return forced == "triton"
    return device.type == "cuda" and dispatch.why_unavailable("triton", device) is None


def triton_fallback_reason(q: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
                           layout: str = "bhld") -> str | None:
    """Why a :func:`fused_attention` call on these tensors would *not* run the Triton kernel although
    Triton is the backend for it (forced, or chosen automatically on CUDA), else None.

    Reasons: head dim above :data:`MAX_HEAD_DIM`; an ``attn_mask`` that requires grad while grad
    mode is on (the kernel computes no mask gradient). (float64 inputs run on the reference by the
    library-wide dtype rule of :mod:`fastdistill.dispatch`, with no warning.)
    Used by :class:`fastdistill.diffusers.FusedAttnProcessor` to route such calls to SDPA.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        return None
    if not _triton_would_run(q.device):
        return None
    return _kernel_limits(q, attn_mask, layout)


# ----------------------------------------------------------------------------------------------
# Custom ops (Triton backend): opaque to torch.compile, with fake kernels and autograd.
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("fastdistill::fused_attention_triton", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float,
            layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import attention as kernels

    return kernels.attention_forward(q, k, v, attn_mask, scale, layout)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, attn_mask, scale, layout):
    B, H, Lq, _ = _dims(q, layout)
    return q.new_empty(q.shape), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("fastdistill::fused_attention_triton_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float,
            layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import attention as kernels

    return kernels.attention_backward(grad_out, q, k, v, out, lse, attn_mask, scale, layout)


@_bwd_op.register_fake
def _bwd_fake(grad_out, q, k, v, out, lse, attn_mask, scale, layout):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, scale, layout = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask)
    ctx.scale = scale
    ctx.layout = layout
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, attn_mask = ctx.saved_tensors
    with no_autocast(autocast_device_type(grad_out)):  # a backward run inside the caller's autocast block
        dq, dk, dv = _bwd_op(grad_out, q, k, v, out, lse, attn_mask, ctx.scale, ctx.layout)
    return dq, dk, dv, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@autocast_op("lower", "q", "k", "v", "attn_mask")
def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    attn_mask: torch.Tensor | None = None, layout: str = "bhld") -> torch.Tensor:
    """Softmax attention ``softmax(scale * q k^T + attn_mask) v``, FlashAttention-style.

    Args:
        q: queries, ``(B, H, Lq, D)`` for ``layout="bhld"`` or ``(B, Lq, H, D)`` for ``"blhd"``
            (any strides: e.g. diffusers' ``view(B, L, H, D).transpose(1, 2)`` is read in place).
        k, v: keys and values, ``(B, H, Lk, D)`` / ``(B, Lk, H, D)``; Lk is independent of Lq.
        scale: multiplier of ``q k^T``; default ``1 / sqrt(D)`` (as in
            ``F.scaled_dot_product_attention``).
        attn_mask: optional additive float mask, ``(B, 1, Lk)`` (one key bias row per sample, as
            diffusers builds from ``encoder_attention_mask``) or 4-D broadcastable to
            ``(B, H, Lq, Lk)``: ``(B|1, H|1, Lq|1, Lk)``. ``-inf`` entries drop keys; it is
            differentiated when it requires grad (on the reference path, see below).
        layout: ``"bhld"`` or ``"blhd"``; the output has the same layout.

    Returns:
        ``out`` with ``q``'s shape and dtype (contiguous on the Triton backend).

    Autocast: like SDPA, inside ``torch.autocast(device_type, dtype=X)`` ``q``, ``k``, ``v`` and a float
    ``attn_mask`` are cast to ``X`` (fp64 is not) and the output is ``X``; mixed q/k/v dtypes are accepted
    there (a TypeError outside autocast, as in SDPA). See :mod:`fastdistill.ops._common`.

    Head dims: the Triton kernel takes 1..256 (any size; 40, 64, 80, 128, 160 and 256 are the UNet
    ones); larger head dims run the reference (see below). Dtypes: float16 and bfloat16 (the fast
    path), float32 (TF32 dots on NVIDIA GPUs), float64 on the reference backend.

    A query row whose keys are all masked (``-inf``) gives 0 with a zero gradient, as in
    ``F.scaled_dot_product_attention``. The mask gets a gradient when it requires one: such calls
    run the reference, since the Triton kernel computes no mask gradient.

    Fallback: when the backend is chosen automatically and the Triton kernel cannot take the call
    (:func:`triton_fallback_reason`: head dim > 256, a mask that requires grad), the reference
    runs and a :class:`fastdistill.dispatch.FallbackWarning` names the reason once per reason. With
    ``triton`` forced (``use_backend("triton")``) the call raises
    :class:`fastdistill.dispatch.BackendUnavailableError`. float64 inputs run on the reference (the
    library's dtype rule, no warning); forcing ``triton`` on them raises
    :class:`fastdistill.dispatch.DtypeNotSupportedError`, a ``TypeError``.
    """
    scale_f, mask = _check_inputs(q, k, v, scale, attn_mask, layout)
    limit = _kernel_limits(q, attn_mask, layout) if _triton_would_run(q.device) else None
    if limit is not None and dispatch.forced_backend(OP) == "triton":
        raise dispatch.BackendUnavailableError(
            f"{OP}: backend 'triton' was forced but cannot run this call: {limit}; use the reference backend "
            f"(fastdistill.use_backend('reference')) or automatic dispatch, which falls back with a warning")
    if limit is not None:
        dispatch._warn_once(OP, f"triton: {limit}")
        with dispatch.use_backend("reference", ops=[OP]):
            backend = dispatch.select_backend(OP, q, k, v, attn_mask)  # records the reference
    else:
        backend = dispatch.select_backend(OP, q, k, v, attn_mask)
    if backend == "reference":
        return attention_reference(q, k, v, scale=scale, attn_mask=attn_mask, layout=layout)
    out, _ = _fwd_op(q, k, v, mask, scale_f, layout)
    return out


__all__ = ["fused_attention", "attention_reference", "triton_fallback_reason", "MAX_HEAD_DIM"]

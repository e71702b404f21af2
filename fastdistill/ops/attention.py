"""``fused_attention``: FlashAttention-style softmax attention (Triton forward and backward).

``out = softmax(scale * q @ k^T + attn_mask) @ v`` per batch and head, without materialising
the Lq x Lk score matrix on the Triton backend. Kernels: :mod:`fastdistill.kernels.attention`.

Backends (see :mod:`fastdistill.dispatch`): ``triton`` (CUDA tensors; CPU tensors under
``TRITON_INTERPRET=1``) and ``reference`` (plain PyTorch, the CPU path and the ground truth;
it materialises the score matrix).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import dispatch
from .._validation import check_choice, check_same_device, check_tensor

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
        raise TypeError(f"{OP}: q, k and v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
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
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{OP}: head dim must be in 1..{MAX_HEAD_DIM}, got {D} (q shape {tuple(q.shape)})")
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
    if attn_mask.requires_grad:
        raise ValueError(f"{OP}: attn_mask requires grad, but fused_attention does not differentiate the mask; "
                         f"pass attn_mask.detach()")
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


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                        attn_mask: torch.Tensor | None = None, layout: str = "bhld") -> torch.Tensor:
    """Plain-PyTorch attention (materialises the scores; fp32 math for half inputs, fp64 for fp64)."""
    scale_f, mask = _check_inputs(q, k, v, scale, attn_mask, layout)
    if layout == "blhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale_f
    if mask is not None:
        s = s + mask.to(ct)
    out = torch.matmul(torch.softmax(s, dim=-1), v.to(ct)).to(q.dtype)
    return out.transpose(1, 2) if layout == "blhd" else out


# ----------------------------------------------------------------------------------------------
# Custom ops (Triton backend): opaque to torch.compile, with fake kernels and autograd.
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("fastdistill::fused_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float,
            layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import attention as kernels

    return kernels.attention_forward(q, k, v, attn_mask, scale, layout)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, attn_mask, scale, layout):
    B, H, Lq, _ = _dims(q, layout)
    return q.new_empty(q.shape), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("fastdistill::fused_attention_bwd", mutates_args=())
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
    dq, dk, dv = _bwd_op(grad_out, q, k, v, out, lse, attn_mask, ctx.scale, ctx.layout)
    return dq, dk, dv, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


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
            ``(B, H, Lq, Lk)``: ``(B|1, H|1, Lq|1, Lk)``. It receives no gradient.
        layout: ``"bhld"`` or ``"blhd"``; the output has the same layout.

    Returns:
        ``out`` with ``q``'s shape and dtype (contiguous on the Triton backend).

    Head dims 1..256 (every multiple of 8: 40, 64, 80, 128, 160, 256, ...). Dtypes: float16 and
    bfloat16 (the fast path), float32 (TF32 dots on NVIDIA GPUs), float64 on the reference
    backend only.
    """
    scale_f, mask = _check_inputs(q, k, v, scale, attn_mask, layout)
    backend = dispatch.select_backend(OP, q, k, v, attn_mask)
    if backend == "reference":
        return attention_reference(q, k, v, scale=scale, attn_mask=attn_mask, layout=layout)
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"{OP}: the triton backend takes float16, bfloat16 or float32 inputs, got {q.dtype}; "
                        f"run float64 with fastdistill.use_backend('reference')")
    out, _ = _fwd_op(q, k, v, mask, scale_f, layout)
    return out


__all__ = ["fused_attention", "attention_reference"]

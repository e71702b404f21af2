"""Attention-map distillation: per head and query, ``KL(softmax(s_t q_t k_t^T) || softmax(s_s q_s k_s^T))``
without materialising either ``Lq x Lk`` attention map.

It runs on the relational-KL core (:mod:`fastdistill.ops.relational_kl`, one online two-distribution
softmax kernel shared with RDD): batch and heads are its two group dimensions, read by strides, so
``(B, H, L, D)`` tensors in any memory layout (say diffusers' ``(B, L, H, D).transpose(1, 2)``) are used
in place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import dispatch
from .._validation import check_choice, check_positive, check_same_device, check_tensor
from ._common import autocast_op
from .relational_kl import reduce_kl, relational_kl_core

OP = "attention_kl"
dispatch.register_op(OP, ["triton"])


def _scale(op: str, name: str, value: float | None, d: int) -> float:
    if value is None:
        return 1.0 / math.sqrt(d)
    return check_positive(op, name, value)


@autocast_op("lower", "q_s", "k_s", "q_t", "k_t")
def attention_kl(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, *,
                 scale_s: float | None = None, scale_t: float | None = None, reduction: str = "mean"
                 ) -> torch.Tensor:
    """KL between teacher and student attention distributions, flash-style (memory O(B*H*Lq)).

    Args:
        q_s: student queries ``(B, H, Lq, D_s)``. Receives the gradient.
        k_s: student keys ``(B, H, Lk, D_s)``. Receives the gradient.
        q_t: teacher queries ``(B, H, Lq, D_t)``; ``D_t`` may differ from ``D_s`` (heads must be paired
            beforehand: same ``H``). No gradient.
        k_t: teacher keys ``(B, H, Lk, D_t)``. No gradient.
        scale_s: student logit scale (> 0); default ``1 / sqrt(D_s)``, as in attention.
        scale_t: teacher logit scale (> 0); default ``1 / sqrt(D_t)``.
        reduction: ``"mean"`` over the ``B*H*Lq`` query rows, ``"sum"``, or ``"none"`` (fp32 ``(B, H, Lq)``).

    Returns:
        fp32 loss. Inputs fp32/fp16/bf16 with any strides; fp32 accumulation. Under ``torch.autocast``
        the four inputs are cast to the autocast dtype first, as ``matmul`` casts (:mod:`fastdistill.ops._common`).
    """
    op = OP
    for name, t in (("q_s", q_s), ("k_s", k_s), ("q_t", q_t), ("k_t", k_t)):
        check_tensor(op, name, t, ndim=4)
    check_same_device(op, q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t)
    if q_s.shape[-1] != k_s.shape[-1]:
        raise ValueError(f"{op}: q_s and k_s must have the same head dim; got {q_s.shape[-1]} and {k_s.shape[-1]}")
    if q_t.shape[-1] != k_t.shape[-1]:
        raise ValueError(f"{op}: q_t and k_t must have the same head dim; got {q_t.shape[-1]} and {k_t.shape[-1]}")
    if q_s.shape[:3] != q_t.shape[:3]:
        raise ValueError(f"{op}: q_s and q_t must have the same (B, H, Lq); got {tuple(q_s.shape)} and "
                         f"{tuple(q_t.shape)}")
    if k_s.shape[:3] != k_t.shape[:3]:
        raise ValueError(f"{op}: k_s and k_t must have the same (B, H, Lk); got {tuple(k_s.shape)} and "
                         f"{tuple(k_t.shape)}")
    if q_s.shape[:2] != k_s.shape[:2]:
        raise ValueError(f"{op}: q_s and k_s must have the same (B, H); got {tuple(q_s.shape)} and "
                         f"{tuple(k_s.shape)}")
    if q_s.numel() == 0 or k_s.numel() == 0 or q_t.numel() == 0:
        raise ValueError(f"{op}: empty input (q_s {tuple(q_s.shape)}, k_s {tuple(k_s.shape)}, q_t {tuple(q_t.shape)})")
    s_s = _scale(op, "scale_s", scale_s, q_s.shape[-1])
    s_t = _scale(op, "scale_t", scale_t, q_t.shape[-1])
    check_choice(op, "reduction", reduction, ("mean", "sum", "none"))
    backend = dispatch.select_backend(op, q_s, k_s, q_t, k_t)
    kl = relational_kl_core(q_s, k_s, q_t, k_t, scale_s=s_s, scale_t=s_t, segment_size=k_s.shape[2],
                            backend=backend)
    return reduce_kl(kl.squeeze(-1), reduction)


def attention_kl_reference(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, *,
                           scale_s: float | None = None, scale_t: float | None = None,
                           reduction: str = "mean") -> torch.Tensor:
    """Dense formula of :func:`attention_kl` (materialises both attention maps; ground truth in tests)."""
    s_s = scale_s if scale_s is not None else 1.0 / math.sqrt(q_s.shape[-1])
    s_t = scale_t if scale_t is not None else 1.0 / math.sqrt(q_t.shape[-1])
    ls = (q_s @ k_s.transpose(-1, -2)) * s_s
    lt = (q_t.detach() @ k_t.detach().transpose(-1, -2)) * s_t
    kl = (F.softmax(lt, -1) * (F.log_softmax(lt, -1) - F.log_softmax(ls, -1))).sum(-1)
    return reduce_kl(kl, reduction)

"""Relational KL: ``KL(softmax(l_T[i] / tau_kd) || softmax(l_S[i] / tau_kd))`` per row ``i`` (and key
segment), with ``l_X[i, j] = <q_X[i], k_X[j]> / tau``, never materialising the rows x keys matrix.

This module holds the shared core used by :func:`relational_kl`, :func:`fastdistill.fused_rdd_loss`,
:func:`fastdistill.memory_p2p_loss` and :func:`fastdistill.attention_kl` (:func:`relational_kl_core`,
over 4-D ``(G1, G2, rows, channels)`` tensors with separate student and teacher logit scales, optional
key segments and an optional key index), in the op pattern of docs/architecture.md:

* ``reference`` backend (:func:`relational_kl_core_reference`): the same math in plain PyTorch,
  differentiated by autograd, chunked over rows with ``torch.utils.checkpoint`` per chunk so that
  forward and backward run in O(chunk x keys) memory; traced and fused by ``torch.compile``.
* ``triton`` backend: the Triton-only custom ops ``fastdistill::relational_kl_triton`` (forward) and
  ``fastdistill::relational_kl_triton_bwd`` (backward, registered as its autograd), whose bodies call
  the launchers of ``kernels/relational_kl.py`` (tiles streamed, the logits never formed).

No gradient flows to the teacher tensors (they are constants of the loss, as under ``no_grad`` in
RDD) nor to keys read through an index (the memory bank). Double backward is not supported.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import dispatch
from .._validation import check_choice, check_positive, check_same_device, check_tensor
from ..distributed import gather_rows
from ._common import autocast_device_type, autocast_op, no_autocast

OP = "relational_kl"
dispatch.register_op(OP, ["triton"])

_EPS = 1e-12
# Elements of one (group, row chunk, key) logit slab in the reference backend.
_REF_CHUNK_ELEMS = 1 << 22


# ----------------------------------------------------------------------------------------------
# Reference backend: plain PyTorch, differentiated by autograd, row-chunked with checkpointing

def _acc_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _flat3(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.reshape(-1, t.shape[-2], t.shape[-1]).to(dtype)


def _ref_keys(k: torch.Tensor, k_index: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    k = _flat3(k, dtype)
    return k.index_select(1, k_index) if k_index is not None else k


def _ref_chunks(G: int, N: int, M: int):
    rc = max(1, _REF_CHUNK_ELEMS // max(1, G * M))
    for r0 in range(0, N, rc):
        yield r0, min(N, r0 + rc)


class _ShieldedBmmNT(torch.autograd.Function):
    """``a @ b^T`` (batched) whose forward and backward GEMMs never see the caller's autocast.

    The engine runs backward nodes under the autocast state of the ``backward()`` call, so a plain
    ``bmm`` of the reference would become a bf16 GEMM in a backward called inside an autocast block,
    while the Triton backward (``no_autocast`` in :func:`_backward`) computes in fp32. Only the two
    GEMMs of the product rule are written here; the softmax/KL math is autograd's."""

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with no_autocast(autocast_device_type(a)):
            return torch.bmm(a, b.transpose(1, 2))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        da = db = None
        with no_autocast(autocast_device_type(g)):
            if ctx.needs_input_grad[0]:
                da = torch.bmm(g, b)
            if ctx.needs_input_grad[1]:
                db = torch.bmm(g.transpose(1, 2), a)
        return da, db


def _bmm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():  # a compiled graph fixes its backward at trace time: plain bmm
        return torch.bmm(a, b.transpose(1, 2))
    return _ShieldedBmmNT.apply(a, b)


def _ref_chunk_kl(qs: torch.Tensor, ks: torch.Tensor, qt: torch.Tensor, kt: torch.Tensor, scale_s: float,
                  scale_t: float, S: int) -> torch.Tensor:
    """KL ``(G, n, M // S)`` of one row chunk: ``qs``/``qt`` ``(G, n, C)``, ``ks``/``kt`` ``(G, M, C)``."""
    G, n = qs.shape[0], qs.shape[1]
    nseg = ks.shape[1] // S
    s = (_bmm_nt(qs, ks) * scale_s).view(G, n, nseg, S)
    t = (_bmm_nt(qt, kt) * scale_t).view(G, n, nseg, S)
    lse_s = torch.logsumexp(s, dim=-1)
    lse_t = torch.logsumexp(t, dim=-1)
    p_t = torch.exp(t - lse_t.unsqueeze(-1))
    return (p_t * (t - s)).sum(-1) - lse_t + lse_s


def relational_kl_core_reference(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, *,
                                 scale_s: float, scale_t: float, segment_size: int,
                                 k_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``reference`` backend of :func:`relational_kl_core`: same inputs, same fp32 result.

    Plain PyTorch differentiated by autograd, computed in fp32 (fp64 when any input is fp64). Rows are
    processed in chunks of ``_REF_CHUNK_ELEMS // (groups x keys)``; each chunk runs under
    ``torch.utils.checkpoint`` (non-reentrant), so only the inputs are kept for the backward and the
    chunk's logits are recomputed there: memory is O(chunk x keys) in forward and backward. ``q_t`` and
    ``k_t`` are detached; keys read through ``k_index`` get no gradient; ``q_s is k_s`` adds both
    contributions in that tensor (autograd)."""
    G1, G2, N, _ = q_s.shape
    same_s, same_t = k_s is q_s and k_index is None, k_t is q_t and k_index is None
    q_t, k_t = q_t.detach(), k_t.detach()
    if k_index is not None:
        k_s = k_s.detach()
    dt = _acc_dtype(q_s, k_s, q_t, k_t)
    qs, qt = _flat3(q_s, dt), _flat3(q_t, dt)
    ks = qs if same_s else _ref_keys(k_s, k_index, dt)
    kt = qt if same_t else _ref_keys(k_t, k_index, dt)
    G, M = qs.shape[0], ks.shape[1]
    S = int(segment_size)
    grad = torch.is_grad_enabled() and (qs.requires_grad or ks.requires_grad)
    kls = []
    for r0, r1 in _ref_chunks(G, N, M):
        args = (qs[:, r0:r1], ks, qt[:, r0:r1], kt, float(scale_s), float(scale_t), S)
        if grad:  # preserve_rng_state=False: no RNG here, and reading the CUDA RNG state would sync
            kls.append(checkpoint(_ref_chunk_kl, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            kls.append(_ref_chunk_kl(*args))
    kl = kls[0] if len(kls) == 1 else torch.cat(kls, 1)
    return kl.float().reshape(G1, G2, N, M // S)


# ----------------------------------------------------------------------------------------------
# Triton custom ops (opaque to torch.compile; fake kernels give shapes, autograd is registered below).
# Their bodies only call the kernels/relational_kl.py launchers.

def _nseg(k_s: torch.Tensor, k_index: Optional[torch.Tensor], S: int) -> int:
    M = k_index.shape[0] if k_index is not None else k_s.shape[2]
    return M // S


@torch.library.custom_op("fastdistill::relational_kl_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _triton_op(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
               k_index: Optional[torch.Tensor], scale_s: float, scale_t: float, segment_size: int,
               symmetric: bool, logit_bound: Optional[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # ``symmetric``: q_s is k_s and q_t is k_t (selects the backward, and with ``logit_bound`` the forward).
    from fastdistill.kernels import relational_kl as K

    return K.relational_kl_fwd(q_s, k_s, q_t, k_t, k_index, scale_s, scale_t, segment_size, symmetric,
                               logit_bound)


@_triton_op.register_fake
def _triton_fake(q_s, k_s, q_t, k_t, k_index, scale_s, scale_t, segment_size, symmetric, logit_bound):
    shape = (*q_s.shape[:3], _nseg(k_s, k_index, segment_size))
    return (q_s.new_empty(shape, dtype=torch.float32), q_s.new_empty(shape, dtype=torch.float32),
            q_s.new_empty(shape, dtype=torch.float32))


@torch.library.custom_op("fastdistill::relational_kl_triton_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def _triton_bwd_op(dkl: torch.Tensor, q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                   k_index: Optional[torch.Tensor], lse_s: torch.Tensor, lse_t: torch.Tensor, scale_s: float,
                   scale_t: float, segment_size: int, need_dq: bool, need_dk: bool,
                   symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fastdistill.kernels import relational_kl as K

    dq, dk = K.relational_kl_bwd(dkl, q_s, k_s, q_t, k_t, k_index, lse_s, lse_t, scale_s, scale_t,
                                 segment_size, need_dq, need_dk, symmetric)
    # Gradients come back in the inputs' dtypes; an unneeded one is an empty placeholder (custom ops
    # cannot return None).
    dq = dq.to(q_s.dtype) if dq is not None else q_s.new_empty((0,))
    dk = dk.to(k_s.dtype) if dk is not None else k_s.new_empty((0,))
    return dq, dk


@_triton_bwd_op.register_fake
def _triton_bwd_fake(dkl, q_s, k_s, q_t, k_t, k_index, lse_s, lse_t, scale_s, scale_t, segment_size, need_dq,
                     need_dk, symmetric):
    dq = q_s.new_empty(q_s.shape) if need_dq else q_s.new_empty((0,))
    dk = k_s.new_empty(k_s.shape) if need_dk else k_s.new_empty((0,))
    return dq, dk


def _setup_context(ctx, inputs, output):
    q_s, k_s, q_t, k_t, k_index, scale_s, scale_t, segment_size, symmetric, _logit_bound = inputs
    _, lse_s, lse_t = output
    ctx.save_for_backward(q_s, k_s, q_t, k_t, k_index, lse_s, lse_t)
    ctx.args = (scale_s, scale_t, segment_size, symmetric)


def _backward(ctx, dkl, _dlse_s, _dlse_t):
    q_s, k_s, q_t, k_t, k_index, lse_s, lse_t = ctx.saved_tensors
    scale_s, scale_t, segment_size, symmetric = ctx.args
    need_dq = ctx.needs_input_grad[0]
    need_dk = ctx.needs_input_grad[1] and k_index is None
    rest = (None,) * 8  # no gradient for q_t, k_t, k_index and the non-tensor arguments
    if not (need_dq or need_dk):
        return (None, None) + rest
    if symmetric:  # one tensor in both roles: the whole gradient comes back as dq
        need_dq, need_dk = True, False
    with no_autocast(autocast_device_type(dkl)):  # a backward run inside the caller's autocast block
        dq, dk = _triton_bwd_op(dkl, q_s, k_s, q_t, k_t, k_index, lse_s, lse_t, scale_s, scale_t, segment_size,
                                need_dq, need_dk, symmetric)
    return (dq if need_dq else None, dk if need_dk else None) + rest


_triton_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Dispatch point of the relational family

def relational_kl_core(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, *,
                       scale_s: float, scale_t: float, segment_size: int, backend: str,
                       k_index: Optional[torch.Tensor] = None, unit_rows: bool = False) -> torch.Tensor:
    """Per-(group, row, segment) KL, fp32 ``(G1, G2, N, NSEG)``, on validated 4-D inputs.

    The shared core of every relational op (callers validate and pick ``backend`` through
    :mod:`fastdistill.dispatch`): ``"triton"`` runs the ``fastdistill::relational_kl_triton`` custom op,
    ``"reference"`` :func:`relational_kl_core_reference`. Differentiable w.r.t. ``q_s`` and ``k_s``
    (``k_s`` only without ``k_index``); when ``q_s is k_s`` both gradient contributions add up in that
    tensor. ``q_t`` and ``k_t`` get no gradient.

    When ``q_s is k_s`` and ``q_t is k_t`` (a self-relation: RDD's pixel-to-pixel term) the logit
    matrices are symmetric and the Triton backward visits each unordered tile pair once (see
    :func:`fastdistill.kernels.relational_kl.backward_path`). ``unit_rows``: the caller guarantees rows of
    L2 norm at most 1 (normalised features), so ``|logit| <= scale`` and a self-relation's forward may
    visit each unordered tile pair once too (:func:`fastdistill.kernels.relational_kl.forward_path`).
    """
    if backend == "triton":
        symmetric = q_s is k_s and q_t is k_t and k_index is None
        kl, _, _ = _triton_op(q_s, k_s, q_t.detach(), k_t.detach(), k_index, float(scale_s), float(scale_t),
                              int(segment_size), symmetric, 1.0 if unit_rows else None)
        return kl
    if backend != "reference":
        raise ValueError(f"relational_kl_core: backend must be 'triton' or 'reference', got {backend!r}")
    return relational_kl_core_reference(q_s, k_s, q_t, k_t, scale_s=scale_s, scale_t=scale_t,
                                        segment_size=segment_size, k_index=k_index)


# ----------------------------------------------------------------------------------------------
# Shared helpers (also used by rdd.py and attention_kl.py)

def l2_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x / max(||x||_2, 1e-12)`` along ``dim`` (``F.normalize``), computed in fp32 (fp64 stays fp64)
    and returned in ``x``'s dtype; plain PyTorch, so its backward is autograd's."""
    xf = x if x.dtype == torch.float64 else x.float()
    return (xf / xf.norm(dim=dim, keepdim=True).clamp_min(_EPS)).to(x.dtype)


def reduce_kl(kl: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``reduction`` (``mean``, ``sum`` or ``none``) to per-row KL values."""
    if reduction == "mean":
        return kl.mean()
    if reduction == "sum":
        return kl.sum()
    return kl


# ----------------------------------------------------------------------------------------------
# Public op

@autocast_op("lower", "q_s", "k_s", "q_t", "k_t")
def relational_kl(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, *,
                  temperature: float = 1.0, kd_temperature: float = 1.0, segment_size: int | None = None,
                  normalize: bool = False, reduction: str = "mean", process_group=None) -> torch.Tensor:
    """Relational KL between teacher and student similarity distributions, flash-style.

    For each row ``i`` with logits ``l_X[i, j] = <q_X[i], k_X[j]> / temperature`` (X = student S,
    teacher T) returns ``KL(softmax(l_T[i] / kd_temperature) || softmax(l_S[i] / kd_temperature))``,
    the softmax running over all keys, or over each segment of ``segment_size`` consecutive keys.
    Memory is O(rows x segments): the rows x keys matrices are never formed.

    Args:
        q_s: student queries, ``(N, C_s)`` or batched ``(G, N, C_s)``. Receives a gradient.
        k_s: student keys, ``(M, C_s)`` / ``(G, M, C_s)``. Receives a gradient; may be the same
            tensor as ``q_s`` (self-similarity: both gradient contributions add up).
        q_t: teacher queries, ``(N, C_t)`` / ``(G, N, C_t)``. ``C_t`` may differ from ``C_s``. No gradient.
        k_t: teacher keys, ``(M, C_t)`` / ``(G, M, C_t)``. No gradient.
        temperature: ``tau`` dividing the dot products (> 0).
        kd_temperature: softmax temperature ``tau_kd`` (> 0); the loss is not multiplied by ``tau_kd**2``.
        segment_size: softmax over consecutive groups of this many keys (must divide ``M``); ``None``
            = one softmax over all ``M`` keys.
        normalize: L2-normalise every row of the four inputs over channels first (``F.normalize``,
            eps 1e-12), differentiably.
        reduction: ``"mean"`` over all (group, row, segment) entries, ``"sum"``, or ``"none"``: fp32
            ``([G,] N)`` without segments, ``([G,] N, M // segment_size)`` with.
        process_group: ``None`` (default): this rank's rows and keys only, no collective.
            ``fastdistill.distributed.WORLD`` (``"world"``) or a ProcessGroup: all four tensors are
            all-gathered along dim 0 (autograd-aware) and the global-batch loss is returned on every rank
            (every rank must call); ``segment_size`` must then divide the local ``M``. See
            docs/distributed.md.

    Returns:
        The loss (fp32; a scalar unless ``reduction="none"``).

    Inputs may be fp32, fp16 or bf16 (any strides); accumulation and the log-sum-exps are fp32.
    Under ``torch.autocast`` the four inputs are cast to the autocast dtype, as ``matmul`` casts (fp64 is
    not); the loss stays fp32 (see :mod:`fastdistill.ops._common`).
    """
    op = OP
    for name, t in (("q_s", q_s), ("k_s", k_s), ("q_t", q_t), ("k_t", k_t)):
        check_tensor(op, name, t, ndim=(2, 3))
    if len({q_s.dim(), k_s.dim(), q_t.dim(), k_t.dim()}) != 1:
        raise ValueError(f"{op}: q_s, k_s, q_t, k_t must all be 2-D or all 3-D; got dims "
                         f"{q_s.dim()}, {k_s.dim()}, {q_t.dim()}, {k_t.dim()}")
    check_same_device(op, q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t)
    if q_s.shape[-1] != k_s.shape[-1]:
        raise ValueError(f"{op}: q_s and k_s must have the same channel count; got {q_s.shape[-1]} and "
                         f"{k_s.shape[-1]}")
    if q_t.shape[-1] != k_t.shape[-1]:
        raise ValueError(f"{op}: q_t and k_t must have the same channel count; got {q_t.shape[-1]} and "
                         f"{k_t.shape[-1]}")
    if q_s.shape[:-1] != q_t.shape[:-1]:
        raise ValueError(f"{op}: q_s and q_t must have the same leading (group, row) shape; got "
                         f"{tuple(q_s.shape)} and {tuple(q_t.shape)}")
    if k_s.shape[:-1] != k_t.shape[:-1]:
        raise ValueError(f"{op}: k_s and k_t must have the same leading (group, key) shape; got "
                         f"{tuple(k_s.shape)} and {tuple(k_t.shape)}")
    if q_s.dim() == 3 and q_s.shape[0] != k_s.shape[0]:
        raise ValueError(f"{op}: q_s and k_s must have the same group count; got {q_s.shape[0]} and "
                         f"{k_s.shape[0]}")
    if min(q_s.shape[-2], k_s.shape[-2], q_s.shape[-1], q_t.shape[-1]) == 0:
        raise ValueError(f"{op}: empty input (shapes q_s {tuple(q_s.shape)}, k_s {tuple(k_s.shape)}, "
                         f"q_t {tuple(q_t.shape)})")
    check_positive(op, "temperature", temperature)
    check_positive(op, "kd_temperature", kd_temperature)
    check_choice(op, "reduction", reduction, ("mean", "sum", "none"))
    if not isinstance(normalize, bool):
        raise TypeError(f"{op}: normalize must be a bool, got {type(normalize).__name__}")
    M = k_s.shape[-2]
    if segment_size is not None:
        if isinstance(segment_size, bool) or not isinstance(segment_size, int):
            raise TypeError(f"{op}: segment_size must be an int or None, got {type(segment_size).__name__}")
        if segment_size < 1 or M % segment_size != 0:
            raise ValueError(f"{op}: segment_size must be >= 1 and divide the key count M={M}; got {segment_size}")

    # A tensor in both roles is gathered once and stays one tensor: the core sees the self-relation.
    same, same_t = k_s is q_s, k_t is q_t
    uniq = [q_s, q_t] + ([] if same else [k_s]) + ([] if same_t else [k_t])
    gathered = gather_rows(uniq, process_group)
    q_s, q_t = gathered[0], gathered[1]
    rest = iter(gathered[2:])
    k_s = q_s if same else next(rest)
    k_t = q_t if same_t else next(rest)
    M = k_s.shape[-2]
    S = segment_size if segment_size is not None else M
    backend = dispatch.select_backend(op, q_s, k_s, q_t, k_t)
    if normalize:
        q_s_n = l2_normalize(q_s)
        k_s_n = q_s_n if same else l2_normalize(k_s)
        q_t_n = l2_normalize(q_t)
        k_t = q_t_n if same_t else l2_normalize(k_t)
        q_s, k_s, q_t = q_s_n, k_s_n, q_t_n
    batched = q_s.dim() == 3
    as4 = (lambda t: t.unsqueeze(1)) if batched else (lambda t: t.unsqueeze(0).unsqueeze(0))
    scale = 1.0 / (float(temperature) * float(kd_temperature))
    qs4, qt4 = as4(q_s), as4(q_t)
    ks4 = qs4 if k_s is q_s else as4(k_s)  # one view per tensor: the core sees the self-relation
    kt4 = qt4 if k_t is q_t else as4(k_t)
    kl = relational_kl_core(qs4, ks4, qt4, kt4, scale_s=scale, scale_t=scale, segment_size=S, backend=backend,
                            unit_rows=normalize)
    kl = kl.squeeze(1) if batched else kl.squeeze(1).squeeze(0)
    if segment_size is None:
        kl = kl.squeeze(-1)
    return reduce_kl(kl, reduction)


def relational_kl_reference(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, *,
                            temperature: float = 1.0, kd_temperature: float = 1.0,
                            segment_size: int | None = None, normalize: bool = False,
                            reduction: str = "mean", process_group=None) -> torch.Tensor:
    """The dense formula of :func:`relational_kl` (materialises the logits; the ground truth in tests)."""
    q_t, k_t = q_t.detach(), k_t.detach()
    if normalize:
        q_s, k_s = F.normalize(q_s, dim=-1), F.normalize(k_s, dim=-1)
        q_t, k_t = F.normalize(q_t, dim=-1), F.normalize(k_t, dim=-1)
    tau = temperature * kd_temperature
    ls = q_s @ k_s.transpose(-1, -2) / tau
    lt = q_t @ k_t.transpose(-1, -2) / tau
    M = ls.shape[-1]
    S = segment_size or M
    ls = ls.unflatten(-1, (M // S, S))
    lt = lt.unflatten(-1, (M // S, S))
    kl = (F.softmax(lt, -1) * (F.log_softmax(lt, -1) - F.log_softmax(ls, -1))).sum(-1)
    if segment_size is None:
        kl = kl.squeeze(-1)
    return reduce_kl(kl, reduction)

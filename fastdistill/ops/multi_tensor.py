"""Multi-tensor parameter ops: one kernel launch over every tensor of a parameter list.

* :func:`moment_dot`: the preconditioned inner product ``sum_i <a_i, b_i / (sqrt(v_i) + eps)>`` of two
  gradient lists (the parameter-space moment of Moment Matching, ``g1^T Lambda g2``).
* :func:`preconditioned_perturb_`: ``theta_i -= step * g_i / (sqrt(v_i) + eps)`` in place (the teacher
  perturbation ``theta' = theta - eps Lambda g1`` of the parameter-space variant).
* :func:`clip_parameters_`: ``theta_i.clamp_(-bound, bound)`` in place (WGAN weight clipping).

Backends: ``cuda`` (csrc/multi_tensor/multi_tensor.cu: one launch for any number of tensors, a
device-side table of pointers) and ``cpp`` (the C++ CPU kernels), and the plain-PyTorch reference.
Lists may mix dtypes (bf16/fp16/fp32/fp64 per tensor, e.g. bf16 parameters with fp32 optimizer
state); arithmetic is fp32 (fp64 for triples that hold an fp64 tensor), each operation correctly
rounded (IEEE), so the cuda and cpp kernels agree bit for bit. The reference uses the same operation
order, but PyTorch's vectorised CPU ``sqrt`` is not always correctly rounded: it can differ by an ulp.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from .. import dispatch
from .._validation import FLOAT_DTYPES
from ._common import autocast_op

__all__ = [
    "moment_dot",
    "preconditioned_perturb_",
    "clip_parameters_",
    "moment_dot_reference",
    "preconditioned_perturb_reference_",
    "clip_parameters_reference_",
]

dispatch.register_op("moment_dot", ["cuda", "cpp"], fp64=["cuda", "cpp"])
dispatch.register_op("preconditioned_perturb_", ["cuda", "cpp"], fp64=["cuda", "cpp"])
dispatch.register_op("clip_parameters_", ["cuda", "cpp"], fp64=["cuda", "cpp"])

TensorList = Sequence[torch.Tensor]


# ----------------------------------------------------------------------------- validation

def _as_list(op: str, name: str, value: object, *, allow_module: bool = False) -> list[torch.Tensor]:
    if allow_module and isinstance(value, torch.nn.Module):
        value = list(value.parameters())
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got a single tensor (wrap it in a list)")
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got {type(value).__name__}")
    out = list(value)
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name}[{i}] must be float32, float16, bfloat16 or float64, got {t.dtype}")
    return out


def _check_pairs(op: str, ref_name: str, ref: list[torch.Tensor], name: str, other: list[torch.Tensor]) -> None:
    if len(other) != len(ref):
        raise ValueError(f"{op}: {name} has {len(other)} tensors but {ref_name} has {len(ref)}")
    for i, (r, o) in enumerate(zip(ref, other)):
        if r.shape != o.shape:
            raise ValueError(f"{op}: {name}[{i}] has shape {tuple(o.shape)} but {ref_name}[{i}] has shape "
                             f"{tuple(r.shape)}")


def _check_one_device(op: str, named: dict[str, list[torch.Tensor]]) -> None:
    first: tuple[str, torch.device] | None = None
    for name, tensors in named.items():
        for i, t in enumerate(tensors):
            if first is None:
                first = (f"{name}[{i}]", t.device)
            elif t.device != first[1]:
                raise ValueError(f"{op}: all tensors must be on one device (no CPU/CUDA mix); {first[0]} is on "
                                 f"{first[1]} but {name}[{i}] is on {t.device}")


def _check_eps(op: str, eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a number, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be finite and >= 0, got {eps}")
    return eps


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots in some dim order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _dense_like(ref: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` laid out like ``ref`` (a dense tensor), copying only when the strides differ."""
    if t.stride() == ref.stride() and _is_dense(t):
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)


def _layout_for_kernel(ref: list[torch.Tensor], *others: list[torch.Tensor] | None,
                       ref_name: str, op: str, inplace: bool) -> tuple[list[torch.Tensor], ...]:
    """The compiled kernels walk each tensor as one flat span: every tensor dense, pairs equally strided.

    Read-only tensors are copied into a matching layout when needed (rare: parameters, gradients and
    optimizer state share layouts); an in-place target must already be dense.
    """
    fixed_ref = []
    for i, t in enumerate(ref):
        if _is_dense(t):
            fixed_ref.append(t)
        elif inplace:
            raise ValueError(f"{op}: {ref_name}[{i}] must be non-overlapping and dense (e.g. contiguous) to be "
                             f"updated in place; got strides {t.stride()} for shape {tuple(t.shape)}")
        else:
            fixed_ref.append(t.contiguous())
    out: list[list[torch.Tensor] | None] = [fixed_ref]
    for lst in others:
        out.append(None if lst is None else [_dense_like(r, t) for r, t in zip(fixed_ref, lst)])
    return tuple(out)


def _wide(*lists: list[torch.Tensor] | None) -> bool:
    return any(t.dtype == torch.float64 for lst in lists if lst is not None for t in lst)


# ----------------------------------------------------------------------------- references

def moment_dot_reference(grads_a: TensorList, grads_b: TensorList, precond: TensorList | None = None,
                         eps: float = 1e-8) -> torch.Tensor:
    """Plain PyTorch: ``sum_i sum(a_i * b_i / (sqrt(v_i) + eps))`` in fp32 (fp64 if any input is fp64)."""
    acc = torch.float64 if _wide(list(grads_a), list(grads_b), None if precond is None else list(precond)) \
        else torch.float32
    device = grads_a[0].device if len(grads_a) else torch.device("cpu")
    total = torch.zeros((), dtype=acc, device=device)
    for i, (a, b) in enumerate(zip(grads_a, grads_b)):
        term = a.to(acc) * b.to(acc)
        if precond is not None:
            term = term / (precond[i].to(acc).sqrt() + eps)
        total = total + term.sum()
    return total


@torch.no_grad()
def preconditioned_perturb_reference_(params: TensorList, grads: TensorList, precond: TensorList | None = None,
                                      step: float = 1.0, eps: float = 1e-8) -> None:
    """Plain PyTorch: ``p.copy_(p - (g / (sqrt(v) + eps)) * step)`` per tensor, computed in fp32 (fp64 when
    the triple holds an fp64 tensor), rounded once to ``p``'s dtype: the kernels' rounding order."""
    for i, (p, g) in enumerate(zip(params, grads)):
        v = None if precond is None else precond[i]
        acc = torch.float64 if _wide([p, g], None if v is None else [v]) else torch.float32
        u = g.to(acc)
        if v is not None:
            u = u / (v.to(acc).sqrt() + eps)
        p.copy_(p.to(acc) - u * step)


@torch.no_grad()
def clip_parameters_reference_(params: TensorList, bound: float) -> None:
    """Plain PyTorch: ``p.clamp_(-bound, bound)`` per tensor."""
    for p in params:
        p.clamp_(-bound, bound)


# ----------------------------------------------------------------------------- custom-op glue

def _compiled_op(name: str):
    try:
        return getattr(torch.ops.fastdistill, name)
    except (AttributeError, RuntimeError):  # extension not built, or built before this op existed
        return None


_DOT = _compiled_op("moment_dot")
_PERTURB = _compiled_op("preconditioned_perturb_")
_CLIP = _compiled_op("clip_parameters_")

if _DOT is not None:

    @torch.library.register_fake("fastdistill::moment_dot")
    def _moment_dot_fake(grads_a, grads_b, precond, eps):
        wide = _wide(list(grads_a), list(grads_b), None if precond is None else list(precond))
        return grads_a[0].new_empty((), dtype=torch.float64 if wide else torch.float32)

    def _moment_dot_setup(ctx, inputs, output):
        grads_a, grads_b, precond, eps = inputs
        ctx.n = len(grads_a)
        ctx.has_v = precond is not None
        ctx.eps = eps
        ctx.save_for_backward(*grads_a, *grads_b, *(precond if precond is not None else ()))

    def _moment_dot_backward(ctx, grad_out):
        # d/da_i = go * b_i / d_i, d/db_i = go * a_i / d_i, d/dv_i = -go * a_i b_i / (2 sqrt(v_i) d_i^2)
        # with d_i = sqrt(v_i) + eps: a rarely used path (monitoring is forward-only), in plain torch ops.
        saved = ctx.saved_tensors
        n = ctx.n
        a, b = saved[:n], saved[n:2 * n]
        v = saved[2 * n:] if ctx.has_v else [None] * n
        ga, gb, gv = [], [], []
        for ai, bi, vi in zip(a, b, v):
            acc = torch.float64 if _wide([ai, bi], None if vi is None else [vi]) else torch.float32
            go = grad_out.to(acc)
            if vi is None:
                ga.append((go * bi.to(acc)).to(ai.dtype))
                gb.append((go * ai.to(acc)).to(bi.dtype))
            else:
                root = vi.to(acc).sqrt()
                d = root + ctx.eps
                ga.append((go * bi.to(acc) / d).to(ai.dtype))
                gb.append((go * ai.to(acc) / d).to(bi.dtype))
                gv.append((-go * ai.to(acc) * bi.to(acc) / (2 * root * d * d)).to(vi.dtype))
        return ga, gb, (gv if ctx.has_v else None), None

    torch.library.register_autograd("fastdistill::moment_dot", _moment_dot_backward,
                                    setup_context=_moment_dot_setup)

if _PERTURB is not None:

    @torch.library.register_fake("fastdistill::preconditioned_perturb_")
    def _perturb_fake(params, grads, precond, step, eps):
        return None

if _CLIP is not None:

    @torch.library.register_fake("fastdistill::clip_parameters_")
    def _clip_fake(params, bound):
        return None


# ----------------------------------------------------------------------------- public API

@autocast_op("none")  # elementwise: nothing cast; the body never sees the caller's autocast
def moment_dot(grads_a: TensorList, grads_b: TensorList, precond: TensorList | None = None, *,
               eps: float = 1e-8) -> torch.Tensor:
    """Preconditioned inner product of two tensor lists, in one multi-tensor launch.

    ``sum_i sum(a_i * b_i / (sqrt(v_i) + eps))`` where ``v = precond`` (a diagonal second-moment
    estimate such as Adam's ``exp_avg_sq``); with ``precond=None`` it is the plain ``sum_i <a_i, b_i>``
    and ``eps`` is unused.

    Args:
        grads_a, grads_b: equally long lists of floating tensors (fp32/bf16/fp16/fp64, dtypes may
            differ per tensor), ``grads_b[i].shape == grads_a[i].shape``; empty tensors are allowed.
        precond: ``None`` or a list like ``grads_a`` of non-negative tensors (any floating dtype).
        eps: ``>= 0``, added to ``sqrt(v)``.

    Returns:
        A 0-d fp32 tensor (fp64 if any input is fp64) on the inputs' device. Accumulation is fp32 or
        wider, and deterministic: the same inputs give the same bits on every call. Differentiable
        with respect to all three lists.
    """
    op = "moment_dot"
    a = _as_list(op, "grads_a", grads_a)
    b = _as_list(op, "grads_b", grads_b)
    v = None if precond is None else _as_list(op, "precond", precond)
    _check_pairs(op, "grads_a", a, "grads_b", b)
    if v is not None:
        _check_pairs(op, "grads_a", a, "precond", v)
    eps = _check_eps(op, eps)
    _check_one_device(op, {"grads_a": a, "grads_b": b, **({"precond": v} if v is not None else {})})
    if not a:
        return torch.zeros((), dtype=torch.float32)
    backend = dispatch.select_backend(op, a[0])
    if backend == "reference":
        return moment_dot_reference(a, b, v, eps)
    a, b, v = _layout_for_kernel(a, b, v, ref_name="grads_a", op=op, inplace=False)
    return _DOT(a, b, v, eps)


@autocast_op("none")  # elementwise: nothing cast; the body never sees the caller's autocast
def preconditioned_perturb_(params: TensorList, grads: TensorList, precond: TensorList | None = None, *,
                            step: float, eps: float = 1e-8) -> None:
    """In place ``theta_i -= step * g_i / (sqrt(v_i) + eps)`` over every tensor, in one launch.

    With ``precond=None`` it is ``theta_i -= step * g_i`` (``eps`` unused). Each element is computed in
    fp32 (fp64 when its triple holds an fp64 tensor) and rounded once to the parameter's dtype.

    Undoing a perturbation: calling again with ``-step`` (same ``grads``, ``precond``) returns every
    element to within one rounding of its old value: ``|theta'' - theta| <= ulp`` at the larger of the
    two magnitudes. Most elements come back bit-exactly (over 99% in fp32 tests), but no in-place scheme
    can guarantee it for all: rounding into a coarser binade maps two neighbouring values to one, and
    an exact tie rounds to even both ways, so the old value is lost. Keep a copy (as
    :class:`fastdistill.nn.MomentMatchingDistiller` does by default) where the
    weights must come back bit for bit; in bf16 one ulp is 2^-8 relative, so repeated perturb/undo
    cycles without a copy drift.

    Args:
        params: tensors updated in place (non-overlapping and dense; any floating dtype). Leaf
            parameters that require grad are fine: the update runs under ``torch.no_grad()``.
        grads: list like ``params`` (same shapes; dtypes may differ).
        precond: ``None`` or a list like ``params`` of non-negative second moments.
        step: a finite number; negative values move the other way (undo).
        eps: ``>= 0``.
    """
    op = "preconditioned_perturb_"
    p = _as_list(op, "params", params)
    g = _as_list(op, "grads", grads)
    v = None if precond is None else _as_list(op, "precond", precond)
    _check_pairs(op, "params", p, "grads", g)
    if v is not None:
        _check_pairs(op, "params", p, "precond", v)
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        raise TypeError(f"{op}: step must be a number, got {type(step).__name__}")
    step = float(step)
    if not math.isfinite(step):
        raise ValueError(f"{op}: step must be finite, got {step}")
    eps = _check_eps(op, eps)
    _check_one_device(op, {"params": p, "grads": g, **({"precond": v} if v is not None else {})})
    if not p:
        return
    backend = dispatch.select_backend(op, p[0])
    if backend == "reference":
        preconditioned_perturb_reference_(p, g, v, step, eps)
        return
    p, g, v = _layout_for_kernel(p, g, v, ref_name="params", op=op, inplace=True)
    with torch.no_grad():
        _PERTURB(p, g, v, step, eps)


@autocast_op("none")  # elementwise: nothing cast; the body never sees the caller's autocast
def clip_parameters_(params_or_module: TensorList | torch.nn.Module, bound: float) -> None:
    """Clamp every parameter to ``[-bound, bound]`` in place, in one launch (WGAN weight clipping).

    Same result as ``for p in params: p.clamp_(-bound, bound)`` (NaN stays NaN).

    Args:
        params_or_module: a list of floating tensors, or an ``nn.Module`` (its ``parameters()``).
        bound: finite, ``>= 0``.
    """
    op = "clip_parameters_"
    p = _as_list(op, "params", params_or_module, allow_module=True)
    if isinstance(bound, bool) or not isinstance(bound, (int, float)):
        raise TypeError(f"{op}: bound must be a number, got {type(bound).__name__}")
    bound = float(bound)
    if not math.isfinite(bound) or bound < 0:
        raise ValueError(f"{op}: bound must be finite and >= 0, got {bound}")
    _check_one_device(op, {"params": p})
    if not p:
        return
    backend = dispatch.select_backend(op, p[0])
    if backend == "reference":
        clip_parameters_reference_(p, bound)
        return
    (p,) = _layout_for_kernel(p, ref_name="params", op=op, inplace=True)
    with torch.no_grad():
        _CLIP(p, bound)

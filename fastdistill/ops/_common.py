"""Helpers shared by the ops in :mod:`fastdistill.ops` (one section per concern).

Autocast
--------
Inside ``torch.autocast(device_type, dtype=X)`` every fastdistill op behaves like the torch op it
stands for, identically on every backend (``reference``, ``triton``, ``cpp``, ``cuda``):

* **Relational ops** (:func:`~fastdistill.relational_kl`, :func:`~fastdistill.fused_rdd_loss`,
  :func:`~fastdistill.memory_p2p_loss`, :func:`~fastdistill.attention_kl`) are GEMMs followed by a
  softmax/KL, like ``matmul`` (autocast's lower-precision list): their GEMM operands (``q_s, k_s, q_t,
  k_t``; the feature maps and the bank) are cast to ``X`` on entry. The log-sum-exps, the KL and the
  reduction stay fp32 and the loss is fp32, as outside autocast. So under autocast ``op(x)`` equals
  ``op(x.to(X))`` outside it.
* :func:`~fastdistill.fused_attention` behaves like ``F.scaled_dot_product_attention`` (also on that
  list): ``q``, ``k``, ``v`` and a float ``attn_mask`` are cast to ``X`` and the output is ``X``; mixed
  q/k/v dtypes are therefore accepted under autocast (outside it they are a TypeError, as in SDPA).
* :func:`~fastdistill.rcfd_loss` (``log_softmax``/``kl_div`` on logits: autocast's fp32 list): inputs
  are cast to fp32 (it computed in fp32 already).
* **Elementwise ops and mse-style losses** (diffusion steps, PD / moment-matching / BOOT losses,
  adversarial losses, gradient penalty, routing, multi-tensor): autocast does not cast elementwise
  math, and mse-style losses compute in fp32 anyway, so no input is cast; the ops give the dtypes and
  values they give outside autocast.

Only tensors autocast itself would cast are cast: floating tensors other than float64 (fp64 stays
fp64; fp16 becomes bf16 under a bf16 autocast, as for ``matmul``), and only when autocast is enabled
for the tensors' device type (a CUDA autocast leaves CPU tensors alone). The casts are differentiable,
so gradients come back in the callers' dtypes. After casting, the op's body -- the reference math and
the custom ops' forward and backward -- runs under ``torch.autocast(device_type, enabled=False)``: no
backend ever sees the caller's autocast, so a ``matmul`` inside a reference cannot silently become a
bf16 GEMM on one backend while the kernel of another computes in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch

__all__ = ["AUTOCAST_POLICIES", "autocast_op", "autocast_device_type", "autocast_cast", "no_autocast"]

# ----------------------------------------------------------------------------------------------
# Autocast

#: ``"lower"``: cast like ``matmul``/SDPA (to the autocast dtype); ``"fp32"``: like autocast's fp32
#: list (to float32); ``"none"``: cast nothing (elementwise ops). Every policy shields the op's body.
AUTOCAST_POLICIES: tuple[str, ...] = ("lower", "fp32", "none")

_F = TypeVar("_F", bound=Callable[..., Any])


def _first_device_type(values: Any) -> Optional[str]:
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device.type
        if isinstance(v, (list, tuple)):
            found = _first_device_type(v)
            if found is not None:
                return found
    return None


def autocast_device_type(*values: Any) -> Optional[str]:
    """The device type of the first tensor among ``values`` (lists searched) when autocast is enabled
    for it, else None (no tensor, or autocast off for that device type)."""
    device_type = _first_device_type(values)
    if device_type is None or device_type == "meta":  # no autocast exists for meta tensors
        return None
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know: nothing to mirror
        return None
    return device_type if enabled else None


def autocast_cast(value: Any, dtype: torch.dtype) -> Any:
    """``value`` cast to ``dtype`` when autocast would cast it (a floating tensor, not float64); other
    values (None, integer tensors, float64 tensors, non-tensors) pass unchanged. Lists/tuples elementwise."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.dtype != torch.float64 and value.dtype != dtype:
            return value.to(dtype)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(autocast_cast(v, dtype) for v in value)
    return value


@contextlib.contextmanager
def no_autocast(device_type: Optional[str]) -> Iterator[None]:
    """Disable autocast for ``device_type`` inside the block (nothing when ``device_type`` is None)."""
    if device_type is None:
        yield
        return
    with torch.autocast(device_type, enabled=False):
        yield


def autocast_op(policy: str, *cast: str) -> Callable[[_F], _F]:
    """Decorator giving a public op the autocast behaviour of the module docstring.

    ``policy`` is one of :data:`AUTOCAST_POLICIES`; ``cast`` names the parameters (tensors, or lists
    of tensors) it applies to. Outside autocast the op is called unchanged. Inside, the named
    arguments are cast (:func:`autocast_cast`) and the op runs with autocast disabled for the
    tensors' device type.
    """
    if policy not in AUTOCAST_POLICIES:
        raise ValueError(f"autocast_op: policy must be one of {AUTOCAST_POLICIES}, got {policy!r}")
    if policy == "none" and cast:
        raise ValueError("autocast_op: policy 'none' casts nothing; do not name parameters")

    def decorate(fn: _F) -> _F:
        params = list(inspect.signature(fn).parameters.values())
        names = [p.name for p in params]
        unknown = [n for n in cast if n not in names]
        if unknown:
            raise ValueError(f"autocast_op({fn.__name__}): no parameter(s) {unknown}")
        positional = {n: names.index(n) for n in cast
                      if params[names.index(n)].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                         inspect.Parameter.POSITIONAL_OR_KEYWORD)}

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            device_type = autocast_device_type(args, tuple(kwargs.values()))
            if device_type is None:
                return fn(*args, **kwargs)
            if cast:
                dtype = torch.get_autocast_dtype(device_type) if policy == "lower" else torch.float32
                args_l = list(args)
                for n in cast:
                    i = positional.get(n)
                    if i is not None and i < len(args_l):
                        args_l[i] = autocast_cast(args_l[i], dtype)
                    elif n in kwargs:
                        kwargs[n] = autocast_cast(kwargs[n], dtype)
                args = tuple(args_l)
            with torch.autocast(device_type, enabled=False):
                return fn(*args, **kwargs)

        wrapper.__autocast_policy__ = (policy, cast)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate

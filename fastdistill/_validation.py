"""Input checks shared by every public op, so that bad input fails with one clear message.

Each helper raises ``TypeError`` for a wrong kind of value and ``ValueError`` for a wrong value,
naming the op and the argument.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(op: str, name: str, t: object, *, ndim: int | Sequence[int] | None = None,
                 floating: bool = True, dtypes: Iterable[torch.dtype] | None = None) -> torch.Tensor:
    """``t`` is a tensor (of ``ndim`` dims, of a floating or listed dtype)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{op}: {name} must have {want} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{op}: {name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    elif floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor (float32, float16, bfloat16 or float64), "
                        f"got {t.dtype}")
    return t


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """All given tensors live on one device; returns it."""
    present = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        detail = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"{op}: all tensors must be on the same device; got {detail}")
    return devices.pop() if devices else torch.device("cpu")


def check_same_shape(op: str, **tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the tensors unless all given tensors have one shape."""
    present = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    shapes = {tuple(v.shape) for v in present.values()}
    if len(shapes) > 1:
        detail = ", ".join(f"{k} {tuple(v.shape)}" for k, v in present.items())
        raise ValueError(f"{op}: shapes must match; got {detail}")


def check_positive(op: str, name: str, value: object, *, allow_zero: bool = False) -> float:
    """``value`` is a finite real number > 0 (or >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{op}: {name} must be finite and {bound}, got {value}")
    return value


def check_choice(op: str, name: str, value: object, choices: Sequence[object]) -> object:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` naming ``name``."""
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {list(choices)}, got {value!r}")
    return value


def check_per_sample(op: str, name: str, value: object, batch: int, *, device: torch.device) -> torch.Tensor:
    """A per-sample coefficient: a Python number, a 0-d tensor or a (B,) tensor -> fp32 (B,) tensor."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a number or a tensor, got bool")
    if isinstance(value, (int, float)):
        return torch.full((batch,), float(value), dtype=torch.float32, device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a number or a tensor, got {type(value).__name__}")
    if not (value.dtype.is_floating_point):
        raise TypeError(f"{op}: {name} must be floating, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{op}: {name} is on {value.device} but the inputs are on {device}")
    if value.dim() == 0:
        return value.float().expand(batch).contiguous()
    if value.dim() == 1 and value.shape[0] == batch:
        return value.float().contiguous()
    raise ValueError(f"{op}: {name} must be a scalar or have shape ({batch},), got {tuple(value.shape)}")

"""Output allocation for kernel launchers, with poisoning for tests.

Every launcher allocates the buffers its kernels write through :func:`empty`. Normally that is
``torch.empty``. Under :func:`poison_outputs` (the test suite turns it on for every test) the
buffers are filled with NaN (floating) or the dtype's minimum (integers), so an element a kernel
forgot to write shows up as a failed comparison instead of passing by luck.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import torch

_POISON_DEPTH = [0]


def poisoning() -> bool:
    """True inside :func:`poison_outputs` or when ``FASTDISTILL_POISON_OUTPUTS=1``."""
    return _POISON_DEPTH[0] > 0 or os.environ.get("FASTDISTILL_POISON_OUTPUTS", "0") == "1"


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Fill every kernel output buffer with a poison value before the kernel runs."""
    _POISON_DEPTH[0] += 1
    try:
        yield
    finally:
        _POISON_DEPTH[0] -= 1


def poison_value(dtype: torch.dtype) -> float | int | bool:
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    if dtype == torch.bool:
        return True
    return torch.iinfo(dtype).min


def empty(shape: Sequence[int] | torch.Size, *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty``, or a poison-filled tensor while poisoning is on."""
    if poisoning():
        return torch.full(tuple(shape), poison_value(dtype), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def empty_like(t: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Contiguous ``empty`` with ``t``'s shape and device (and dtype unless given)."""
    return empty(t.shape, dtype=dtype or t.dtype, device=t.device)

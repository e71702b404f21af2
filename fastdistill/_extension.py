"""Loading the compiled extension ``fastdistill._C`` and reporting what it holds.

The extension is optional at import time: a source checkout that was never built, or a build
whose shared object fails to load (say, built against another torch), still imports fastdistill
and runs the Triton and reference backends. The reason is kept and shown by ``fastdistill info``
and in the error raised when someone forces the ``cuda`` or ``cpp`` backend.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

_C: ModuleType | None = None
_LOAD_ERROR: str | None = None


def _load() -> None:
    global _C, _LOAD_ERROR
    try:
        _C = importlib.import_module("fastdistill._C")
    except ImportError as exc:  # not built, or built against another torch
        _C = None
        _LOAD_ERROR = f"{type(exc).__name__}: {exc}"


_load()


def is_loaded() -> bool:
    """True when ``fastdistill._C`` imported (its ops are then under ``torch.ops.fastdistill``)."""
    return _C is not None


def load_error() -> str | None:
    """Why the extension did not load, or None when it did."""
    return _LOAD_ERROR


def build_info() -> dict[str, Any]:
    """Facts fixed at compile time (``with_cuda``, ``cuda_version``, ``torch_version``), or {}."""
    if _C is None:
        return {}
    return dict(_C.build_info())


def location() -> str | None:
    """File the extension was loaded from."""
    return getattr(_C, "__file__", None) if _C is not None else None


def compiled_with_cuda() -> bool:
    """True when the CUDA sources were compiled into the loaded extension."""
    return bool(build_info().get("with_cuda", False))


def registered_ops() -> list[str]:
    """Names of the ``torch.ops.fastdistill`` operators defined in C++ (sorted).

    Ops defined from Python (``torch.library.custom_op`` / ``triton_op``: the Triton ops) share the
    namespace but are not the extension's, so they are left out.
    """
    if _C is None:
        return []
    try:
        from torch._library.custom_ops import OPDEFS as python_ops
    except ImportError:  # private registry; without it every schema counts as C++
        python_ops = {}
    names = set()
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("fastdistill::") and schema.name not in python_ops:
            names.add(schema.name.split("::", 1)[1])
    return sorted(names)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``fastdistill::<op>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA", "Meta")."""
    if _C is None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdistill::{op}", dispatch_key))
    except RuntimeError:
        return False

"""Loading the compiled extension ``fastdistill._C`` and reporting what it holds.

The extension is optional at import time: a source checkout that was never built, or a build
whose shared object fails to load, still imports fastdistill and runs the Triton and reference
backends. The reason is kept and shown by ``fastdistill info`` and in the error raised when
someone forces the ``cuda`` or ``cpp`` backend.

Rebuild guard. An extension compiled against one torch and loaded into another fails in obscure
ways (undefined symbols, or worse, wrong results), so ``_C`` is not loaded when the torch running
now differs from the one it was built against. What it was built against is recorded by
``setup.py`` in ``fastdistill/_build_info.py`` next to the extension (torch version, torch's CUDA
version, the C++11 ABI flag) and compared *before* ``_C`` is imported. On a mismatch one
:class:`ExtensionMismatchWarning` names both versions and the command that rebuilds; the ``cuda`` and
``cpp`` backends then report the extension as not loaded, and every op falls back to the backends
that need no extension (Triton, the reference). A build without the record (made by an older
``setup.py``) is loaded and checked against the torch version compiled into it instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType
from typing import Any

import torch

_C: ModuleType | None = None
_LOAD_ERROR: str | None = None
_RECORD: dict[str, Any] | None = None

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class ExtensionMismatchWarning(UserWarning):
    """``fastdistill._C`` was built against another torch than the one running, so it is not used."""


def running_build() -> dict[str, Any]:
    """The facts of the running torch that a compiled ``_C`` must match (keys as in the record)."""
    return {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }


def _describe(build: dict[str, Any]) -> str:
    parts = []
    if "torch_cuda" in build:
        parts.append(f"CUDA {build['torch_cuda']}" if build["torch_cuda"] else "CPU-only")
    if "cxx11_abi" in build:
        parts.append("C++11 ABI" if build["cxx11_abi"] else "pre-C++11 ABI")
    return f"torch {build.get('torch_version')}" + (f" ({', '.join(parts)})" if parts else "")


def rebuild_command() -> str:
    """The command that rebuilds ``_C`` against the running torch, for this kind of install."""
    root = os.path.dirname(_PACKAGE_DIR)
    if os.path.exists(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc")):
        return f"cd {root} && pip install --no-build-isolation -e ."
    return ("pip install --no-build-isolation --force-reinstall --no-deps --no-cache-dir fastdistill "
            "(or the sdist / source folder you installed from in place of `fastdistill`)")


def mismatch(built: dict[str, Any], running: dict[str, Any]) -> str | None:
    """``"built against torch A but torch B is running"`` when ``built`` differs from ``running``, else None.

    Keys missing from ``built`` are not compared (a record of an older build has fewer).
    """
    if all(built[k] == running.get(k) for k in ("torch_version", "torch_cuda", "cxx11_abi") if k in built):
        return None
    return f"built against {_describe(built)} but {_describe(running)} is running"


def _refuse(what: str) -> None:
    global _C, _LOAD_ERROR
    _C = None
    _LOAD_ERROR = f"{what}; rebuild it: {rebuild_command()}"
    warnings.warn(
        f"fastdistill._C was {what}, so the compiled extension is not used (an extension built for another "
        f"torch crashes or computes garbage): the cuda and cpp backends are off and every op runs on Triton or "
        f"the plain-PyTorch reference. Rebuild it against this torch: {rebuild_command()}",
        ExtensionMismatchWarning,
        stacklevel=3,
    )


def _read_record() -> dict[str, Any] | None:
    try:
        mod = importlib.import_module("fastdistill._build_info")
    except ImportError:
        return None
    record = getattr(mod, "BUILD", None)
    return dict(record) if isinstance(record, dict) else None


def _load() -> None:
    global _C, _LOAD_ERROR, _RECORD
    _C, _LOAD_ERROR = None, None
    _RECORD = _read_record()
    try:
        present = importlib.util.find_spec("fastdistill._C") is not None
    except (ImportError, ValueError):
        present = False
    if present and _RECORD is not None:
        what = mismatch(_RECORD, running_build())
        if what is not None:  # checked before the shared object is loaded at all
            _refuse(what)
            return
    try:
        _C = importlib.import_module("fastdistill._C")
    except ImportError as exc:  # not built, or a broken build
        _C = None
        _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        return
    if _RECORD is None:  # no record: check what the extension itself says it was compiled against
        compiled = dict(_C.build_info()) if hasattr(_C, "build_info") else {}
        built = {"torch_version": compiled.get("torch_version"), "cxx11_abi": compiled.get("cxx11_abi")}
        running = dict(running_build(), torch_version=torch.__version__.split("+")[0])
        what = mismatch({k: v for k, v in built.items() if v is not None}, running)
        if what is not None:
            _refuse(what)


_load()


def recorded_build() -> dict[str, Any] | None:
    """What ``fastdistill/_build_info.py`` says ``_C`` was built against, or None without a record."""
    return dict(_RECORD) if _RECORD is not None else None


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

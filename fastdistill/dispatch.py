"""The one place that decides which implementation of an op runs.

Every fastdistill op declares the backends it has (:func:`register_op`) and asks
:func:`select_backend` on each call. The backends are:

``triton``
    Triton kernels (``fastdistill.kernels``): CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1`` (the interpreter; slow, used by the CPU test suite).
``cuda``
    The compiled extension's CUDA kernels (``torch.ops.fastdistill.*``): CUDA tensors.
``cpp``
    The compiled extension's C++ CPU kernels: CPU tensors.
``reference``
    Plain PyTorch beside each op: the ground truth, and the CPU path of ops with no C++ kernel.

Automatic choice: on CUDA tensors the op's fast backends in the order the op declared them; on CPU
tensors ``cpp`` when the op has it, else ``reference``. When an op has fast backends for a device
but none of them can run (Triton missing, extension built without CUDA), the reference runs and a
:class:`FallbackWarning` saying why is emitted once per op and reason: never a silent slow path.

fp64 (one rule for every op): float64 inputs run on the backends the op declares fp64-native
(``register_op(..., fp64=...)``; by default only ``reference``, which computes in float64), on every
device, without a warning: the fast kernels accumulate in fp32 and would silently lose precision.
Forcing a backend that is not fp64-native on float64 inputs raises :class:`DtypeNotSupportedError`.

Forcing: ``FASTDISTILL_BACKEND=triton`` (or a per-op list, ``relational_kl=triton,segment_route=cpp``)
or ``with fastdistill.use_backend("reference"):``. A forced backend that the op lacks, or that
cannot run on the given tensors, raises :class:`BackendUnavailableError` with the reason.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from . import _extension, _triton

BACKENDS: tuple[str, ...] = ("triton", "cuda", "cpp", "reference")
_FAST_ON = {"cuda": ("triton", "cuda"), "cpu": ("cpp",)}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this op on these tensors (the message says why)."""


class DtypeNotSupportedError(BackendUnavailableError, TypeError):
    """A forced backend does not compute the inputs' dtype (fp64 on an fp32-accumulating kernel)."""


class FallbackWarning(UserWarning):
    """An op ran its reference implementation although a faster backend exists for the device."""


@dataclass(frozen=True)
class OpSpec:
    """The backends one op implements, fast ones in order of preference."""

    name: str
    backends: tuple[str, ...]
    #: Backends that compute float64 inputs in float64 (``reference`` always does).
    fp64_backends: tuple[str, ...] = ("reference",)


_REGISTRY: dict[str, OpSpec] = {}
# A plain module-level stack (not a ContextVar) so torch.compile traces through lookups.
_FORCED_STACK: list[tuple[str, frozenset[str] | None]] = []
_WARNED: set[tuple[str, str]] = set()
_RECORDERS: list[set[tuple[str, str]]] = []


def register_op(name: str, backends: Sequence[str], *, fp64: Sequence[str] = ()) -> OpSpec:
    """Declare op ``name`` and its fast backends (``reference`` is implied and always present).

    ``fp64``: the fast backends that compute float64 inputs in float64 (say, an exact permutation);
    float64 inputs never run on the others (see the module docstring).
    """
    unknown = [b for b in (*backends, *fp64) if b not in BACKENDS]
    if unknown:
        raise ValueError(f"register_op({name!r}): unknown backend(s) {unknown}; known: {BACKENDS}")
    ordered = tuple(b for b in backends if b != "reference") + ("reference",)
    not_declared = [b for b in fp64 if b not in ordered]
    if not_declared:
        raise ValueError(f"register_op({name!r}): fp64 backend(s) {not_declared} are not among {ordered}")
    spec = OpSpec(name, ordered, tuple(b for b in ordered if b in fp64 or b == "reference"))
    if name in _REGISTRY and _REGISTRY[name] != spec:
        raise ValueError(f"op {name!r} is already registered with backends {_REGISTRY[name].backends}")
    _REGISTRY[name] = spec
    return spec


def registered_ops() -> dict[str, OpSpec]:
    """All ops declared so far, by name."""
    return dict(_REGISTRY)


def _check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown fastdistill backend {backend!r}; choose one of {BACKENDS}")


def _parse_env(value: str) -> tuple[str | None, dict[str, str]]:
    """``triton`` -> ("triton", {}); ``a=triton,b=cpp`` -> (None, {"a": "triton", "b": "cpp"})."""
    value = value.strip()
    if not value or value == "auto":
        return None, {}
    if "=" not in value:
        _check_backend_name(value)
        return value, {}
    per_op: dict[str, str] = {}
    for item in value.split(","):
        op, _, backend = item.partition("=")
        op, backend = op.strip(), backend.strip()
        _check_backend_name(backend)
        per_op[op] = backend
    return None, per_op


def forced_backend(op: str) -> str | None:
    """The backend forced for ``op`` by :func:`use_backend` or ``FASTDISTILL_BACKEND``, if any."""
    for backend, ops in reversed(_FORCED_STACK):
        if ops is None or op in ops:
            return backend
    env = os.environ.get("FASTDISTILL_BACKEND", "")
    if env:
        everywhere, per_op = _parse_env(env)
        return per_op.get(op, everywhere)
    return None


@contextlib.contextmanager
def record_backends() -> Iterator[set[tuple[str, str]]]:
    """Collect the ``(op, backend)`` pairs selected inside the block (to report or assert what ran)."""
    seen: set[tuple[str, str]] = set()
    _RECORDERS.append(seen)
    try:
        yield seen
    finally:
        _RECORDERS.remove(seen)


@contextlib.contextmanager
def use_backend(backend: str, *, ops: Sequence[str] | None = None) -> Iterator[None]:
    """Force ``backend`` for every op (or only ``ops``) inside the block.

    >>> import fastdistill
    >>> with fastdistill.use_backend("reference"):
    ...     pass  # every fastdistill op here runs its plain-PyTorch reference
    """
    _check_backend_name(backend)
    _FORCED_STACK.append((backend, frozenset(ops) if ops is not None else None))
    try:
        yield
    finally:
        _FORCED_STACK.pop()


def why_unavailable(backend: str, device: torch.device | str) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device`` here, or None when it can."""
    _check_backend_name(backend)
    dev = torch.device(device).type
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton.cannot_run_on(dev)
    if backend in ("cuda", "cpp"):
        if not _extension.is_loaded():
            return f"the compiled extension fastdistill._C is not loaded ({_extension.load_error()})"
        if backend == "cuda":
            if dev != "cuda":
                return f"the cuda backend runs CUDA tensors only; got {dev} tensors"
            if not _extension.compiled_with_cuda():
                return "fastdistill._C was built without CUDA kernels (CPU-only torch or FASTDISTILL_BUILD_CUDA=0)"
            return None
        if dev != "cpu":
            return f"the cpp backend runs CPU tensors only; got {dev} tensors"
        return None
    return f"unknown backend {backend!r}"


def _device_of(tensors: Sequence[torch.Tensor | None]) -> torch.device:
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if not devices:
        return torch.device("cpu")
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(str(d) for d in devices)}")
    return devices.pop()


def select_backend(op: str, *tensors: torch.Tensor | None, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> str:
    """Pick the backend that runs ``op`` on ``tensors`` (see the module docstring for the rules).

    ``device`` names the device when the op has no tensor arguments to infer it from; ``dtype`` the
    compute dtype when it is not that of the tensors given (float64 anywhere among them, or as
    ``dtype``, selects an fp64-native backend).
    """
    backend = _select(op, tensors, device, dtype)
    for seen in _RECORDERS:
        seen.add((op, backend))
    return backend


def _is_fp64(tensors: Sequence[torch.Tensor | None], dtype: torch.dtype | None) -> bool:
    return dtype == torch.float64 or any(
        isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors)


def _select(op: str, tensors: Sequence[torch.Tensor | None], device: torch.device | str | None,
            dtype: torch.dtype | None = None) -> str:
    try:
        spec = _REGISTRY[op]
    except KeyError:
        raise KeyError(f"fastdistill op {op!r} was never registered with dispatch.register_op") from None
    device = torch.device(device) if device is not None else _device_of(tensors)
    fp64 = _is_fp64(tensors, dtype)
    forced = forced_backend(op)
    if forced is not None:
        if forced not in spec.backends:
            raise BackendUnavailableError(
                f"{op}: backend {forced!r} was forced, but {op} has no {forced} implementation "
                f"(it has: {', '.join(spec.backends)})"
            )
        if fp64 and forced not in spec.fp64_backends:
            raise DtypeNotSupportedError(
                f"{op}: backend {forced!r} was forced, but it accumulates in fp32 and does not take float64 "
                f"inputs; float64 runs on {', '.join(spec.fp64_backends)} (automatic dispatch picks it, or "
                f"`with fastdistill.use_backend('reference'):`)")
        reason = why_unavailable(forced, device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {forced!r} was forced but cannot run: {reason}")
        return forced
    candidates = spec.fp64_backends if fp64 else spec.backends
    fast = [b for b in candidates if b in _FAST_ON.get(device.type, ())]
    reasons = []
    for backend in fast:
        reason = why_unavailable(backend, device)
        if reason is None:
            return backend
        reasons.append(f"{backend}: {reason}")
    if reasons and device.type == "cuda":
        _warn_once(op, "; ".join(reasons))
    return "reference"


def _warn_once(op: str, reason: str) -> None:
    key = (op, reason)
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"fastdistill.{op}: running the slow reference implementation because no fast backend "
        f"can run here ({reason})",
        FallbackWarning,
        stacklevel=3,
    )


def available_backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    """Backends of ``op`` that can run on ``device`` in this process (tests parametrize over these)."""
    spec = _REGISTRY[op]
    return [b for b in spec.backends if why_unavailable(b, device) is None]

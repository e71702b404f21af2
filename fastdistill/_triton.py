"""Whether Triton can run here, and on which devices.

Triton compiles for CUDA GPUs. On CPU tensors it runs only through its interpreter, which must
be switched on with ``TRITON_INTERPRET=1`` *before* triton is first imported (the test suite's
``conftest.py`` does this). Nothing here imports triton eagerly unless asked.
"""

from __future__ import annotations

import os

# Cached by hand rather than with functools.lru_cache: torch.compile traces dispatch through here and
# warns about lru_cache wrappers; a module global is a plain constant to it.
_IMPORT_ERROR: list[str | None] = []


def import_error() -> str | None:
    """Why ``import triton`` fails, or None when it works (checked once per process)."""
    if not _IMPORT_ERROR:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install raising something else
            _IMPORT_ERROR.append(f"{type(exc).__name__}: {exc}")
        else:
            _IMPORT_ERROR.append(None)
    return _IMPORT_ERROR[0]


def available() -> bool:
    return import_error() is None


def version() -> str | None:
    if not available():
        return None
    import triton

    return triton.__version__


def interpret_mode() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def cannot_run_on(device_type: str) -> str | None:
    """Why Triton cannot run kernels on tensors of ``device_type``, or None when it can."""
    err = import_error()
    if err is not None:
        return f"triton is not importable ({err})"
    if interpret_mode():
        if device_type != "cpu":
            return "TRITON_INTERPRET=1 runs Triton kernels on CPU tensors only"
        return None
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
    return f"Triton kernels are not built for {device_type!r} tensors"

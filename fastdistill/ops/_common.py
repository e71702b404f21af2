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

Validation and value checks
---------------------------
Argument checks every op shares beyond :mod:`fastdistill._validation` (which checks one tensor or
value argument: type, dtype, ndim, device, shape, choice, per-sample coefficient): batched tensors and
pairs (:func:`check_batched`, :func:`check_batched_pair`), per-sample coefficients that keep fp64
(:func:`per_sample`), the working dtype (:func:`compute_dtype`), row views and broadcasting
(:func:`as_rows`, :func:`bcast`), diffusion schedules (:data:`PREDICTION_TYPES`, :data:`PRED_CODE`,
:func:`resolve_schedule`), and the host-sync policy of fastdistill:

* **value checks** (timestep ranges, positive scales, index ranges) read device memory, so they go
  through one switch, :func:`value_checks_enabled` (``validate=`` argument, else the
  ``FASTDISTILL_VALUE_CHECKS`` environment variable, else :func:`checks_are_free`: on for CPU tensors,
  off for CUDA tensors; always off while ``torch.compile`` traces), and an op's checks are batched
  into one host copy by :func:`raise_on_bad_values` (built with checks such as :func:`not_positive`);
* **no hidden syncs**: :func:`host_to_device` copies small host tables to a GPU without a blocking
  copy, :func:`draw_seed` draws a kernel seed from torch's RNG without reading device memory.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
from torch import Tensor

from .._validation import check_same_device, check_same_shape, check_tensor

__all__ = [
    # Autocast
    "AUTOCAST_POLICIES", "autocast_op", "autocast_device_type", "autocast_cast", "no_autocast",
    # Validation and value checks
    "PREDICTION_TYPES", "PRED_CODE", "VALUE_CHECKS_ENV", "Check", "compiling", "compute_dtype", "check_batched",
    "check_batched_pair", "per_sample", "bcast", "as_rows", "resolve_schedule", "checks_are_free",
    "value_checks_enabled", "raise_on_bad_values", "not_positive", "host_to_device", "draw_seed",
]

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


# ----------------------------------------------------------------------------------------------
# Validation and value checks

#: The model parameterisations of diffusers' schedulers, and their integer codes in the kernels.
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "sample", "v_prediction")
PRED_CODE: dict[str, int] = {"epsilon": 0, "sample": 1, "v_prediction": 2}


def compiling() -> bool:
    """True while torch.compile traces: value checks that need a host sync are skipped then."""
    return torch.compiler.is_compiling()


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 when any input is fp64 (the reference's working dtype)."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def check_batched(op: str, name: str, t: Any) -> Tensor:
    """A floating tensor with a batch dim and at least one element per sample."""
    check_tensor(op, name, t)
    if t.dim() < 1 or t.numel() == 0:
        raise ValueError(f"{op}: {name} must have a batch dim and be non-empty, got shape {tuple(t.shape)}")
    return t


def check_batched_pair(op: str, first: tuple[str, Any], second: tuple[str, Any]) -> torch.device:
    """``first`` (name, value) is a batched floating tensor and ``second`` a floating tensor of the same
    shape on the same device; returns that device."""
    (n1, t1), (n2, t2) = first, second
    check_batched(op, n1, t1)
    check_tensor(op, n2, t2)
    check_same_shape(op, **{n1: t1, n2: t2})
    return check_same_device(op, **{n1: t1, n2: t2})


def per_sample(op: str, name: str, value: Any, batch: int, device: torch.device) -> Tensor:
    """A per-sample coefficient (number, 0-d or (B,) tensor) -> (B,) float tensor on ``device``.

    fp64 values stay fp64 (the reference keeps them exact); everything else becomes fp32.
    """
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a number or a tensor, got bool")
    if isinstance(value, (int, float)):
        return torch.full((batch,), float(value), dtype=torch.float64, device=device)
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a number or a tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must be a floating tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{op}: {name} is on {value.device} but the inputs are on {device}")
    dt = torch.float64 if value.dtype == torch.float64 else torch.float32
    if value.dim() == 0:
        return value.to(dt).expand(batch).contiguous()
    if value.dim() == 1 and value.shape[0] == batch:
        return value.to(dt).contiguous()
    raise ValueError(f"{op}: {name} must be a number, a 0-d tensor or have shape ({batch},), "
                     f"got {tuple(value.shape)}")


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against ``like``."""
    return v.reshape((v.shape[0],) + (1,) * (like.dim() - 1))


#: Environment switch of the value checks: ``1`` turns them on on every device, ``0`` off on every
#: device; unset (or ``auto``): on where they cost no device sync (CPU), off elsewhere (CUDA).
VALUE_CHECKS_ENV = "FASTDISTILL_VALUE_CHECKS"


def checks_are_free(device: torch.device) -> bool:
    """Whether the host can read tensors on ``device`` without synchronising with it: True on CPU only.

    The device default of every opt-in value check in fastdistill (timestep ranges, positive scales,
    ``memory_p2p_loss``'s index range, the DDP gather's size check, ...) is this answer: the checks stay
    on for CPU tensors and are off for CUDA tensors, where each would cost a host sync.
    """
    return torch.device(device).type == "cpu"


def value_checks_enabled(device: torch.device, validate: bool | None = None) -> bool:
    """Whether to check input *values* (timestep ranges, positive scales, s != t, index ranges).

    Those checks read device memory: on CUDA each costs a host sync (an op's checks are batched into
    one copy), so they are **opt-in there**. In order of precedence:

    * skipped while ``torch.compile`` traces (a host read would break the graph);
    * ``validate=True`` / ``False`` (the op's ``validate=`` / ``check_index=`` argument) decides;
    * ``FASTDISTILL_VALUE_CHECKS=1`` turns them on everywhere, ``=0`` off everywhere;
    * otherwise :func:`checks_are_free`: on for CPU tensors (free there), off for CUDA tensors.
    """
    if compiling():
        return False
    if validate is not None:
        return bool(validate)
    env = os.environ.get(VALUE_CHECKS_ENV, "").strip().lower()
    if env in ("1", "true", "on", "yes"):
        return True
    if env in ("0", "false", "off", "no"):
        return False
    return checks_are_free(device)


Check = tuple[Callable[[], Tensor], Callable[[], str]]


def raise_on_bad_values(op: str, device: torch.device, checks: list[Check], validate: bool | None = None) -> None:
    """``checks``: (builder of a 0-d bool tensor, True when the input is bad; message builder) pairs.

    Nothing is computed when value checks are off (:func:`value_checks_enabled`: by default on CPU,
    off on CUDA); otherwise one device-to-host copy for all of them, and the messages are built only
    on failure.
    """
    if not checks or not value_checks_enabled(device, validate):
        return
    bad = torch.stack([flag().reshape(()) for flag, _ in checks]).cpu()
    for (_, message), is_bad in zip(checks, bad.tolist()):
        if is_bad:
            raise ValueError(f"{op}: {message()}")


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t.to(device)`` without a host sync for a small CPU tensor going to a GPU.

    A plain (blocking) host-to-device copy waits for the device (``torch.cuda.set_sync_debug_mode``
    reports it); a ``non_blocking`` copy of a pinned copy of ``t`` does not. Same values either way.
    """
    device = torch.device(device)
    if t.device == device or t.device.type != "cpu" or device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def draw_seed(generator: torch.Generator | None, limit: int = 2**31 - 1) -> int:
    """A kernel seed in ``[0, limit)`` from torch's RNG, without a device sync.

    * ``generator=None`` or a CPU generator: one draw of the CPU generator (``torch.manual_seed``
      makes it reproducible); host memory, so no device sync.
    * a CUDA (device) generator: its state lives on the host (seed and Philox offset), so the seed
      is a hash of ``(initial_seed(), get_offset())`` and the offset then advances by 4, as one
      draw would. Reproducible (same generator state, same seed) and distinct on each call; no
      device memory is read (the old ``torch.randint(..., device="cuda").item()`` was a sync).
    """
    if generator is None or generator.device.type == "cpu":
        return int(torch.randint(0, limit, (1,), generator=generator).item())
    offset = generator.get_offset()
    generator.set_offset(offset + 4)
    # splitmix64 finaliser of (seed, offset): well mixed, deterministic, host-only
    z = (generator.initial_seed() * 0x9E3779B97F4A7C15 + offset + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) % limit


def not_positive(name: str, v: Tensor) -> Check:
    """A check for :func:`raise_on_bad_values`: every value of ``v`` must be > 0."""
    return lambda: ~(v > 0).all(), lambda: f"{name} must be > 0 for every sample, got min {v.min().item():.6g}"


def as_rows(t: Tensor) -> Tensor:
    """(B, ...) -> a contiguous (B, N) view/copy: the row layout every elementwise kernel takes."""
    return t.reshape(t.shape[0], -1).contiguous()


def resolve_schedule(op: str, alphas_cumprod: Any, final_alpha_cumprod: float | None, device: torch.device
                     ) -> tuple[Tensor, float]:
    """``(alphas_cumprod on device, final_alpha_cumprod)`` from a (T,) tensor or a diffusers scheduler.

    ``final_alpha_cumprod=None`` takes the scheduler's (else 1.0, diffusers' ``set_alpha_to_one``);
    it must be a number in (0, 1]. The table moves to ``device`` without a host sync.
    """
    sched = None
    if not isinstance(alphas_cumprod, Tensor) and hasattr(alphas_cumprod, "alphas_cumprod"):
        sched = alphas_cumprod
        alphas_cumprod = sched.alphas_cumprod
    check_tensor(op, "alphas_cumprod", alphas_cumprod, ndim=1)
    if alphas_cumprod.numel() == 0:
        raise ValueError(f"{op}: alphas_cumprod is empty")
    if final_alpha_cumprod is None:
        final = getattr(sched, "final_alpha_cumprod", 1.0) if sched is not None else 1.0
        final_alpha_cumprod = float(final)
    if isinstance(final_alpha_cumprod, bool) or not isinstance(final_alpha_cumprod, (int, float)):
        raise TypeError(f"{op}: final_alpha_cumprod must be a number, got {type(final_alpha_cumprod).__name__}")
    if not 0.0 < float(final_alpha_cumprod) <= 1.0:
        raise ValueError(f"{op}: final_alpha_cumprod must be in (0, 1], got {final_alpha_cumprod}")
    # diffusers keeps alphas_cumprod on the CPU; the table is small, so move it to the inputs.
    return host_to_device(alphas_cumprod, device), float(final_alpha_cumprod)

"""Autograd-aware collectives for cross-sample losses under DDP / FSDP.

Every cross-sample loss in fastdistill takes ``process_group=``, and its default is ``None``: each rank
computes the loss on its **local** batch, exactly what the official code of the method computes on that
rank (the official RDD loop, for one, never gathers the features of its relational losses). No collective
runs, so a rank may skip the call without hanging the others.

The **global-batch** objective is one argument away: ``process_group=WORLD`` (``"world"``) or a
``ProcessGroup``. The loss is then computed over the global batch (same value on every rank) from inputs
gathered with an autograd-aware all-gather. Each rank's local inputs receive ``W * dL/dx`` (the backward of
the gather is a reduce-scatter *sum* of the W identical losses' gradients), and DDP's 1/W gradient average
gives exactly the gradient of the full-batch loss. A no-grad gather with the local slot put back gives 1/W
of it instead. Every rank of the group must then make the call.

``process_group`` values accepted everywhere:

* ``None`` (the default of every loss and module): compute locally (per-rank loss), whatever the launch;
* :data:`WORLD`: the default (world) group when ``torch.distributed`` is initialised with more than one
  rank, otherwise compute locally;
* a ``ProcessGroup`` (or a 1-D ``DeviceMesh``): that group; a group of size 1 computes locally.

The primitives of this module (:func:`all_gather_with_grad`, :func:`all_reduce_with_grad`,
:func:`all_reduce_moments`, :func:`resolve_group`, ...) are explicit collectives and default to
:data:`WORLD`, like ``torch.distributed``'s own ``group=None``. :func:`gather_rows` is the one gather helper
the ops use.

Gathers require the same dim-0 size on every rank. With the size check on, a mismatch raises
:class:`ValueError` naming every rank's size (one small extra all-gather of the shapes per call, read on
the host). The check is on by default for CPU tensors (gloo: no device sync) and **off by default for CUDA
tensors** (NCCL), where reading the gathered shapes is a host sync: pass ``check_sizes=True`` (or set
``FASTDISTILL_VALUE_CHECKS=1``) to opt in while debugging. It is skipped while ``torch.compile`` traces,
where it would break the graph. A mismatch without the check hangs or fails inside the backend.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator, Sequence, Union

import torch
import torch.distributed as dist

__all__ = [
    "WORLD",
    "ProcessGroupArg",
    "resolve_group",
    "world_size",
    "rank",
    "is_active",
    "all_gather_with_grad",
    "gather_rows",
    "all_reduce_with_grad",
    "all_reduce_moments",
    "force_legacy_gather",
    "gather_path",
]

#: The world group when torch.distributed is initialised with more than one rank (else local). The value
#: to pass as ``process_group=`` for the global-batch objective, and the default of this module's primitives.
#: The ONE definition in fastdistill: ops and modules import it from here.
WORLD = "world"

#: Type of a ``process_group=`` argument.
ProcessGroupArg = Union[str, "dist.ProcessGroup", None, object]

# Setting FASTDISTILL_DIST_GATHER=legacy (or the context manager below) forces the deprecated
# torch.distributed.nn.functional path, so that both paths are testable on one torch version.
_force_legacy: bool = os.environ.get("FASTDISTILL_DIST_GATHER", "").strip().lower() == "legacy"


@contextlib.contextmanager
def force_legacy_gather(enabled: bool = True) -> Iterator[None]:
    """Within the block, gathers use ``torch.distributed.nn.functional.all_gather`` (the fallback path)
    instead of functional collectives. For testing; the env var ``FASTDISTILL_DIST_GATHER=legacy`` does
    the same process-wide."""
    global _force_legacy
    previous = _force_legacy
    _force_legacy = bool(enabled)
    try:
        yield
    finally:
        _force_legacy = previous


def _functional_gather():
    """The functional-collective autograd all-gather of this torch, or None."""
    try:
        from torch.distributed import _functional_collectives as fc
    except ImportError:  # private module: may move in a future torch
        return None
    fn = getattr(fc, "all_gather_single_autograd", None)
    if fn is not None:
        return fn
    fn = getattr(fc, "all_gather_tensor_autograd", None)
    if fn is None:
        return None

    def _quiet(t: torch.Tensor, gather_dim: int, group: object) -> torch.Tensor:
        # Deprecated alias on newer torch (FutureWarning); only reached where the new name is absent.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return fn(t, gather_dim, group)

    return _quiet


def gather_path() -> str:
    """Which all-gather implementation :func:`all_gather_with_grad` uses now:
    ``"functional"`` (``torch.distributed._functional_collectives``) or ``"legacy"``
    (``torch.distributed.nn.functional.all_gather``)."""
    if _force_legacy or _functional_gather() is None:
        return "legacy"
    return "functional"


def resolve_group(process_group: ProcessGroupArg = WORLD) -> "dist.ProcessGroup | None":
    """The process group a cross-sample op should reduce over, or ``None`` to compute locally.

    ``WORLD`` -> the default group if ``torch.distributed`` is initialised with world size > 1, else None.
    ``None`` -> None. A ``ProcessGroup`` -> itself (None if it has one rank). A 1-D ``DeviceMesh`` -> its group.
    Raises ``ValueError`` if this rank is not a member of the given group, ``TypeError`` for other values.
    """
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != WORLD:
            raise ValueError(f"process_group must be fastdistill.distributed.WORLD ({WORLD!r}), None or a "
                             f"ProcessGroup; got the string {process_group!r}")
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if dist.get_world_size() <= 1:
            return None
        return dist.group.WORLD
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group: a process group was given but torch.distributed is not initialised")
    group = process_group
    if type(group) is int and group == dist.GroupMember.NON_GROUP_MEMBER:
        # dist.new_group(ranks) returns this marker on the ranks it does not include
        raise ValueError(f"process_group: this rank (global rank {dist.get_rank()}) is not a member of the group")
    if not isinstance(group, dist.ProcessGroup):
        get_group = getattr(group, "get_group", None)  # DeviceMesh
        if get_group is None:
            raise TypeError(f"process_group must be fastdistill.distributed.WORLD, None, a ProcessGroup or a "
                            f"1-D DeviceMesh; got {type(process_group).__name__}")
        group = get_group()
    size = dist.get_world_size(group)
    if size < 0:
        raise ValueError(f"process_group: this rank (global rank {dist.get_rank()}) is not a member of the group")
    return group if size > 1 else None


def is_active(process_group: ProcessGroupArg = WORLD) -> bool:
    """True when ``process_group`` resolves to a group of more than one rank (ops then compute globally)."""
    return resolve_group(process_group) is not None


def world_size(process_group: ProcessGroupArg = WORLD) -> int:
    """Number of ranks ``process_group`` spans (1 when it resolves to local computation)."""
    group = resolve_group(process_group)
    return 1 if group is None else dist.get_world_size(group)


def rank(process_group: ProcessGroupArg = WORLD) -> int:
    """This process's rank within ``process_group`` (0 when it resolves to local computation)."""
    group = resolve_group(process_group)
    return 0 if group is None else dist.get_rank(group)


def _check_gather_shapes(tensor: torch.Tensor, group: "dist.ProcessGroup", what: str) -> None:
    """All-gather (ndim, dim0, numel of the other dims, other-dims hash) and raise on a mismatch.

    Runs before the real gather: mismatched sizes would otherwise hang (gloo/NCCL wait for bytes that
    never come) or fail with an opaque backend error. Costs one tiny collective.
    """
    w = dist.get_world_size(group)
    rest = tuple(tensor.shape[1:])
    rest_numel = 1
    for s in rest:
        rest_numel *= int(s)
    # a cheap order-sensitive fingerprint of the trailing shape, so (2,3) vs (3,2) is caught as well
    fp = 0
    for s in rest:
        fp = (fp * 1_000_003 + int(s) + 1) % (2 ** 61 - 1)
    info = torch.tensor([tensor.dim(), int(tensor.shape[0]) if tensor.dim() else 1, rest_numel, fp],
                        dtype=torch.int64, device=tensor.device)
    out = [torch.empty_like(info) for _ in range(w)]
    dist.all_gather(out, info, group=group)
    rows = [o.tolist() for o in out]
    if all(r == rows[0] for r in rows):
        return
    sizes = ", ".join(f"rank {i}: {r[1]}" for i, r in enumerate(rows))
    if len({r[1] for r in rows}) > 1:
        raise ValueError(f"{what}: dim-0 (batch) sizes differ across ranks ({sizes}); cross-sample losses need "
                         f"the same per-rank batch size (drop the partial last batch, e.g. DataLoader("
                         f"drop_last=True), or keep accelerate's even_batches=True)")
    raise ValueError(f"{what}: tensor shapes differ across ranks beyond dim 0 (ndim / trailing sizes; dim-0 "
                     f"sizes: {sizes}); this rank has shape {tuple(tensor.shape)}")


def all_gather_with_grad(tensor: torch.Tensor, process_group: ProcessGroupArg = WORLD, *,
                         check_sizes: bool | None = None) -> torch.Tensor:
    """Concatenation along dim 0 of every rank's ``tensor`` (rank order), differentiable.

    Backward: each rank's input receives the sum over ranks of the gradient flowing into its slice
    (reduce-scatter sum), which is what makes DDP's mean equal the full-batch gradient (module docstring).
    Uses ``torch.distributed._functional_collectives`` (traceable by ``torch.compile``) where present,
    else ``torch.distributed.nn.functional.all_gather`` (see :func:`force_legacy_gather`).
    If the group resolves to local computation, returns ``tensor`` itself.

    Args:
        tensor: at least 1-D; every rank must pass the same shape.
        process_group: see the module docstring.
        check_sizes: gather the shapes first and raise ``ValueError`` naming every rank's dim-0 size on a
            mismatch (instead of hanging). Costs one tiny extra collective and, for CUDA tensors, a host
            sync. ``None`` (default): on for CPU tensors, off for CUDA tensors (``FASTDISTILL_VALUE_CHECKS=1``
            turns it on there, see :func:`fastdistill.ops._common.value_checks_enabled`).
            Skipped while ``torch.compile`` traces (it would break the graph): compiled code must keep
            sizes equal.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"all_gather_with_grad: tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() == 0:
        raise ValueError("all_gather_with_grad: tensor must have at least 1 dim (gathered along dim 0), got a scalar")
    group = resolve_group(process_group)
    if group is None:
        return tensor
    # A host read of the gathered shapes: opt-in on CUDA, skipped under torch.compile (a graph break).
    from .ops._common import value_checks_enabled

    if value_checks_enabled(tensor.device, check_sizes):
        _check_gather_shapes(tensor, group, "all_gather_with_grad")
    # Collectives need contiguous buffers; .contiguous() is differentiable and free when already so.
    tensor = tensor.contiguous()
    fn = None if _force_legacy else _functional_gather()
    if fn is not None:
        out = fn(tensor, 0, group)
        # Functional collectives return an AsyncCollectiveTensor in eager mode; any op on it waits.
        # Callers (custom ops, Triton launchers) may read raw storage, so materialise the wait here.
        wait = getattr(out, "wait", None)
        if wait is not None and type(out) is not torch.Tensor:
            out = wait()
        return out
    import torch.distributed.nn.functional as dnf
    with warnings.catch_warnings():
        # Deprecated in recent torch (FutureWarning); used here only as the fallback path.
        warnings.simplefilter("ignore", FutureWarning)
        parts = dnf.all_gather(tensor, group=group)
    return torch.cat(parts, dim=0)


def gather_rows(tensors: Sequence[torch.Tensor], process_group: ProcessGroupArg) -> list[torch.Tensor]:
    """All-gather (autograd-aware) every tensor along dim 0 when ``process_group`` is active.

    The gather helper of every fastdistill op that takes ``process_group=`` (relational KL, the RDD losses,
    the memory queue update). ``None``, or a group that resolves to one rank, returns the tensors unchanged
    and runs no collective. A tensor passed twice (``q is k``) is gathered once and both results are the same
    object. Each gather checks the shapes first where :func:`all_gather_with_grad`'s default does (CPU
    tensors; opt-in for CUDA tensors).
    """
    if process_group is None:
        return list(tensors)
    group = resolve_group(process_group)
    if group is None:
        return list(tensors)
    out: list[torch.Tensor] = []
    done: dict[int, torch.Tensor] = {}
    for t in tensors:
        if id(t) not in done:
            done[id(t)] = all_gather_with_grad(t, group)
        out.append(done[id(t)])
    return out


def _sum_all_reduce(tensor: torch.Tensor, group: "dist.ProcessGroup") -> torch.Tensor:
    """Out-of-place SUM all-reduce without autograd: the functional collective (traceable by
    torch.compile) where present, else the in-place c10d call on a copy."""
    try:
        from torch.distributed import _functional_collectives as fc
    except ImportError:  # private module: may move in a future torch
        fc = None
    if fc is not None and hasattr(fc, "all_reduce") and not _force_legacy:
        out = fc.all_reduce(tensor.contiguous(), "sum", group)
        wait = getattr(out, "wait", None)
        if wait is not None and type(out) is not torch.Tensor:
            out = wait()
        return out
    out = tensor.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


class _AllReduceSum(torch.autograd.Function):
    """SUM all-reduce whose backward all-reduces the gradient (y = sum_r x_r is used by every rank's loss,
    so dL_total/dx_r = sum over ranks of dL_r/dy)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: "dist.ProcessGroup") -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return _sum_all_reduce(tensor, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _sum_all_reduce(grad, ctx.group), None


def all_reduce_with_grad(tensor: torch.Tensor, process_group: ProcessGroupArg = WORLD) -> torch.Tensor:
    """Differentiable SUM all-reduce (returns a new tensor; the input is not modified).

    Backward all-reduces the incoming gradient, so with DDP's mean the parameters get the gradient of the
    loss computed from the global sum. Returns ``tensor`` itself when the group resolves to local computation.
    Every rank must pass the same shape.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"all_reduce_with_grad: tensor must be a torch.Tensor, got {type(tensor).__name__}")
    group = resolve_group(process_group)
    if group is None:
        return tensor
    return _AllReduceSum.apply(tensor, group)


def _as_tensor(x: torch.Tensor | float | int, like: torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.tensor(x, device=like.device)


def _chan_merge(n_a: torch.Tensor, mean_a: torch.Tensor, m2_a: torch.Tensor,
                n_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor):
    """Chan et al. pairwise merge of two (count, mean, sum of squared deviations) triples."""
    n = n_a + n_b
    # Empty partitions (n == 0) must not produce 0/0: divide by max(n, 1) (the numerator is then 0).
    safe = torch.clamp(n, min=1)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / safe)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / safe)
    return n, mean, m2


def all_reduce_moments(n: torch.Tensor | float | int, mean: torch.Tensor, m2: torch.Tensor,
                       process_group: ProcessGroupArg = WORLD
                       ) -> tuple[torch.Tensor | float | int, torch.Tensor, torch.Tensor]:
    """Merge per-rank moments ``(n, mean, M2)`` into the global ones with Chan's parallel algorithm.

    ``n`` is the per-rank sample count (a number or a tensor broadcastable to ``mean``, e.g. per-segment
    counts of shape ``(S, 1)`` with ``mean`` of shape ``(S, C)``; ranks may have ``n == 0``), ``mean`` the
    per-rank mean and ``m2`` the per-rank sum of squared deviations from it (``var = M2 / n``). Returns the
    global ``(N, mean, M2)``, identical on every rank (the triples are all-gathered once and merged in rank
    order, so every rank does the same arithmetic). Differentiable in ``mean`` and ``m2`` (and ``n`` if it
    requires grad); merged in float64, results cast back to the input dtypes.
    Local (group resolves to None): returns the inputs unchanged.
    """
    if not isinstance(mean, torch.Tensor) or not isinstance(m2, torch.Tensor):
        raise TypeError("all_reduce_moments: mean and m2 must be torch.Tensors")
    if mean.shape != m2.shape:
        raise ValueError(f"all_reduce_moments: mean and m2 must have the same shape, got {tuple(mean.shape)} "
                         f"and {tuple(m2.shape)}")
    group = resolve_group(process_group)
    if group is None:
        return n, mean, m2
    n_t = _as_tensor(n, mean)
    try:
        torch.broadcast_shapes(n_t.shape, mean.shape)
    except RuntimeError as err:
        raise ValueError(f"all_reduce_moments: n of shape {tuple(n_t.shape)} does not broadcast to mean of shape "
                         f"{tuple(mean.shape)}") from err
    # Merge in float64: counts can pass 2^24 (float32 integer limit) and M2 sums many squares. The moment
    # tensors are per-channel/per-segment (small), so the wider all-gather costs nothing noticeable.
    f64 = torch.float64
    packed = torch.cat([n_t.to(f64).reshape(-1), mean.to(f64).reshape(-1), m2.to(f64).reshape(-1)])
    w = dist.get_world_size(group)
    gathered = all_gather_with_grad(packed, group).reshape(w, -1)
    k_n, k_m = n_t.numel(), mean.numel()
    ns = gathered[:, :k_n]
    means = gathered[:, k_n:k_n + k_m]
    m2s = gathered[:, k_n + k_m:]
    acc_n = ns[0].reshape(n_t.shape)
    acc_mean = means[0].reshape(mean.shape)
    acc_m2 = m2s[0].reshape(m2.shape)
    for r in range(1, w):
        acc_n, acc_mean, acc_m2 = _chan_merge(acc_n, acc_mean, acc_m2, ns[r].reshape(n_t.shape),
                                              means[r].reshape(mean.shape), m2s[r].reshape(m2.shape))
    if isinstance(n, torch.Tensor):
        n_out: torch.Tensor | float | int = acc_n.round().to(n.dtype) if not n.is_floating_point() else acc_n.to(n.dtype)
    elif isinstance(n, int):
        n_out = int(round(float(acc_n)))
    else:
        n_out = float(acc_n)
    return n_out, acc_mean.to(mean.dtype), acc_m2.to(m2.dtype)

"""Segment routing for one-to-many distillation (O2MKD): K students, student ``k`` owning the
timesteps ``boundaries[k] <= t < boundaries[k+1]``.

* :func:`segment_route` bucketises per-sample timesteps and stable-sorts the batch by segment
  (``fastdistill::segment_route``: one CUDA launch, or the C++ CPU kernel);
* :func:`segment_gather` / :func:`segment_scatter` reorder any number of batch-major tensors (and
  nested dicts / tuples / lists of them) into segment order and back, in one launch
  (``fastdistill::segment_permute``); each is the other's backward;
* :func:`segment_mse` is the per-sample MSE with per-segment normalisation, forward and backward
  fused (``fastdistill::segment_mse_forward`` / ``_backward``);
* :func:`stratified_timesteps` samples timesteps so that every segment gets its share.

The compiled ops live in ``csrc/routing/``; this module registers their fake kernels (so
``torch.compile`` traces them) and autograd, holds the plain-PyTorch references (the ``reference``
backend and the ground truth of the tests) and the public functions, which dispatch between
``cuda``, ``cpp`` and ``reference``.

Host synchronisation: only :meth:`Routing.host_offsets` copies anything to the host (the K+1
offsets, one copy); :class:`fastdistill.nn.MultiStudent` calls it once per step. Out-of-range
timesteps land in an extra bucket after the last segment (``offsets[K] < B``): on CPU
:func:`segment_route` raises at once; on CUDA the error is raised by :meth:`Routing.host_offsets`
(checking earlier would cost a sync per call).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
from torch.utils import _pytree as pytree

from .. import _extension, dispatch
from .._validation import check_choice, check_per_sample, check_tensor
from ._common import autocast_op, value_checks_enabled

OP_ROUTE = "segment_route"
OP_PERMUTE = "segment_permute"
OP_MSE = "segment_mse"
for _op in (OP_ROUTE, OP_PERMUTE, OP_MSE):
    dispatch.register_op(_op, ["cuda", "cpp"], fp64=["cuda", "cpp"])

#: The CUDA counting sort keeps per-warp counters of every segment in shared memory.
MAX_SEGMENTS = 256

_TIMESTEP_DTYPES = (torch.int64, torch.int32, torch.float32, torch.float64)

BoundariesArg = Union[Sequence[int], torch.Tensor]


class Routing(NamedTuple):
    """Where each sample of a batch goes (all tensors on the timesteps' device, int64).

    ``segment_ids[b]``: the segment (student) of sample ``b``.
    ``permutation[j]``: the sample at position ``j`` of the segment-sorted batch (stable: samples of
    one segment keep their batch order). ``inverse[b]``: the sorted position of sample ``b``.
    ``offsets`` (K+1): segment ``k`` occupies sorted positions ``offsets[k]:offsets[k+1]``;
    ``offsets[K]`` is the number of in-range samples (``B`` for a valid batch).
    """

    segment_ids: torch.Tensor
    permutation: torch.Tensor
    inverse: torch.Tensor
    offsets: torch.Tensor

    @property
    def num_segments(self) -> int:
        """K, the number of segments."""
        return self.offsets.shape[0] - 1

    @property
    def batch_size(self) -> int:
        """B, the number of routed samples."""
        return self.segment_ids.shape[0]

    def counts(self) -> torch.Tensor:
        """Samples per segment, ``(K,)`` int64 on the device (no host copy)."""
        return self.offsets[1:] - self.offsets[:-1]

    def host_offsets(self) -> list[int]:
        """The K+1 offsets as Python ints: ONE device-to-host copy (the step's only sync).

        Raises ValueError when some timestep was outside ``[boundaries[0], boundaries[K])``.
        """
        offsets = self.offsets.tolist()
        if offsets[-1] != self.batch_size:
            raise ValueError(
                f"segment_route: {self.batch_size - offsets[-1]} of {self.batch_size} timesteps lie outside "
                f"[boundaries[0], boundaries[-1]) (or are NaN); every timestep must belong to a segment")
        return offsets


# ----------------------------------------------------------------------------------------------
# Validation

_BOUNDARY_CACHE: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def check_boundaries(op: str, boundaries: BoundariesArg, *,
                     num_train_timesteps: Optional[int] = None) -> tuple[int, ...]:
    """``boundaries`` are K+1 strictly increasing ints from 0 (to ``num_train_timesteps`` when given).

    Returns them as a tuple. A CUDA tensor is copied to the host for the check (a sync): pass a
    Python sequence in a training loop.
    """
    if isinstance(boundaries, torch.Tensor):
        if boundaries.dim() != 1 or boundaries.dtype.is_floating_point or boundaries.dtype == torch.bool:
            raise ValueError(f"{op}: boundaries must be a 1-D integer tensor, got shape {tuple(boundaries.shape)} "
                             f"dtype {boundaries.dtype}")
        values = [int(v) for v in boundaries.tolist()]
    elif isinstance(boundaries, (list, tuple, range)):
        values = []
        for v in boundaries:
            if isinstance(v, bool) or not isinstance(v, int):
                if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.dtype.is_floating_point:
                    v = int(v)
                else:
                    raise TypeError(f"{op}: boundaries must hold ints, got {type(v).__name__} {v!r}")
            values.append(int(v))
    else:
        raise TypeError(f"{op}: boundaries must be a sequence of ints or a 1-D integer tensor, "
                        f"got {type(boundaries).__name__}")
    if len(values) < 2:
        raise ValueError(f"{op}: boundaries must hold K+1 >= 2 values (0, ..., T), got {values}")
    if len(values) - 1 > MAX_SEGMENTS:
        raise ValueError(f"{op}: boundaries define {len(values) - 1} segments; at most {MAX_SEGMENTS} are supported")
    if values[0] != 0:
        raise ValueError(f"{op}: boundaries must start at 0, got {values[0]} (boundaries {values})")
    bad = [i for i in range(1, len(values)) if values[i] <= values[i - 1]]
    if bad:
        i = bad[0]
        raise ValueError(f"{op}: boundaries must be strictly increasing, but boundaries[{i}] = {values[i]} <= "
                         f"boundaries[{i - 1}] = {values[i - 1]} (boundaries {values})")
    if num_train_timesteps is not None and values[-1] != num_train_timesteps:
        raise ValueError(f"{op}: boundaries must end at num_train_timesteps = {num_train_timesteps}, "
                         f"got {values[-1]} (boundaries {values})")
    return tuple(values)


def boundaries_tensor(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Validated boundaries as an int64 tensor on ``device``, cached so that a training loop does not
    pay a host-to-device copy (a stream sync for pageable memory) per step."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.int64, device=device)
    key = (values, torch.device(device))
    t = _BOUNDARY_CACHE.get(key)
    if t is None:
        t = torch.tensor(values, dtype=torch.int64, device=device)
        _BOUNDARY_CACHE[key] = t
    return t


def _check_timesteps(op: str, timesteps: object) -> torch.Tensor:
    if not isinstance(timesteps, torch.Tensor):
        raise TypeError(f"{op}: timesteps must be a torch.Tensor of shape (B,), got {type(timesteps).__name__}")
    if timesteps.dtype not in _TIMESTEP_DTYPES:
        raise TypeError(f"{op}: timesteps must have dtype int64, int32, float32 or float64, got {timesteps.dtype}")
    if timesteps.dim() != 1:
        raise ValueError(f"{op}: timesteps must have shape (B,), got {tuple(timesteps.shape)}")
    return timesteps


# ----------------------------------------------------------------------------------------------
# References (plain PyTorch): the reference backend and the tests' ground truth

def route_reference(timesteps: torch.Tensor, boundaries: torch.Tensor) -> Routing:
    """Plain-PyTorch ``segment_route``: bucketise, then a stable sort by segment."""
    K = boundaries.shape[0] - 1
    b = boundaries.to(timesteps.dtype)
    inside = (timesteps >= b[0]) & (timesteps < b[-1])  # False for NaN
    seg = torch.bucketize(timesteps, b, right=True) - 1
    seg = torch.where(inside, seg, torch.full_like(seg, K)).to(torch.int64)
    perm = torch.argsort(seg, stable=True)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.shape[0], device=perm.device)
    # (K+1, B) comparison instead of bincount: bincount sizes its output from max(seg), a host sync on CUDA.
    counts = (seg[None, :] == torch.arange(K + 1, device=seg.device)[:, None]).sum(1)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])[: K + 1]
    return Routing(seg, perm, inv, offsets)


def permute_reference(tensors: Sequence[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
    """Plain-PyTorch row permutation: ``t[index]`` for every tensor."""
    return [t.index_select(0, index) for t in tensors]


def mse_segment_sums_reference(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                               segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Plain-PyTorch per-segment sums of the weighted per-sample MSE."""
    acc = weight.dtype
    B = pred.shape[0]
    diff = pred.to(acc) - target.to(acc)
    per_sample = (diff * diff).reshape(B, -1).mean(1) * weight if pred.numel() else weight * 0
    inside = segment_ids < num_segments
    seg = torch.where(inside, segment_ids, torch.zeros_like(segment_ids))
    per_sample = torch.where(inside, per_sample, torch.zeros_like(per_sample))
    return torch.zeros(num_segments, dtype=acc, device=pred.device).index_add(0, seg, per_sample)


# ----------------------------------------------------------------------------------------------
# Fake kernels and autograd of the compiled ops

_HAVE_OPS = _extension.is_loaded() and hasattr(torch.ops.fastdistill, "segment_route")

if _HAVE_OPS:

    @torch.library.register_fake("fastdistill::segment_route")
    def _route_fake(timesteps, boundaries):
        B, K1 = timesteps.shape[0], boundaries.shape[0]
        mk = lambda n: timesteps.new_empty((n,), dtype=torch.int64)  # noqa: E731
        return mk(B), mk(B), mk(B), mk(K1)

    @torch.library.register_fake("fastdistill::segment_permute")
    def _permute_fake(tensors, index, inverse):
        return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]

    def _permute_setup(ctx, inputs, output):
        tensors, index, inverse = inputs
        ctx.save_for_backward(index, inverse)
        ctx.differentiable = [t.is_floating_point() or t.is_complex() for t in tensors]
        ctx.templates = [(t.shape, t.dtype) for t in tensors]

    def _permute_backward(ctx, grads):
        index, inverse = ctx.saved_tensors
        # out[j] = in[index[j]]  =>  grad_in[i] = grad_out[inverse[i]]: the same op, indices swapped.
        live = [i for i, (g, d) in enumerate(zip(grads, ctx.differentiable)) if d and g is not None]
        result: list[Optional[torch.Tensor]] = [None] * len(grads)
        if live:
            moved = torch.ops.fastdistill.segment_permute([grads[i] for i in live], inverse, index)
            for i, g in zip(live, moved):
                result[i] = g
        for i, d in enumerate(ctx.differentiable):
            if d and result[i] is None:
                shape, dtype = ctx.templates[i]
                result[i] = index.new_zeros(shape, dtype=dtype)
        return result, None, None

    torch.library.register_autograd("fastdistill::segment_permute", _permute_backward, setup_context=_permute_setup)

    @torch.library.register_fake("fastdistill::segment_mse_forward")
    def _mse_fwd_fake(pred, target, weight, segment_ids, num_segments):
        acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
        return pred.new_empty((num_segments,), dtype=acc)

    @torch.library.register_fake("fastdistill::segment_mse_backward")
    def _mse_bwd_fake(grad_segment_sums, pred, target, weight, segment_ids):
        return torch.empty_like(pred, memory_format=torch.contiguous_format)

    def _mse_setup(ctx, inputs, output):
        pred, target, weight, segment_ids, _ = inputs
        ctx.save_for_backward(pred, target, weight, segment_ids)

    def _mse_backward(ctx, grad):
        pred, target, weight, segment_ids = ctx.saved_tensors
        grad_pred = grad_target = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            g = torch.ops.fastdistill.segment_mse_backward(grad.contiguous(), pred, target, weight, segment_ids)
            g = g.view(pred.shape)
            grad_pred = g if ctx.needs_input_grad[0] else None
            grad_target = -g if ctx.needs_input_grad[1] else None
        return grad_pred, grad_target, None, None, None

    torch.library.register_autograd("fastdistill::segment_mse_forward", _mse_backward, setup_context=_mse_setup)


# ----------------------------------------------------------------------------------------------
# Public API

@autocast_op("none")  # elementwise: nothing cast; the body never sees the caller's autocast
def segment_route(timesteps: torch.Tensor, boundaries: BoundariesArg, *,
                  num_train_timesteps: Optional[int] = None) -> Routing:
    """Route a batch by timestep: student ``k`` owns ``boundaries[k] <= t < boundaries[k+1]``.

    Args:
        timesteps: ``(B,)`` int64 / int32 / float32 / float64 per-sample timesteps.
        boundaries: K+1 strictly increasing ints starting at 0 (a Python sequence, or an integer
            tensor; a CUDA tensor costs a host sync for the check, so prefer a sequence).
        num_train_timesteps: when given, ``boundaries[-1]`` must equal it.

    Returns:
        :class:`Routing` ``(segment_ids, permutation, inverse, offsets)``, all int64 on the
        timesteps' device. Nothing is copied to the host on CUDA; out-of-range timesteps are
        reported by :meth:`Routing.host_offsets` there, and at once on CPU.
    """
    timesteps = _check_timesteps(OP_ROUTE, timesteps)
    values = check_boundaries(OP_ROUTE, boundaries, num_train_timesteps=num_train_timesteps)
    routing = _route(timesteps, boundaries_tensor(values, timesteps.device))
    if value_checks_enabled(timesteps.device):  # on CPU (free there); opt-in on CUDA: a host sync
        routing.host_offsets()  # raises now for out-of-range timesteps
    return routing


def _route(timesteps: torch.Tensor, boundaries: torch.Tensor) -> Routing:
    """Routing without argument checks (``boundaries``: a validated int64 tensor on the same device)."""
    backend = dispatch.select_backend(OP_ROUTE, timesteps, boundaries)
    if backend == "reference":
        return route_reference(timesteps, boundaries)
    seg, perm, inv, offsets = torch.ops.fastdistill.segment_route(timesteps, boundaries)
    return Routing(seg, perm, inv, offsets)


def _check_routing(op: str, routing: object) -> Routing:
    if not isinstance(routing, Routing):
        raise TypeError(f"{op}: routing must be the Routing returned by segment_route, got {type(routing).__name__}")
    return routing


def _permute_structures(op: str, routing: Routing, structures: tuple[Any, ...], index: torch.Tensor,
                        inverse: torch.Tensor, *, strict: bool = True) -> Any:
    """Apply ``out[j] = x[index[j]]`` to every batch-major tensor leaf of ``structures`` in one op call.

    Non-tensor leaves (None, numbers, strings) pass through. With ``strict=False`` tensors that are
    not batch-major (dim 0 or a leading size other than B, e.g. a broadcast ``(1, ...)`` mask) pass
    through too; with ``strict=True`` they raise.
    """
    B = routing.batch_size
    leaves, spec = pytree.tree_flatten(structures)
    picked: list[int] = []
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            continue
        if leaf.dim() >= 1 and leaf.shape[0] == B:
            if leaf.device != index.device:
                raise ValueError(f"{op}: a tensor is on {leaf.device} but the routing is on {index.device}")
            picked.append(i)
        elif strict:
            raise ValueError(f"{op}: every tensor must be batch-major with {B} rows (the routed batch); "
                             f"got one of shape {tuple(leaf.shape)}")
    if picked:
        moved = _permute([leaves[i] for i in picked], index, inverse)
        leaves = list(leaves)
        for i, t in zip(picked, moved):
            leaves[i] = t
    out = pytree.tree_unflatten(leaves, spec)
    return out[0] if len(structures) == 1 else out


def _permute(tensors: list[torch.Tensor], index: torch.Tensor, inverse: torch.Tensor) -> list[torch.Tensor]:
    backend = dispatch.select_backend(OP_PERMUTE, index, *tensors)
    if backend == "reference":
        return permute_reference(tensors, index)
    outs = torch.ops.fastdistill.segment_permute(tensors, index, inverse)
    # The kernels write contiguous rows; give back the caller's shapes (views, free).
    return [o.view(t.shape) for o, t in zip(outs, tensors)]


@autocast_op("none")  # elementwise: nothing cast; the body never sees the caller's autocast
def segment_gather(routing: Routing, *tensors: Any) -> Any:
    """Reorder batch-major tensors into segment order: ``out[j] = x[routing.permutation[j]]``.

    Accepts any number of tensors and nested dicts / tuples / lists of them (``encoder_hidden_states``,
    ``added_cond_kwargs``, ...); every tensor leaf is moved in ONE kernel launch, whatever its dtype.
    Non-tensor leaves pass through. Differentiable (the backward is :func:`segment_scatter`).
    Returns the single argument's reordered copy, or a tuple for several arguments.
    """
    routing = _check_routing("segment_gather", routing)
    if not tensors:
        raise ValueError("segment_gather: pass at least one tensor (or structure of tensors) to reorder")
    return _permute_structures("segment_gather", routing, tensors, routing.permutation, routing.inverse)


@autocast_op("none")  # elementwise: nothing cast; the body never sees the caller's autocast
def segment_scatter(routing: Routing, *tensors: Any) -> Any:
    """Put segment-ordered tensors back in batch order: ``out[b] = y[routing.inverse[b]]``.

    The inverse of :func:`segment_gather`, with the same argument handling (one launch for all
    leaves, nested structures, autograd).
    """
    routing = _check_routing("segment_scatter", routing)
    if not tensors:
        raise ValueError("segment_scatter: pass at least one tensor (or structure of tensors) to reorder")
    return _permute_structures("segment_scatter", routing, tensors, routing.inverse, routing.permutation)


def _segment_sums(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, segment_ids: torch.Tensor,
                  num_segments: int) -> torch.Tensor:
    backend = dispatch.select_backend(OP_MSE, pred, target, weight, segment_ids)
    if backend == "reference":
        return mse_segment_sums_reference(pred, target, weight, segment_ids, num_segments)
    return torch.ops.fastdistill.segment_mse_forward(pred, target, weight, segment_ids, num_segments)


@autocast_op("none")  # elementwise: nothing cast; the body never sees the caller's autocast
def segment_mse(pred: torch.Tensor, target: torch.Tensor, routing: Routing, *, reduction: str = "per_segment",
                weight: Union[torch.Tensor, float, None] = None, process_group: Any = None) -> torch.Tensor:
    """Per-sample MSE normalised per segment, so every student sees a unit-scale gradient.

    With ``l_b = w_b * mean((pred[b] - target[b])**2)`` over the non-batch dims and ``n_k`` the
    samples of segment ``k``:

    * ``reduction="per_segment"``: the ``(K,)`` vector ``L_k = sum_{b in k} l_b / max(n_k, 1)``
      (0 for an empty segment). ``.sum()`` of it is the O2MKD training loss.
    * ``reduction="mean"``: the batch mean ``sum_b l_b / B`` (student k's gradient scales with n_k/B).

    Args:
        pred, target: same shape ``(B, ...)``, float32 / bfloat16 / float16 / float64; any order
            (the routing's ``segment_ids`` say which segment each row is in).
        routing: from :func:`segment_route` on this batch's timesteps.
        weight: per-sample weight, a number or ``(B,)`` tensor (constant: it must not require grad).
        process_group: ``None`` (default): this rank's samples only, no collective.
            ``fastdistill.distributed.WORLD`` (``"world"``) or a ProcessGroup (see
            :mod:`fastdistill.distributed`): ``n_k`` and the sums are all-reduced across ranks, so the
            value is the global-batch loss on every rank and DDP's gradient average gives the
            full-batch gradient (every rank must call).

    Returns the loss in float32 (float64 for float64 inputs); accumulation is in that dtype.
    """
    op = "segment_mse"
    routing = _check_routing(op, routing)
    check_choice(op, "reduction", reduction, ("per_segment", "mean"))
    check_tensor(op, "pred", pred)
    check_tensor(op, "target", target)
    if pred.shape != target.shape:
        raise ValueError(f"{op}: pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    if pred.dtype != target.dtype:
        raise TypeError(f"{op}: pred ({pred.dtype}) and target ({target.dtype}) must have the same dtype")
    if pred.dim() < 1 or pred.shape[0] != routing.batch_size:
        raise ValueError(f"{op}: pred must be batch-major with {routing.batch_size} rows (the routed batch), "
                         f"got shape {tuple(pred.shape)}")
    if pred.device != routing.segment_ids.device or target.device != pred.device:
        raise ValueError(f"{op}: pred, target and routing must be on one device; got {pred.device}, "
                         f"{target.device}, {routing.segment_ids.device}")
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    B, K = routing.batch_size, routing.num_segments
    if weight is None:
        w = torch.ones(B, dtype=acc, device=pred.device)
    else:
        if isinstance(weight, torch.Tensor) and weight.requires_grad:
            raise ValueError(f"{op}: weight must not require grad (it is a constant of the loss); detach it")
        w = check_per_sample(op, "weight", weight, B, device=pred.device).to(acc)
    sums = _segment_sums(pred, target, w, routing.segment_ids, K)
    counts = routing.offsets.to(acc)
    counts = torch.cat([counts[1:] - counts[:-1], counts[-1:]])  # (K+1,): per segment, then in-range total

    group = None
    if process_group is not None:
        from .. import distributed  # lazily: only distributed runs need it

        group = distributed.resolve_group(process_group)
    if group is not None:
        from .. import distributed

        # One collective: the K sums (differentiable) and the K+1 counts travel together.
        both = distributed.all_reduce_with_grad(torch.cat([sums, counts]), group)
        sums, counts = both[:K], both[K:].detach()
    if reduction == "per_segment":
        return sums / counts[:K].clamp(min=1)
    return sums.sum() / counts[K].clamp(min=1)


def stratified_timesteps(batch_size: int, boundaries: BoundariesArg, *, generator: Optional[torch.Generator] = None,
                         proportional: bool = True, device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """Timesteps for a batch in which every segment gets its share: no routing imbalance.

    Segment ``k`` receives ``n_k`` samples, uniform over ``[boundaries[k], boundaries[k+1])``:

    * ``proportional=True`` (default): ``n_k`` proportional to the segment's width (largest
      remainders, ties broken at random), so the timesteps are a stratified sample of
      ``Uniform{0..T-1}``: same distribution as uniform sampling, lower variance, and every
      student's sample count is fixed (static shapes for CUDA graphs / the fused MultiStudent);
    * ``proportional=False``: ``n_k = B/K`` (remainder to random segments) whatever the widths.

    The result is in segment order (so ``segment_route`` gives the identity permutation); pair it
    with an i.i.d. batch of images. Use it instead of ``torch.randint(0, T, (B,))`` when the loss is
    per-segment normalised and students should each see the same number of samples per step.

    Args:
        batch_size: B >= 0.
        boundaries: K+1 strictly increasing ints from 0 to T.
        generator: a ``torch.Generator`` (its device is used when ``device`` is None).
        device: where the result goes (default: the generator's device, else CPU).

    Returns:
        ``(B,)`` int64 tensor.
    """
    op = "stratified_timesteps"
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"{op}: batch_size must be an int >= 0, got {batch_size!r}")
    values = check_boundaries(op, boundaries)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator, got {type(generator).__name__}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device) if device is not None else gen_device
    K = len(values) - 1
    widths = torch.tensor([values[k + 1] - values[k] for k in range(K)], dtype=torch.float64)
    share = widths / widths.sum() if proportional else torch.full((K,), 1.0 / K, dtype=torch.float64)
    exact = share * batch_size
    counts = torch.floor(exact).to(torch.int64)
    remainder = batch_size - int(counts.sum())
    if remainder > 0:
        # Largest remainders first; equal fractional parts are ordered at random.
        noise = torch.rand(K, generator=generator, device=gen_device, dtype=torch.float64).cpu()
        order = torch.argsort((exact - counts) + noise * 1e-9, descending=True)
        counts[order[:remainder]] += 1
    lows = torch.tensor(values[:-1], dtype=torch.int64).repeat_interleave(counts)
    spans = widths.to(torch.int64).repeat_interleave(counts)
    u = torch.rand(batch_size, generator=generator, device=gen_device, dtype=torch.float64).cpu()
    t = lows + torch.minimum((u * spans).to(torch.int64), spans - 1)
    if device.type == "cuda":
        # A pinned, non-blocking copy: a pageable host-to-device copy would synchronise the stream.
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


__all__ = [
    "Routing",
    "segment_route",
    "segment_gather",
    "segment_scatter",
    "segment_mse",
    "stratified_timesteps",
]

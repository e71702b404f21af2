"""``MultiStudent``: K timestep-segment students (O2MKD) behind the signature of one diffusers UNet.

Student ``k`` owns the timesteps ``boundaries[k] <= t < boundaries[k+1]``. ``forward(sample,
timestep, *args, **kwargs)`` takes exactly what the students take and returns what they return
(``.sample`` works, ``return_dict=False`` works):

* a scalar timestep (a Python number, a 0-d or one-element tensor: every diffusers sampling loop)
  goes straight to the owning student, with no routing work;
* a per-sample ``(B,)`` timestep tensor is routed: :func:`fastdistill.segment_route` sorts the batch
  by segment, every batch-major argument (``sample``, ``encoder_hidden_states``, nested
  ``added_cond_kwargs``, ...) is gathered in one launch, each non-empty segment runs its student,
  and the outputs are scattered back to the batch order in one launch. The K+1 segment offsets are
  the only values copied to the host (one copy per step).

Execution of the routed step:

* ``fused=False`` (loop, the default): one call per non-empty segment on its slice; empty segments
  are skipped (an empty batch crashes diffusers attention). On CUDA the students run on separate
  streams so their kernels can overlap.
* ``fused=True`` (horizontal fusion, students of one architecture): the students' parameters are
  stacked (``torch.stack``, differentiable, so the gradients land in each student's own
  parameters; this is ``torch.func.stack_module_state`` with autograd kept) and one
  ``torch.func.vmap`` of ``functional_call`` runs all K students as one batched model. Each segment
  is padded to a common capacity (a multiple of ``capacity_multiple``, or a fixed ``capacity``).
  With a fixed ``capacity`` on CUDA nothing is read on the host (range and capacity are checked by a
  device-side assert), so shapes are static and the step can be captured in a CUDA graph. Under
  ``torch.compile`` this host-free route is taken on every device, so a fixed-capacity fused
  MultiStudent compiles with ``fullgraph=True`` (the loop and the automatic capacity read the segment
  sizes on the host, a graph break). Padding rows repeat a real row of their segment and are dropped;
  they get no gradient.
* ``fused="auto"``: accepted for compatibility and means ``False``: no GPU benchmark has shown the
  fused path faster than the loop yet (``bench/bench_o2mkd.py`` measures both). ``"auto"`` will pick
  the fused path only by a measured, documented rule.

Fused path, stacked-weight cache: the stacked parameters and buffers are kept between forwards and
rebuilt only when a source tensor changed: the cache key holds each parameter's and buffer's identity,
``_version`` counter (bumped by every in-place update: optimizer steps, ``load_state_dict``,
``p.add_(...)`` under ``no_grad``), storage pointer, device, dtype, shape and ``requires_grad``, plus the
grad / inference mode it was built in. Reusing the stacked tensor across backward passes is exact (the
stack's backward saves nothing). Writes through ``p.data`` bypass the version counter: call
:meth:`MultiStudent.clear_stack_cache` after them. The cache holds one stacked copy of the students'
weights (the memory every fused forward held anyway) and is not copied by ``copy.deepcopy`` or pickled.

Fused path, attention: ``vmap`` has batching rules for the CUDA SDPA kernels (flash, memory-efficient,
cuDNN) but not for CPU flash attention, where it would fall back to a loop over the K students (a
"performance drop" warning). Off CUDA the fused forward therefore runs under
``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``: SDPA decomposes into matmul + softmax, which vmap
batches into one call over all students (it materialises the ``(L, S)`` attention matrix per head, as the
math backend does). Attention implemented by a custom op without a vmap rule (e.g. a custom processor)
is not covered; use the loop for such students.

DDP: a student with no sample in a step gets no gradient, and plain DDP then fails on the next
iteration ("Expected to have finished reduction ..."). While ``torch.distributed`` is initialised
(or with ``touch_skipped=True``), every skipped student is touched: ``0 * sum`` of one element of
each of its parameters is added to the output, so its parameters get exact zero gradients, DDP's
reducer sees them used, and the output value is unchanged. This is cheaper than
``find_unused_parameters=True`` and keeps the graph static. The fused path uses every student
every step and needs no touch.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..ops import routing as _routing
from ..ops._common import value_checks_enabled

__all__ = ["MultiStudent"]

# Side streams per device, shared by every MultiStudent (one per concurrently running student).
_STREAMS: dict[torch.device, list["torch.cuda.Stream"]] = {}


def _stack_named(per: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    """``{name: torch.stack([students' tensor name])}`` (differentiable). The fused path's one restack."""
    return {name: torch.stack([d[name] for d in per]) for name in names}


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t._version, t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.requires_grad)


class _StackCache:
    """The fused path's stacked parameters and buffers, valid while every source tensor (and the stacked
    tensors themselves) are unchanged. Weak references to the sources: the cache never keeps a replaced
    parameter alive. ``copy.deepcopy`` and pickling give an empty cache (stacked tensors are graph outputs)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.refs: list[weakref.ReferenceType] = []
        self.keys: list[tuple] = []
        self.mode: tuple = ()
        self.params: Optional[dict[str, torch.Tensor]] = None
        self.buffers: Optional[dict[str, torch.Tensor]] = None
        self.stacked_versions: list[int] = []

    def __reduce__(self) -> tuple:
        return (_StackCache, ())

    def _stacked(self) -> list[torch.Tensor]:
        return list((self.params or {}).values()) + list((self.buffers or {}).values())

    def lookup(self, sources: list[torch.Tensor], mode: tuple) -> bool:
        if self.params is None or len(sources) != len(self.refs):
            return False
        grad_built, inference = self.mode
        if inference != mode[1] or (mode[0] and not grad_built):
            return False  # a no-grad build cannot serve a grad forward; inference tensors stay in inference mode
        if any(r() is not t for r, t in zip(self.refs, sources)):
            return False
        if any(k != _tensor_key(t) for k, t in zip(self.keys, sources)):
            return False
        # the stacked copies themselves must be untouched (an in-place buffer update inside a forward)
        return [t._version for t in self._stacked()] == self.stacked_versions

    def store(self, sources: list[torch.Tensor], mode: tuple, params: dict[str, torch.Tensor],
              buffers: dict[str, torch.Tensor]) -> None:
        self.refs = [weakref.ref(t) for t in sources]
        self.keys = [_tensor_key(t) for t in sources]
        self.mode = mode
        self.params, self.buffers = params, buffers
        self.stacked_versions = [t._version for t in self._stacked()]


def _architecture_key(module: nn.Module) -> tuple:
    config = getattr(module, "config", None)
    config_key = tuple(sorted((k, repr(v)) for k, v in dict(config).items())) if config is not None else None
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())
    buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in module.named_buffers())
    return type(module), config_key, params, buffers


def _check_int(op: str, name: str, value: Any, what: str = "a positive int") -> None:
    """TypeError unless an int (bools refused), ValueError unless >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be {what}, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{op}: {name} must be {what}, got {value!r}")


def _batched_attention(device: torch.device) -> Any:
    """Context of the fused vmap: off CUDA, SDPA on its math backend (batched by vmap, module docstring)."""
    import contextlib

    if device.type == "cuda":
        return contextlib.nullcontext()  # the CUDA SDPA kernels have vmap batching rules
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


class MultiStudent(nn.Module):
    """K students, each owning a contiguous timestep range, used as one diffusers UNet.

    Args:
        students: K modules with a diffusers UNet forward ``(sample, timestep, *args, **kwargs)``
            (``UNet2DModel``, ``UNet2DConditionModel``, or anything with that calling convention).
        boundaries: K+1 strictly increasing ints, ``0 = boundaries[0] < ... < boundaries[K] =
            num_train_timesteps``; student ``k`` owns ``boundaries[k] <= t < boundaries[k+1]``.
        num_train_timesteps: T of the noise schedule (the last boundary).
        fused: ``False`` (default: one call per non-empty segment), ``True`` (horizontal fusion with a
            stacked-weight cache; the students must share one architecture) or ``"auto"`` (currently
            the same as ``False``, see the module docstring).
        touch_skipped: zero-weight touch of skipped students' parameters for DDP (see the module
            docstring); ``None`` = whenever ``torch.distributed`` is initialised.
        capacity: fused path only: fixed per-segment capacity (every segment padded to it; a
            segment with more samples raises). ``None``: the step's largest segment rounded up to a
            multiple of ``capacity_multiple``.
        capacity_multiple: rounding of the automatic capacity (fewer distinct shapes).

    Attributes ``config``, ``dtype`` and ``device`` are those of the first student, so diffusers
    pipelines (``DDIMPipeline(unet=MultiStudent(...), scheduler=...)``) accept it.

    Raises ``TypeError`` for arguments of the wrong type and ``ValueError`` for wrong values.
    """

    def __init__(self, students: Sequence[nn.Module], boundaries: Union[Sequence[int], torch.Tensor], *,
                 num_train_timesteps: int = 1000, fused: Union[bool, str] = False,
                 touch_skipped: Optional[bool] = None, capacity: Optional[int] = None,
                 capacity_multiple: int = 8) -> None:
        super().__init__()
        op = "MultiStudent"
        if isinstance(students, nn.Module) and not isinstance(students, (nn.ModuleList, nn.Sequential)):
            raise TypeError(f"{op}: students must be a sequence of nn.Modules, got a single {type(students).__name__}")
        students = list(students)
        if not students:
            raise ValueError(f"{op}: students must hold at least one module")
        for i, s in enumerate(students):
            if not isinstance(s, nn.Module):
                raise TypeError(f"{op}: students[{i}] must be an nn.Module, got {type(s).__name__}")
        _check_int(op, "num_train_timesteps", num_train_timesteps)
        values = _routing.check_boundaries(op, boundaries, num_train_timesteps=num_train_timesteps)
        if len(values) != len(students) + 1:
            raise ValueError(f"{op}: {len(students)} students need {len(students) + 1} boundaries, got "
                             f"{len(values)} ({list(values)})")
        if isinstance(fused, str):
            if fused != "auto":
                raise ValueError(f"{op}: fused must be True, False or 'auto', got the string {fused!r}")
        elif not isinstance(fused, bool):
            raise TypeError(f"{op}: fused must be a bool (or 'auto'), got {type(fused).__name__} {fused!r}")
        if touch_skipped is not None and not isinstance(touch_skipped, bool):
            raise TypeError(f"{op}: touch_skipped must be a bool or None, got {type(touch_skipped).__name__}")
        if capacity is not None:
            _check_int(op, "capacity", capacity, "a positive int or None")
        _check_int(op, "capacity_multiple", capacity_multiple)
        self.students = nn.ModuleList(students)
        self.boundaries: tuple[int, ...] = values
        self.num_train_timesteps = num_train_timesteps
        self.capacity = capacity
        self.capacity_multiple = capacity_multiple
        self.touch_skipped = touch_skipped
        keys = {_architecture_key(s) for s in students}
        self.same_architecture = len(keys) == 1
        if fused is True and not self.same_architecture:
            raise ValueError(f"{op}: fused=True needs students of one architecture (same class, config and "
                             f"parameter shapes); these differ. Use fused=False")
        self.fused = fused
        self._stack_cache = _StackCache()

    # -- what diffusers pipelines read from their unet ------------------------------------------
    @property
    def config(self) -> Any:
        """The first student's diffusers config (pipelines read it from their ``unet``)."""
        return getattr(self.students[0], "config", None)

    @property
    def dtype(self) -> torch.dtype:
        """The students' parameter dtype."""
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        """The students' device."""
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def num_students(self) -> int:
        """K, the number of students."""
        return len(self.students)

    def extra_repr(self) -> str:
        return f"boundaries={list(self.boundaries)}, fused={self.fused!r}"

    # -- helpers ----------------------------------------------------------------------------------
    def student_for(self, timestep: Union[int, float, torch.Tensor]) -> int:
        """Index of the student owning a scalar ``timestep`` (raises ValueError when out of range)."""
        t = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
        if not (self.boundaries[0] <= t < self.boundaries[-1]):
            raise ValueError(f"MultiStudent: timestep {t} is outside [0, num_train_timesteps = "
                             f"{self.num_train_timesteps})")
        for k in range(self.num_students):
            if t < self.boundaries[k + 1]:
                return k
        raise AssertionError("unreachable")

    def _use_fused(self, device: torch.device) -> bool:
        # "auto" = the loop until a GPU benchmark shows the fused path winning (module docstring)
        return self.fused is True

    def clear_stack_cache(self) -> None:
        """Drop the fused path's stacked weights; the next fused forward restacks. Needed only after
        writes that bypass the version counters (``p.data.copy_(...)``); optimizer steps,
        ``load_state_dict`` and in-place updates of the parameters themselves are detected."""
        self._stack_cache.clear()

    def _stacked_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Stacked ``(params, buffers)`` of the K students, from the cache when nothing changed."""
        per = [dict(s.named_parameters()) for s in self.students]
        perb = [dict(s.named_buffers()) for s in self.students]
        names = list(per[0])
        bnames = list(perb[0])
        sources = [d[n] for d in per for n in names] + [d[n] for d in perb for n in bnames]
        if torch.compiler.is_compiling():
            # The stack is part of the traced graph (no cache; dynamo cannot trace the mode queries).
            return _stack_named(per, names), _stack_named(perb, bnames)
        mode = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        cache = self._stack_cache
        if cache.lookup(sources, mode):
            return cache.params, cache.buffers  # type: ignore[return-value]
        params, buffers = _stack_named(per, names), _stack_named(perb, bnames)
        cache.store(sources, mode, params, buffers)
        return params, buffers

    def _should_touch(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        if self.touch_skipped is not None:
            return bool(self.touch_skipped)
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def _touch(self, out: Any, skipped: Sequence[int]) -> Any:
        """Add ``0 * (one element of every parameter of the skipped students)`` to the first floating
        output leaf: exact zero gradients, unchanged values, and DDP sees the parameters used."""
        firsts = [p.reshape(-1)[:1] for k in skipped for p in self.students[k].parameters()
                  if p.requires_grad and p.numel() > 0]
        if not firsts:
            return out
        zero = torch.cat([f.to(firsts[0].dtype) for f in firsts]).sum() * 0.0
        leaves, spec = pytree.tree_flatten(out)
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
                leaves[i] = leaf + zero.to(leaf.dtype)
                break
        return pytree.tree_unflatten(leaves, spec)

    def _cuda_streams(self, device: torch.device, n: int) -> list[torch.cuda.Stream]:
        # Module-level pool (not an attribute): streams cannot be deep-copied or pickled with the module.
        streams = _STREAMS.setdefault(device, [])
        while len(streams) < n:
            streams.append(torch.cuda.Stream(device=device))
        return streams[:n]

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int], *args: Any,
                **kwargs: Any) -> Any:
        """Same arguments and return type as the students' forward (see the class docstring)."""
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"MultiStudent: sample must be a torch.Tensor, got {type(sample).__name__}")
        if sample.dim() < 1:
            raise ValueError("MultiStudent: sample must be batch-major (at least 1-D), got a 0-d tensor")
        B = sample.shape[0]
        if not isinstance(timestep, torch.Tensor):
            if isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
                raise TypeError(f"MultiStudent: timestep must be a number or a tensor, got {type(timestep).__name__}")
            return self._single(self.student_for(timestep), sample, timestep, args, kwargs)
        if timestep.numel() == 1 and timestep.dim() <= 1:
            # One timestep for the whole batch (sampling): one student, no routing. A CUDA scalar
            # costs one host read, the same as routing's offsets copy.
            return self._single(self.student_for(timestep.reshape(())), sample, timestep, args, kwargs)
        if timestep.dim() != 1 or timestep.shape[0] != B:
            raise ValueError(f"MultiStudent: timestep must be a scalar or have shape ({B},) for a batch of {B}, "
                             f"got {tuple(timestep.shape)}")
        if timestep.device != sample.device:
            timestep = timestep.to(sample.device)
        bnd = _routing.boundaries_tensor(self.boundaries, sample.device)
        routing = _routing._route(_routing._check_timesteps("MultiStudent", timestep), bnd)
        if self.capacity is not None and self._use_fused(sample.device) and not value_checks_enabled(sample.device):
            # Fixed capacity where host checks are off (CUDA by default, under torch.compile on any device,
            # FASTDISTILL_VALUE_CHECKS=0): nothing is read on the host,
            # so shapes are static (the step can be captured in a CUDA graph, and compiled with
            # fullgraph=True). Range and capacity are checked by a device-side assert instead.
            return self._fused(routing, None, sample, timestep, args, kwargs)
        offsets = routing.host_offsets()  # the step's one host copy; raises for out-of-range timesteps
        counts = [offsets[k + 1] - offsets[k] for k in range(self.num_students)]
        active = [k for k, n in enumerate(counts) if n > 0]
        if len(active) == 1:
            # Every sample belongs to one student: no reordering needed at all.
            return self._single(active[0], sample, timestep, args, kwargs)
        if self._use_fused(sample.device):
            return self._fused(routing, counts, sample, timestep, args, kwargs)
        return self._loop(routing, offsets, active, sample, timestep, args, kwargs)

    def _single(self, k: int, sample: torch.Tensor, timestep: Any, args: tuple, kwargs: dict) -> Any:
        out = self.students[k](sample, timestep, *args, **kwargs)
        skipped = [j for j in range(self.num_students) if j != k]
        if skipped and self._should_touch():
            out = self._touch(out, skipped)
        return out

    def _loop(self, routing: _routing.Routing, offsets: list[int], active: list[int], sample: torch.Tensor,
              timestep: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        B = sample.shape[0]
        g_sample, g_t, g_args, g_kwargs = _routing._permute_structures(
            "MultiStudent", routing, (sample, timestep, args, kwargs), routing.permutation, routing.inverse,
            strict=False)

        def piece(x: Any, lo: int, hi: int) -> Any:
            return x[lo:hi] if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == B else x

        use_streams = sample.device.type == "cuda" and len(active) > 1 and not torch.compiler.is_compiling()
        outs: list[Any] = []
        if use_streams:
            main = torch.cuda.current_stream(sample.device)
            streams = self._cuda_streams(sample.device, len(active))
            for k, stream in zip(active, streams):
                stream.wait_stream(main)
            for k, stream in zip(active, streams):
                lo, hi = offsets[k], offsets[k + 1]
                a = pytree.tree_map(lambda x: piece(x, lo, hi), (g_sample, g_t, g_args, g_kwargs))
                with torch.cuda.stream(stream):
                    out = self.students[k](a[0], a[1], *a[2], **a[3])
                for leaf in pytree.tree_leaves(out):
                    if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
                        leaf.record_stream(main)  # consumed on the main stream after the join below
                outs.append(out)
            for stream in streams:
                main.wait_stream(stream)
        else:
            for k in active:
                lo, hi = offsets[k], offsets[k + 1]
                a = pytree.tree_map(lambda x: piece(x, lo, hi), (g_sample, g_t, g_args, g_kwargs))
                outs.append(self.students[k](a[0], a[1], *a[2], **a[3]))

        # Join: concatenate the segments' batch-major output leaves, then ONE scatter launch.
        flat = [pytree.tree_flatten(o) for o in outs]
        spec = flat[0][1]
        merged = []
        for i, first in enumerate(flat[0][0]):
            if isinstance(first, torch.Tensor) and first.dim() >= 1 and first.shape[0] == offsets[active[0] + 1] - offsets[active[0]]:
                merged.append(torch.cat([f[0][i] for f in flat], dim=0))
            else:
                merged.append(first)
        batch_major = [isinstance(m, torch.Tensor) and m.dim() >= 1 and m.shape[0] == B for m in merged]
        moved = _routing._permute([m for m, bm in zip(merged, batch_major) if bm], routing.inverse,
                                  routing.permutation) if any(batch_major) else []
        it = iter(moved)
        result = pytree.tree_unflatten([next(it) if bm else m for m, bm in zip(merged, batch_major)], spec)
        skipped = [k for k in range(self.num_students) if k not in active]
        if skipped and self._should_touch():
            result = self._touch(result, skipped)
        return result

    def _fused(self, routing: _routing.Routing, counts: Optional[list[int]], sample: torch.Tensor, timestep: torch.Tensor,
               args: tuple, kwargs: dict) -> Any:
        from torch.func import functional_call, vmap

        K, B, dev = self.num_students, sample.shape[0], sample.device
        offs = routing.offsets
        n = offs[1:] - offs[:-1]
        if counts is None:  # fixed capacity, host-free step (see forward)
            cap = self.capacity
            torch._assert_async((offs[-1] == B) & (n.max() <= cap),
                                f"MultiStudent: a timestep is outside [0, {self.num_train_timesteps}) or a "
                                f"segment holds more than capacity={cap} samples")
        elif self.capacity is not None:
            largest = max(counts)
            if largest > self.capacity:
                raise ValueError(f"MultiStudent: a segment holds {largest} samples, more than capacity="
                                 f"{self.capacity}; raise capacity or use stratified_timesteps")
            cap = self.capacity
        else:
            cap = int(math.ceil(max(counts) / self.capacity_multiple) * self.capacity_multiple)
        # Rows of the padded (K, cap) layout, on the device: slot j of segment k reads sorted position
        # offsets[k] + min(j, n_k - 1); an empty segment reads row 0 (dropped anyway).
        j = torch.arange(cap, device=dev)
        pos = offs[:-1, None] + torch.minimum(j[None, :], (n - 1).clamp(min=0)[:, None])
        rows = routing.permutation[pos.clamp(max=max(B - 1, 0)).reshape(-1)]
        # Where each original sample's output sits in the flat (K * cap) result.
        seg = routing.segment_ids
        back = seg * cap + routing.inverse - offs[seg]

        leaves, spec = pytree.tree_flatten((sample, timestep, args, kwargs))
        batched = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == B]
        padded = [leaves[i].index_select(0, rows).reshape(K, cap, *leaves[i].shape[1:]) for i in batched]

        params, buffers = self._stacked_state()
        base = self.students[0]
        out_spec: list[Any] = []

        def one_student(p: dict, b: dict, *xs: torch.Tensor) -> tuple:
            local = list(leaves)
            for i, x in zip(batched, xs):
                local[i] = x
            s, t, a, kw = pytree.tree_unflatten(local, spec)
            out = functional_call(base, (p, b), (s, t, *a), kw, strict=False)
            o_leaves, o_spec = pytree.tree_flatten(out)
            out_spec[:] = [o_spec, [None if isinstance(x, torch.Tensor) else (x,) for x in o_leaves]]
            return tuple(x for x in o_leaves if isinstance(x, torch.Tensor))

        with _batched_attention(dev):
            outs = vmap(one_student, in_dims=(0, 0) + (0,) * len(padded))(params, buffers, *padded)
        o_spec, others = out_spec
        it = iter(outs)
        result_leaves = []
        for other in others:
            if other is not None:
                result_leaves.append(other[0])
            else:
                y = next(it)  # (K, cap, ...)
                result_leaves.append(y.reshape(K * cap, *y.shape[2:]).index_select(0, back))
        return pytree.tree_unflatten(result_leaves, o_spec)

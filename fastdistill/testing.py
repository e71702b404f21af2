"""Test harness shared by every op test (and usable for kernels written on top of fastdistill).

The contract a kernel is held to:

* fresh random inputs on every run (the seed is printed on failure and can be pinned with
  ``FASTDISTILL_TEST_SEED``), of awkward sizes: not multiples of block sizes, including 1;
* outputs poisoned before the kernel runs (:func:`fastdistill._alloc.poison_outputs`), so an
  element the kernel never wrote fails the comparison;
* value and gradients compared against a float64 reference computed from the same inputs, with
  tolerances by dtype (:data:`TOLERANCES`), on every backend that can run here;
* a non-trivial upstream gradient (not all ones), so a backward that ignores ``grad_output``
  fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from . import _triton, dispatch
from ._alloc import poison_outputs

#: Relative tolerance by input dtype: max|actual - expected| <= rtol * max(max|expected|, floor).
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}

#: Sizes that are not multiples of any block size used in fastdistill's kernels (and 1).
AWKWARD_SIZES: tuple[int, ...] = (1, 3, 7, 17, 33, 67, 130)

# One base seed per test; every draw in the test takes the next seed of a sequence derived from it, so
# pinning the base (FASTDISTILL_TEST_SEED) replays every draw of a failing test exactly.
_TEST_SEED: list[int | None] = [None]
_DRAWS: list[int] = [0]


@contextlib.contextmanager
def deterministic_algorithms(on: bool = True):
    """Run the block with ``torch.use_deterministic_algorithms(on)`` and restore the previous setting
    (and its ``warn_only`` flag) after: the switch that selects the kernels' atomics-free paths.

    Example::

        with deterministic_algorithms(True):
            loss.backward()   # no atomics: bit-identical gradients across runs
    """
    if not isinstance(on, bool):
        raise TypeError(f"deterministic_algorithms: on must be a bool, got {type(on).__name__}")
    prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn)


def start_test_seed() -> int:
    """Begin a test: a fresh base seed (or ``FASTDISTILL_TEST_SEED``). The test suite calls it per test."""
    pinned = os.environ.get("FASTDISTILL_TEST_SEED")
    _TEST_SEED[0] = int(pinned) if pinned else secrets.randbits(31)
    _DRAWS[0] = 0
    return _TEST_SEED[0]


def new_seed() -> int:
    """The next seed of the current test's sequence (deterministic given :func:`last_seed`)."""
    if _TEST_SEED[0] is None:
        start_test_seed()
    seed = (_TEST_SEED[0] + 1_000_003 * _DRAWS[0]) % (1 << 31)
    _DRAWS[0] += 1
    return seed


def last_seed() -> int:
    """The current test's base seed: ``FASTDISTILL_TEST_SEED=<it>`` reproduces all of its draws."""
    if _TEST_SEED[0] is None:
        start_test_seed()
    return _TEST_SEED[0]  # type: ignore[return-value]


def generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded freshly (see :func:`new_seed`)."""
    g = torch.Generator(device=device)
    g.manual_seed(new_seed())
    return g


def randn(*shape: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
          gen: torch.Generator | None = None, scale: float = 1.0, requires_grad: bool = False) -> torch.Tensor:
    """Normal random tensor drawn in fp32 then cast (so every dtype sees the same values, rounded)."""
    gen = gen or generator("cpu")
    t = (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


def tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance of :data:`TOLERANCES` for ``dtype``."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance defined for dtype {dtype}") from None


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, name: str = "output",
                 floor: float = 1e-6) -> None:
    """Max-norm relative comparison: NaN or Inf in ``actual`` where ``expected`` is finite fails.

    ``floor`` keeps the bound meaningful when the expected tensor is all (near) zero.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    bad = ~torch.isfinite(a) & torch.isfinite(e)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements are NaN/Inf (e.g. at {idx}): an element "
            f"that was never written, or an overflow (seed {last_seed()})")
    if a.numel() == 0:
        return
    err = (a - e).abs().max().item()
    scale = max(e.abs().max().item(), floor)
    if not err <= rtol * scale:
        where = (a - e).abs().argmax().item()
        raise AssertionError(
            f"{name}: max abs error {err:.3e} > {rtol:.1e} * {scale:.3e} (relative {err / scale:.3e}); "
            f"worst flat index {where}: got {a.flatten()[where].item():.6e}, "
            f"expected {e.flatten()[where].item():.6e} (seed {last_seed()})")


def _to_float64(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dtype.is_floating_point:
        return x.detach().to(torch.float64).requires_grad_(x.requires_grad)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_float64(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_float64(v) for k, v in x.items()}
    return x


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        flat: list[torch.Tensor] = []
        for o in out:
            flat.extend(_flat_outputs(o))
        return flat
    if hasattr(out, "_fields"):
        return _flat_outputs(tuple(out))
    raise TypeError(f"cannot compare output of type {type(out).__name__}")


def _grad_leaves(args: Any) -> list[torch.Tensor]:
    leaves: list[torch.Tensor] = []
    if isinstance(args, torch.Tensor):
        if args.requires_grad:
            leaves.append(args)
    elif isinstance(args, (list, tuple)):
        for a in args:
            leaves.extend(_grad_leaves(a))
    elif isinstance(args, dict):
        for a in args.values():
            leaves.extend(_grad_leaves(a))
    return leaves


@dataclass
class CheckResult:
    """What :func:`check_against_reference` compared: the op's outputs and input gradients."""
    outputs: list[torch.Tensor]
    grads: list[torch.Tensor | None]


def check_against_reference(
    fn: Callable[..., Any],
    reference: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    dtype: torch.dtype,
    backend: str | None = None,
    rtol: float | None = None,
    grad_rtol: float | None = None,
    check_grads: bool = True,
) -> CheckResult:
    """Run ``fn(*args, **kwargs)`` (on ``backend``, outputs poisoned) and compare with
    ``reference`` evaluated in float64 on upcast copies of the same inputs.

    Every floating tensor in ``args``/``kwargs`` with ``requires_grad`` gets its gradient compared
    too, under a random upstream gradient. ``dtype`` picks the tolerance (the dtype the kernel
    computes in); ``rtol``/``grad_rtol`` override it.
    """
    kwargs = kwargs or {}
    rtol = tolerance(dtype) if rtol is None else rtol
    grad_rtol = rtol if grad_rtol is None else grad_rtol
    leaves = _grad_leaves((args, kwargs))

    def forced():  # a fresh context each time: a generator-based context manager enters only once
        return dispatch.use_backend(backend) if backend is not None else _nullcontext()

    with forced(), poison_outputs():
        out = fn(*args, **kwargs)
    outs = _flat_outputs(out)

    ref_args, ref_kwargs = _to_float64(list(args)), _to_float64(kwargs)
    ref_leaves = _grad_leaves((ref_args, ref_kwargs))
    with dispatch.use_backend("reference"):
        ref_out = reference(*ref_args, **ref_kwargs)
    ref_outs = _flat_outputs(ref_out)
    if len(outs) != len(ref_outs):
        raise AssertionError(f"{len(outs)} outputs but the reference gave {len(ref_outs)}")
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        if o.dtype.is_floating_point:
            assert_close(o, r, rtol=rtol, name=f"output[{i}] ({backend or 'auto'}, {dtype})")
        else:
            if not torch.equal(o.cpu(), r.cpu()):
                raise AssertionError(f"output[{i}] ({backend or 'auto'}): integer output differs "
                                     f"(seed {last_seed()})")

    grads: list[torch.Tensor | None] = []
    if check_grads and leaves:
        diff = [(i, o, r) for i, (o, r) in enumerate(zip(outs, ref_outs)) if o.requires_grad]
        if not diff:
            raise AssertionError("inputs require grad but no output does")
        gen = generator("cpu")
        upstream = [torch.rand(o.shape, generator=gen, dtype=torch.float64) + 0.5 for _, o, _ in diff]
        with forced():
            got = torch.autograd.grad([o for _, o, _ in diff], leaves,
                                      [u.to(o.dtype).to(o.device) for u, (_, o, _) in zip(upstream, diff)],
                                      allow_unused=True)
        want = torch.autograd.grad([r for _, _, r in diff], ref_leaves,
                                   [u.to(r.device) for u, (_, _, r) in zip(upstream, diff)], allow_unused=True)
        for j, (g, w) in enumerate(zip(got, want)):
            if w is None:
                if g is not None and g.abs().max().item() != 0:
                    raise AssertionError(f"grad[{j}]: reference has no gradient but the op gave a nonzero one")
                grads.append(g)
                continue
            if g is None:
                raise AssertionError(f"grad[{j}]: the op gave no gradient; the reference does")
            assert_close(g, w, rtol=grad_rtol, name=f"grad[{j}] ({backend or 'auto'}, {dtype})")
            grads.append(g)
    return CheckResult(outputs=outs, grads=grads)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def backends_under_test(op: str, device: torch.device | str = "cpu",
                        include: Iterable[str] | None = None) -> list[str]:
    """Backends of ``op`` that can run on ``device`` here (optionally only those in ``include``)."""
    found = dispatch.available_backends(op, device)
    if include is not None:
        wanted = set(include)
        found = [b for b in found if b in wanted]
    return found


# ----------------------------------------------------------------------------------------------
# (backend, device) parametrisation: the suite does not shrink on a GPU host
# ----------------------------------------------------------------------------------------------

#: Devices a backend runs tensors of (``cpp`` is CPU only, ``cuda`` CUDA only; ``triton`` runs CUDA
#: tensors, and CPU tensors under the interpreter).
BACKEND_DEVICES: dict[str, tuple[str, ...]] = {
    "triton": ("cpu", "cuda"),
    "cuda": ("cuda",),
    "cpp": ("cpu",),
    "reference": ("cpu", "cuda"),
}

#: Marker name of a case whose backend is declared but cannot run where it must (see :class:`BackendCase`).
UNAVAILABLE_MARKER = "backend_unavailable"

NO_GPU_REASON = "needs a CUDA GPU (none visible); on a GPU machine `python -m pytest -m gpu` runs these"


@dataclass(frozen=True)
class BackendCase:
    """One (backend, device) case of an op test and what should happen to it in this process.

    ``status`` is ``"run"`` (the backend runs tensors of ``device`` here), ``"skip"`` (the device is not
    in this session: no GPU visible, or the Triton interpreter has moved the Triton cases to CPU) or
    ``"fail"`` (the op declares the backend and it must run here, but cannot: Triton missing on a CUDA
    host, the extension built without CUDA, the extension not loaded). ``reason`` says why for the
    last two. A failing case is a failing test, never a smaller parametrisation.
    """

    op: str
    backend: str
    device: str
    status: str
    reason: str | None = None

    @property
    def id(self) -> str:
        """``"triton"`` for CPU cases (the ids the CPU suite always had), ``"triton-cuda"`` for CUDA ones."""
        return self.backend if self.device == "cpu" else f"{self.backend}-{self.device}"

    def marks(self) -> list[Any]:
        """pytest marks: ``gpu`` on CUDA cases, a skip for ``"skip"``, the unavailable marker for ``"fail"``."""
        import pytest

        marks: list[Any] = []
        if self.device == "cuda":
            marks.append(pytest.mark.gpu)
        if self.status == "skip":
            marks.append(pytest.mark.skip(reason=self.reason or "not in this session"))
        elif self.status == "fail":
            marks.append(getattr(pytest.mark, UNAVAILABLE_MARKER)(op=self.op, backend=self.backend,
                                                                  device=self.device, reason=self.reason))
        return marks

    def param(self, *values: Any, id: str | None = None) -> Any:
        """``pytest.param(backend, device, *values)`` with this case's id (``id`` appended) and marks."""
        import pytest

        full_id = self.id if id is None else f"{self.id}-{id}"
        return pytest.param(self.backend, self.device, *values, id=full_id, marks=self.marks())


def _cuda_visible() -> bool:
    return torch.cuda.is_available()


def backend_device_cases(op: str, include: Iterable[str] | None = None) -> list[BackendCase]:
    """Every (backend, device) case of ``op``: CPU cases first, then CUDA cases, each in the op's order.

    The list is the same on every host, except that the CPU Triton case appears only in the session that
    tests Triton on CPU (the interpreter is on, or no GPU is there to test it on); only the status changes:

    * CPU: ``reference`` always runs; ``cpp`` must run (the extension is part of the build); ``triton``
      must run when ``TRITON_INTERPRET=1``, and fails when neither the interpreter nor a GPU is there
      (Triton would be tested nowhere).
    * CUDA (marked ``gpu``): skipped when no GPU is visible; otherwise ``triton``, ``cuda`` and
      ``reference`` must run (Triton with the interpreter on is skipped: it runs the CPU cases then).

    ``include`` keeps only those backends (names must be fastdistill backends).
    """
    try:
        spec = dispatch.registered_ops()[op]
    except KeyError:
        raise KeyError(f"fastdistill op {op!r} is not registered") from None
    backends = list(spec.backends)
    if include is not None:
        wanted = set(include)
        unknown = wanted - set(dispatch.BACKENDS)
        if unknown:
            raise ValueError(f"include names unknown backend(s) {sorted(unknown)}; known: {dispatch.BACKENDS}")
        backends = [b for b in backends if b in wanted]
    cuda = _cuda_visible()
    interpret = _triton.interpret_mode()
    cases: list[BackendCase] = []
    for device in ("cpu", "cuda"):
        for backend in backends:
            if device not in BACKEND_DEVICES[backend]:
                continue
            if device == "cpu" and backend == "triton" and not interpret:
                if cuda:
                    continue  # Triton is tested on CUDA tensors in this session (the triton-cuda cases)
                cases.append(BackendCase(op, backend, device, "fail",
                                         "Triton runs CPU tensors only under TRITON_INTERPRET=1 and no CUDA GPU is "
                                         "visible, so Triton would be tested nowhere (unset "
                                         "FASTDISTILL_TEST_INTERPRET=0, or run on a GPU)"))
                continue
            if device == "cuda":
                if not cuda:
                    cases.append(BackendCase(op, backend, device, "skip", NO_GPU_REASON))
                    continue
                if backend == "triton" and interpret:
                    cases.append(BackendCase(op, backend, device, "skip",
                                             "TRITON_INTERPRET=1 in this session: Triton runs the CPU cases "
                                             "(FASTDISTILL_TEST_INTERPRET=0 tests it on the GPU)"))
                    continue
            reason = dispatch.why_unavailable(backend, device)
            cases.append(BackendCase(op, backend, device, "run" if reason is None else "fail", reason))
    return cases


def triton_device() -> str:
    """The device whose tensors the Triton backend runs in this session: ``"cpu"`` under
    ``TRITON_INTERPRET=1``, else ``"cuda"`` when a GPU is visible, else ``"cpu"`` (a forced Triton call
    then fails with the reason). For tests that force ``triton`` outside the (backend, device) cases."""
    if _triton.interpret_mode() or not _cuda_visible():
        return "cpu"
    return "cuda"


def backend_device_params(op: str, include: Iterable[str] | None = None) -> list[Any]:
    """``pytest.param(backend, device)`` for every case of :func:`backend_device_cases` (ids ``triton``,
    ``cpp``, ``reference`` on CPU; ``triton-cuda``, ``cuda-cuda``, ``reference-cuda`` on CUDA).

    >>> @pytest.mark.parametrize("backend,device", backend_device_params("pd_loss"))  # doctest: +SKIP
    ... def test_pd_loss(backend, device): ...

    Tests create their inputs on ``device``; a case that cannot run where it must fails with the reason
    (tests/conftest.py acts on the marker through :func:`fail_if_unavailable`).
    """
    return [case.param() for case in backend_device_cases(op, include)]


def fail_if_unavailable(item: Any) -> None:
    """Fail a pytest item whose case is declared but cannot run here (call from ``pytest_runtest_call``)."""
    marker = item.get_closest_marker(UNAVAILABLE_MARKER)
    if marker is None:
        return
    import pytest

    kw = marker.kwargs
    pytest.fail(f"{kw['op']}: the {kw['backend']} backend must run {kw['device']} tensors here but cannot: "
                f"{kw['reason']}", pytrace=False)


def to_device(tree: Any, device: torch.device | str) -> Any:
    """Tensors in ``tree`` (lists, tuples, dicts) moved to ``device`` as fresh leaves keeping ``requires_grad``;
    tensors already there are returned as they are."""
    if isinstance(tree, torch.Tensor):
        want = torch.device(device)
        if tree.device.type == want.type and want.index in (None, tree.device.index):
            return tree
        return tree.detach().to(device).requires_grad_(tree.requires_grad)
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(v, device) for v in tree)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    return tree


# ----------------------------------------------------------------------------------------------
# GEMM FLOP counting (executed FLOPs: what the kernels really compute, not a formula)
# ----------------------------------------------------------------------------------------------

#: torch GEMMs the counter knows, by aten overload packet name.
TORCH_GEMMS: tuple[str, ...] = ("mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "mv", "addmv",
                                "dot", "vdot")
# aten ops that may do matrix products the counter cannot size (reported in GemmFlops.uncounted).
_OPAQUE_TORCH = ("einsum", "tensordot", "convolution", "conv", "scaled_dot_product", "_flash_attention",
                 "_efficient_attention", "_cudnn_attention", "_scaled_mm", "_int_mm")


@dataclass(eq=False)  # identity: the active-counter list removes this very counter on exit
class GemmFlops:
    """GEMM FLOPs counted by :func:`count_gemm_flops`: ``2*m*k*n`` per product, summed per source.

    ``triton``: every ``tl.dot`` the Triton interpreter executed (whole tiles, masked rows included:
    count on tile-aligned shapes). ``torch``: every torch GEMM (:data:`TORCH_GEMMS`) dispatched inside
    the block, forward and autograd's backward, including those inside ``torch.library`` custom-op
    bodies. ``by_op`` splits both by op (``"tl.dot"``, ``"aten.mm"``, ...), ``calls`` counts products.
    ``uncounted`` names ops that ran and may multiply matrices without being counted (SDPA, einsum
    reaching the dispatcher, convolutions, an opaque custom op, ``tl.dot_scaled``): a count is only
    complete when it is empty."""

    triton: int = 0
    torch: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    uncounted: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.triton + self.torch

    def units(self, unit: float) -> dict[str, float]:
        """``{"triton", "torch", "total"}`` in multiples of ``unit`` FLOPs (e.g. ``2*N*M*C``)."""
        return {"triton": self.triton / unit, "torch": self.torch / unit, "total": self.total / unit}

    def _add(self, source: str, op: str, flops: int) -> None:
        setattr(self, source, getattr(self, source) + flops)
        self.by_op[op] = self.by_op.get(op, 0) + flops
        self.calls[op] = self.calls.get(op, 0) + 1

    def _opaque(self, name: str) -> None:
        if name not in self.uncounted:
            self.uncounted.append(name)


_ACTIVE_COUNTERS: list[GemmFlops] = []
_DOT_PATCH: list[Any] = []  # [original InterpreterBuilder.create_dot, original create_dot_scaled] while patched


def _prod(xs: Iterable[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _torch_gemm_flops(name: str, args: Sequence[Any]) -> int:
    """``2*m*k*n`` (times the batch) of the aten GEMM ``name`` on ``args`` (tensors' shapes only)."""
    t = [a for a in args if isinstance(a, torch.Tensor)]
    if name in ("mm", "bmm", "matmul"):
        a, b = t[0].shape, t[1].shape
    elif name in ("addmm", "baddbmm", "addmv"):
        a, b = t[1].shape, t[2].shape
    elif name == "addbmm":
        a, b = t[1].shape, t[2].shape
    elif name in ("mv",):
        a, b = t[0].shape, t[1].shape
    elif name in ("dot", "vdot"):
        return 2 * t[0].numel()
    elif name == "linear":  # x (..., k) @ w (n, k)^T
        x, w = t[0].shape, t[1].shape
        return 2 * _prod(x[:-1]) * x[-1] * (w[0] if len(w) == 2 else 1)
    else:
        raise KeyError(name)
    a = (1, *a) if len(a) == 1 else tuple(a)
    b = (*b, 1) if len(b) == 1 else tuple(b)
    batch = torch.broadcast_shapes(torch.Size(a[:-2]), torch.Size(b[:-2]))
    return 2 * _prod(batch) * a[-2] * a[-1] * b[-1]


def _install_dot_patch() -> None:
    """Wrap the interpreter builder's ``create_dot`` (what ``tl.dot`` lowers to under TRITON_INTERPRET=1)."""
    from triton.runtime import interpreter as I

    builder = getattr(I, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_dot"):
        raise RuntimeError("count_gemm_flops: this triton's interpreter has no InterpreterBuilder.create_dot "
                           f"(triton {getattr(__import__('triton'), '__version__', '?')}); cannot count tl.dot")
    orig_dot = builder.create_dot
    orig_scaled = getattr(builder, "create_dot_scaled", None)

    def create_dot(self, a, b, *args, **kwargs):
        # a: (..., M, K), b: (..., K, N) numpy tiles of one program's dot.
        flops = 2 * _prod(a.data.shape) * int(b.data.shape[-1])
        for c in _ACTIVE_COUNTERS:
            c._add("triton", "tl.dot", flops)
        return orig_dot(self, a, b, *args, **kwargs)

    def create_dot_scaled(self, *args, **kwargs):
        for c in _ACTIVE_COUNTERS:
            c._opaque("tl.dot_scaled")
        return orig_scaled(self, *args, **kwargs)

    builder.create_dot = create_dot
    if orig_scaled is not None:
        builder.create_dot_scaled = create_dot_scaled
    _DOT_PATCH[:] = [orig_dot, orig_scaled]


def _remove_dot_patch() -> None:
    from triton.runtime import interpreter as I

    orig_dot, orig_scaled = _DOT_PATCH
    I.InterpreterBuilder.create_dot = orig_dot
    if orig_scaled is not None:
        I.InterpreterBuilder.create_dot_scaled = orig_scaled
    _DOT_PATCH.clear()


def _gemm_mode(counter: GemmFlops):
    """A TorchDispatchMode adding torch GEMMs to ``counter``; custom ops' bodies run inside it too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    try:  # torch.library.custom_op definitions by qualified name (private, stable since torch 2.4)
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # pragma: no cover - older/newer torch: custom-op bodies stay opaque (reported)
        OPDEFS = {}

    class _GemmMode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            ns = getattr(func, "namespace", "aten")
            name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
            if ns == "aten":
                if name in TORCH_GEMMS:
                    counter._add("torch", f"aten.{name}", _torch_gemm_flops(name, args))
                elif any(k in name for k in _OPAQUE_TORCH):
                    counter._opaque(f"aten.{name}")
                # Composite ops (matmul, linear) reaching the mode run with the mode popped, so the
                # mm they decompose into is not counted twice.
                return func(*args, **kwargs)
            # A torch.library custom op: the dispatcher would run its body with this mode popped, hiding
            # the GEMMs inside (a chunked path's cuBLAS calls); run the body here, with the mode pushed.
            opdef = OPDEFS.get(func._schema.name)
            if opdef is not None:
                dev = next((a.device.type for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)), None)
                fns = getattr(opdef, "_backend_fns", {})
                body = fns.get(dev) or fns.get(None)
                if body is not None:
                    with self:
                        return body(*args, **kwargs)
            if ns not in ("prims", "prim"):
                counter._opaque(f"{ns}.{name} (body not traced)")
            return func(*args, **kwargs)

    return _GemmMode()


class count_gemm_flops:
    """Count the GEMM FLOPs executed inside the block: ``with count_gemm_flops() as c: ...`` then
    ``c.triton``, ``c.torch``, ``c.total``, ``c.units(2 * N * M * C)`` (see :class:`GemmFlops`).

    Triton products are counted only under ``TRITON_INTERPRET=1`` (on a GPU the kernels are compiled
    and nothing is counted: ``triton`` stays 0); torch GEMMs on any device. Counters nest (each sees
    everything inside it). The interpreter runs programs one at a time, so the count is exact and
    deterministic; it says nothing about races (scripts/race_check.py checks those on the GPU)."""

    def __init__(self) -> None:
        self.result = GemmFlops()
        self._mode = None

    def __enter__(self) -> GemmFlops:
        if _triton.interpret_mode() and _triton.available() and not _DOT_PATCH:
            _install_dot_patch()
        _ACTIVE_COUNTERS.append(self.result)
        self._mode = _gemm_mode(self.result)
        self._mode.__enter__()
        return self.result

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        _ACTIVE_COUNTERS.remove(self.result)
        if not _ACTIVE_COUNTERS and _DOT_PATCH:
            _remove_dot_patch()

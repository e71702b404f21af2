"""The house the kernels live in: extension build, op registration, dispatch, harness, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fastdistill
from fastdistill import _alloc, _extension, _triton, dispatch
from fastdistill.testing import assert_close, check_against_reference, randn


@pytest.fixture
def toy_ops():
    """Register throw-away ops and remove them afterwards (keeps `fastdistill info` clean)."""
    names = []

    def make(name, backends):
        names.append(name)
        return dispatch.register_op(name, backends)

    yield make
    for n in names:
        dispatch._REGISTRY.pop(n, None)


def test_import_exposes_version_and_ops_namespace():
    assert fastdistill.__version__ == "0.1.0"
    assert isinstance(torch.ops.fastdistill, torch._ops._OpNamespace)


def test_extension_loaded_and_reports_cuda_truthfully():
    assert _extension.is_loaded(), _extension.load_error()
    info = _extension.build_info()
    assert set(info) >= {"with_cuda", "torch_version"}
    # The extension must be built against the torch it runs with.
    assert torch.__version__.startswith(info["torch_version"])
    expect_cuda = torch.version.cuda is not None and os.environ.get("FASTDISTILL_BUILD_CUDA", "auto") not in ("0", "false")
    assert info["with_cuda"] is expect_cuda


def test_every_cpp_op_has_cpu_and_meta_kernels():
    """Each op in the extension runs on CPU tensors and under torch.compile (fake/meta kernel)."""
    from fastdistill import ops  # noqa: F401  (registers the Python fake kernels)
    import fastdistill.nn  # noqa: F401

    for op in _extension.registered_ops():
        assert _extension.has_kernel(op, "CPU"), f"fastdistill::{op} has no CPU kernel"
        if _extension.compiled_with_cuda():
            assert _extension.has_kernel(op, "CUDA"), f"fastdistill::{op} has no CUDA kernel"
        packet = getattr(torch.ops.fastdistill, op)
        assert _extension.has_kernel(op, "Meta") or torch._library.simple_registry.singleton.find(
            packet.default._name).fake_impl.kernel is not None, f"fastdistill::{op} has no fake kernel"


def test_forcing_cuda_on_cpu_tensor_is_a_clear_error(toy_ops, monkeypatch):
    toy_ops("_toy_cuda", ["cuda", "cpp"])
    x = torch.ones(3)
    monkeypatch.setenv("FASTDISTILL_BACKEND", "cuda")
    with pytest.raises(fastdistill.BackendUnavailableError, match="runs CUDA tensors only"):
        dispatch.select_backend("_toy_cuda", x)
    monkeypatch.delenv("FASTDISTILL_BACKEND")
    with fastdistill.use_backend("cuda"), pytest.raises(fastdistill.BackendUnavailableError, match="cpu tensors"):
        dispatch.select_backend("_toy_cuda", x)


def test_forcing_a_backend_the_op_lacks_names_what_it_has(toy_ops):
    toy_ops("_toy_triton_only", ["triton"])
    with fastdistill.use_backend("cpp"), pytest.raises(fastdistill.BackendUnavailableError,
                                                       match="no cpp implementation.*triton, reference"):
        dispatch.select_backend("_toy_triton_only", torch.ones(2))


def test_forcing_triton_on_cpu_without_interpreter_says_why(toy_ops, monkeypatch):
    toy_ops("_toy_t", ["triton"])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fastdistill.use_backend("triton"), pytest.raises(fastdistill.BackendUnavailableError,
                                                          match="TRITON_INTERPRET=1"):
        dispatch.select_backend("_toy_t", torch.ones(2))


def test_auto_selection_on_cpu(toy_ops):
    toy_ops("_toy_cpp", ["cuda", "cpp"])
    toy_ops("_toy_tri", ["triton"])
    x = torch.ones(2)
    assert dispatch.select_backend("_toy_cpp", x) == "cpp"
    # Auto never picks the interpreter: on CPU, an op without C++ kernels runs its reference.
    assert dispatch.select_backend("_toy_tri", x) == "reference"


def test_auto_on_gpu_without_fast_backend_warns_once(toy_ops, monkeypatch):
    toy_ops("_toy_fallback", ["triton", "cuda"])
    monkeypatch.setattr(_triton, "cannot_run_on", lambda dev: "triton is not importable (test)")
    monkeypatch.setattr(_extension, "compiled_with_cuda", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert dispatch.select_backend("_toy_fallback", device="cuda") == "reference"
    fallbacks = [w for w in caught if issubclass(w.category, fastdistill.FallbackWarning)]
    assert len(fallbacks) == 1
    assert "triton is not importable" in str(fallbacks[0].message)
    assert "built without CUDA" in str(fallbacks[0].message)


def test_use_backend_nests_and_scopes_to_ops(toy_ops, monkeypatch):
    toy_ops("_toy_a", ["cpp"])
    toy_ops("_toy_b", ["cpp"])
    x = torch.ones(1)
    monkeypatch.setenv("FASTDISTILL_BACKEND", "_toy_a=reference")
    assert dispatch.select_backend("_toy_a", x) == "reference"
    assert dispatch.select_backend("_toy_b", x) == "cpp"
    with fastdistill.use_backend("cpp"):
        assert dispatch.select_backend("_toy_a", x) == "cpp"
        with fastdistill.use_backend("reference", ops=["_toy_b"]):
            assert dispatch.select_backend("_toy_a", x) == "cpp"
            assert dispatch.select_backend("_toy_b", x) == "reference"
    assert dispatch.select_backend("_toy_a", x) == "reference"


def test_bad_backend_names_and_unregistered_ops():
    with pytest.raises(ValueError, match="unknown fastdistill backend"):
        with fastdistill.use_backend("cudnn"):
            pass
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.register_op("_toy_bad", ["metal"])
    with pytest.raises(KeyError, match="never registered"):
        dispatch.select_backend("_no_such_op", torch.ones(1))


def test_mixed_devices_rejected(toy_ops):
    toy_ops("_toy_dev", ["cpp"])
    with pytest.raises(ValueError, match="one device"):
        dispatch.select_backend("_toy_dev", torch.ones(1), torch.ones(1, device="meta"))


def test_dispatch_traces_under_torch_compile_fullgraph(toy_ops, monkeypatch):
    toy_ops("_toy_compile", ["cpp"])
    monkeypatch.setenv("FASTDISTILL_BACKEND", "_toy_compile=reference")

    def f(x):
        if dispatch.select_backend("_toy_compile", x) == "reference":
            return x * 2
        return x * 3

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(torch.ones(4))
    assert torch.equal(got, torch.full((4,), 2.0))


def test_poisoned_outputs_are_nan_and_int_min():
    with _alloc.poison_outputs():
        f = _alloc.empty((3,), dtype=torch.bfloat16, device="cpu")
        i = _alloc.empty((2,), dtype=torch.int32, device="cpu")
    assert torch.isnan(f).all()
    assert (i == torch.iinfo(torch.int32).min).all()


def test_harness_catches_unwritten_element_wrong_grad_and_passes_correct_op():
    x = randn(5, 7, requires_grad=True)

    def correct(t):
        return (t * t).sum(-1)

    check_against_reference(correct, correct, [x], dtype=torch.float32)

    def unwritten(t):
        out = _alloc.empty((t.shape[0],), dtype=t.dtype, device=t.device)
        out[:-1] = (t[:-1] * t[:-1]).sum(-1)  # forgets the last row
        return out

    with pytest.raises(AssertionError, match="NaN/Inf"):
        check_against_reference(unwritten, correct, [x.detach()], dtype=torch.float32)

    class IgnoresUpstream(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            ctx.save_for_backward(t)
            return (t * t).sum(-1)

        @staticmethod
        def backward(ctx, g):
            (t,) = ctx.saved_tensors
            return 2 * t  # wrong: drops g

    with pytest.raises(AssertionError, match="grad"):
        check_against_reference(IgnoresUpstream.apply, correct, [x], dtype=torch.float32)


def test_assert_close_tolerance_by_dtype():
    e = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    assert_close(e + 1e-6, e, rtol=1e-5)
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close(e + 1e-3, e, rtol=1e-5)


def test_cli_info_runs_and_reports_extension():
    out = subprocess.run([sys.executable, "-m", "fastdistill", "info", "--json"], capture_output=True,
                         text=True, check=True)
    info = json.loads(out.stdout)
    assert info["fastdistill"] == fastdistill.__version__
    assert info["extension"]["loaded"] is True
    assert info["extension"]["build"]["with_cuda"] is _extension.compiled_with_cuda()
    assert info["backends"]["cpu"]["reference"] == "ok"
    text = subprocess.run([sys.executable, "-m", "fastdistill", "info"], capture_output=True, text=True,
                          check=True).stdout
    assert "CUDA kernels compiled" in text


def test_record_backends_collects_selections(toy_ops):
    toy_ops("_toy_rec", ["cpp"])
    with dispatch.record_backends() as seen:
        dispatch.select_backend("_toy_rec", torch.ones(1))
        with fastdistill.use_backend("reference"):
            dispatch.select_backend("_toy_rec", torch.ones(1))
    assert seen == {("_toy_rec", "cpp"), ("_toy_rec", "reference")}
    dispatch.select_backend("_toy_rec", torch.ones(1))  # outside: not recorded
    assert len(seen) == 2


def test_pinned_test_seed_replays_every_draw_of_a_test(monkeypatch):
    from fastdistill import testing

    def draws():
        testing.start_test_seed()
        return [torch.randn(3, generator=testing.generator()) for _ in range(3)]

    monkeypatch.setenv("FASTDISTILL_TEST_SEED", "12345")
    first, again = draws(), draws()
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], first[1])  # successive draws in a test differ
    assert testing.last_seed() == 12345
    monkeypatch.delenv("FASTDISTILL_TEST_SEED")
    fresh = {testing.start_test_seed() for _ in range(4)}  # unpinned: a fresh base seed per test
    assert len(fresh) > 1

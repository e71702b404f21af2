"""fastdistill.testing.backend_device_params: the (backend, device) parametrisation of the op tests.

The GPU branch cannot run on a CPU machine, so availability is faked here (a visible GPU, the
interpreter on or off, why_unavailable answers) and the cases the op tests would get are checked,
including that a declared backend that cannot run where it must becomes a failing test.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from fastdistill import _triton, dispatch, testing

pytest_plugins = ["pytester"]

ALL = ("triton", "cuda", "cpp")


@pytest.fixture
def toy_op():
    names = []

    def make(name, backends):
        names.append(name)
        dispatch.register_op(name, backends)
        return name

    yield make
    for n in names:
        dispatch._REGISTRY.pop(n, None)


def _host(monkeypatch, *, cuda: bool, interpret: bool, broken: dict[tuple[str, str], str] | None = None):
    """Fake the host: a visible GPU or not, the interpreter on or off, and backends that cannot run."""
    broken = broken or {}

    def why(backend, device):
        dev = torch.device(device).type
        if (backend, dev) in broken:
            return broken[(backend, dev)]
        if backend == "triton":
            if interpret:
                return None if dev == "cpu" else "TRITON_INTERPRET=1 runs Triton kernels on CPU tensors only"
            return None if dev == "cuda" else "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if backend == "cuda":
            return None if dev == "cuda" else "cpu tensors"
        if backend == "cpp":
            return None if dev == "cpu" else "cuda tensors"
        return None

    monkeypatch.setattr(testing, "_cuda_visible", lambda: cuda)
    monkeypatch.setattr(_triton, "interpret_mode", lambda: interpret)
    monkeypatch.setattr(dispatch, "why_unavailable", why)


def _summary(op, include=None):
    return [(c.id, c.status) for c in testing.backend_device_cases(op, include)]


def test_cpu_host_with_interpreter_keeps_the_cpu_ids_and_skips_cuda_cases(toy_op, monkeypatch):
    op = toy_op("_h_all", ALL)
    _host(monkeypatch, cuda=False, interpret=True)
    assert _summary(op) == [("triton", "run"), ("cpp", "run"), ("reference", "run"),
                            ("triton-cuda", "skip"), ("cuda-cuda", "skip"), ("reference-cuda", "skip")]
    reasons = {c.reason for c in testing.backend_device_cases(op) if c.status == "skip"}
    assert reasons == {testing.NO_GPU_REASON}


def test_gpu_host_moves_triton_to_cuda_and_runs_every_cuda_backend(toy_op, monkeypatch):
    op = toy_op("_h_all_gpu", ALL)
    _host(monkeypatch, cuda=True, interpret=False)
    assert _summary(op) == [("cpp", "run"), ("reference", "run"),
                            ("triton-cuda", "run"), ("cuda-cuda", "run"), ("reference-cuda", "run")]


def test_gpu_host_with_interpreter_forced_runs_triton_on_cpu_and_skips_triton_cuda(toy_op, monkeypatch):
    op = toy_op("_h_interp_gpu", ["triton"])
    _host(monkeypatch, cuda=True, interpret=True)
    assert _summary(op) == [("triton", "run"), ("reference", "run"), ("triton-cuda", "skip"),
                            ("reference-cuda", "run")]


@pytest.mark.parametrize("broken, case", [
    ({("triton", "cuda"): "triton is not importable (ImportError: no triton)"}, "triton-cuda"),
    ({("cuda", "cuda"): "fastdistill._C was built without CUDA kernels"}, "cuda-cuda"),
])
def test_gpu_host_backend_that_cannot_run_is_a_failing_case_not_a_missing_one(toy_op, monkeypatch, broken, case):
    op = toy_op("_h_broken_gpu", ALL)
    _host(monkeypatch, cuda=True, interpret=False, broken=broken)
    cases = {c.id: c for c in testing.backend_device_cases(op)}
    assert set(cases) == {"cpp", "reference", "triton-cuda", "cuda-cuda", "reference-cuda"}
    assert cases[case].status == "fail" and cases[case].reason == next(iter(broken.values()))
    assert all(c.status == "run" for i, c in cases.items() if i != case)


def test_extension_not_loaded_fails_the_cpp_case(toy_op, monkeypatch):
    op = toy_op("_h_noext", ["cuda", "cpp"])
    _host(monkeypatch, cuda=False, interpret=True, broken={("cpp", "cpu"): "fastdistill._C is not loaded"})
    assert _summary(op) == [("cpp", "fail"), ("reference", "run"), ("cuda-cuda", "skip"),
                            ("reference-cuda", "skip")]


def test_triton_tested_nowhere_fails(toy_op, monkeypatch):
    """No interpreter and no GPU: the Triton case fails instead of vanishing."""
    op = toy_op("_h_nowhere", ["triton"])
    _host(monkeypatch, cuda=False, interpret=False)
    cases = testing.backend_device_cases(op)
    assert [(c.id, c.status) for c in cases] == [("triton", "fail"), ("reference", "run"),
                                                 ("triton-cuda", "skip"), ("reference-cuda", "skip")]
    assert "tested nowhere" in cases[0].reason


def test_reference_only_op_and_include(toy_op, monkeypatch):
    op = toy_op("_h_ref", [])
    _host(monkeypatch, cuda=True, interpret=False)
    assert _summary(op) == [("reference", "run"), ("reference-cuda", "run")]
    op2 = toy_op("_h_inc", ALL)
    assert _summary(op2, include=["cpp", "cuda"]) == [("cpp", "run"), ("cuda-cuda", "run")]
    with pytest.raises(ValueError, match="unknown backend"):
        testing.backend_device_cases(op2, include=["tpu"])
    with pytest.raises(KeyError, match="not registered"):
        testing.backend_device_cases("_h_never_registered")


def test_params_carry_ids_values_and_marks(toy_op, monkeypatch):
    op = toy_op("_h_marks", ALL)
    _host(monkeypatch, cuda=True, interpret=False, broken={("cuda", "cuda"): "built without CUDA"})
    params = {p.id: p for p in testing.backend_device_params(op)}
    assert params["triton-cuda"].values == ("triton", "cuda")
    assert params["cpp"].values == ("cpp", "cpu") and not params["cpp"].marks
    names = {i: [m.name for m in p.marks] for i, p in params.items()}
    assert names["triton-cuda"] == ["gpu"] and names["reference-cuda"] == ["gpu"]
    assert names["cuda-cuda"] == ["gpu", testing.UNAVAILABLE_MARKER]
    extra = testing.backend_device_cases(op)[0].param(torch.float16, id="fp16")
    assert extra.id == "cpp-fp16" and extra.values == ("cpp", "cpu", torch.float16)


def test_this_host_ops_all_have_cases():
    """Every registered op of fastdistill gets a reference case on each device, and (here) a CPU case
    for each fast backend it declares for CPU tensors under the interpreter."""
    import fastdistill  # noqa: F401  (registers the ops)

    for name, spec in dispatch.registered_ops().items():
        if name.startswith("_"):
            continue
        ids = [c.id for c in testing.backend_device_cases(name)]
        assert "reference" in ids and "reference-cuda" in ids, name
        for b in spec.backends:
            assert any(c.backend == b for c in testing.backend_device_cases(name)), (name, b)


def test_to_device_keeps_leaves_and_requires_grad():
    x = torch.randn(3, requires_grad=True)
    tree = testing.to_device({"a": [x, 2], "b": (torch.ones(1),)}, "cpu")
    assert tree["a"][0] is x and tree["a"][1] == 2 and isinstance(tree["b"], tuple)
    y = testing.to_device(x, "meta")
    assert y.device.type == "meta" and y.is_leaf and y.requires_grad


def test_failing_case_is_a_failed_test_and_skips_are_skips(pytester, toy_op, monkeypatch):
    """End to end through pytest: with a fake GPU host whose extension lacks CUDA, the cuda-cuda case is
    FAILED (with the reason), the others pass; with no GPU the CUDA cases are skipped, not passed."""
    op = toy_op("_h_e2e", ["triton", "cuda", "cpp"])
    pytester.makeconftest(textwrap.dedent("""
        import pytest
        from fastdistill.testing import fail_if_unavailable

        @pytest.hookimpl(tryfirst=True)
        def pytest_runtest_call(item):
            fail_if_unavailable(item)
    """))
    pytester.makepyfile(test_case=textwrap.dedent(f"""
        import pytest
        from fastdistill import testing

        @pytest.mark.parametrize("backend,device", testing.backend_device_params({op!r}))
        def test_op(backend, device):
            assert backend in ("triton", "cuda", "cpp", "reference")
    """))
    pytester.makeini("[pytest]\nmarkers =\n    gpu: gpu\n    backend_unavailable: x\n")
    _host(monkeypatch, cuda=True, interpret=False, broken={("cuda", "cuda"): "built without CUDA kernels"})
    res = pytester.runpytest("-q", "-p", "no:cacheprovider")
    res.assert_outcomes(passed=4, failed=1)
    res.stdout.fnmatch_lines(["*test_op?cuda-cuda?*", "*cuda backend must run cuda tensors here but cannot: "
                                                      "built without CUDA kernels*"])
    _host(monkeypatch, cuda=False, interpret=True)
    res = pytester.runpytest("-q", "-p", "no:cacheprovider", "-rs")
    res.assert_outcomes(passed=3, skipped=3)
    res = pytester.runpytest("-q", "-p", "no:cacheprovider", "-m", "gpu")
    res.assert_outcomes(skipped=3, deselected=3)


def test_deterministic_algorithms_switch_restores_state():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    with testing.deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        with testing.deterministic_algorithms(False):
            assert not torch.are_deterministic_algorithms_enabled()
        assert torch.are_deterministic_algorithms_enabled()
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == before
    with pytest.raises(RuntimeError):
        with testing.deterministic_algorithms(True):
            raise RuntimeError("restored even on error")
    assert torch.are_deterministic_algorithms_enabled() == before[0]
    with pytest.raises(TypeError, match="bool"):
        with testing.deterministic_algorithms(1):
            pass

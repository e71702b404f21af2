"""One float64 rule for every op (fastdistill.dispatch): float64 inputs run on a backend that computes
in float64 (the reference, or a fast backend the op declares fp64-native), on every device, and
match the float64 reference to 1e-10; forcing a backend that accumulates in fp32 on float64 inputs is
a clear DtypeNotSupportedError (a TypeError), never a silent fp32 computation.

The inputs come from the selftest's per-op cases (fastdistill.selftest.CASES), so every registered op
is covered, and a new op without a case fails tests/test_selftest.py.
"""

from __future__ import annotations

import pytest
import torch

from fastdistill import dispatch, selftest, testing

_FLOAT_OPS = sorted(n for n, spec in selftest.CASES.items() if "float32" in spec.dtypes)


def test_every_op_is_covered():
    assert selftest.missing_cases() == []
    assert set(_FLOAT_OPS) == {n for n in dispatch.registered_ops() if "float32" in selftest.CASES[n].dtypes}


# The reference's (backend, device) params: every device present (CUDA cases are gpu-marked).
@pytest.mark.parametrize("backend,dev", testing.backend_device_params("relational_kl", include=["reference"]))
@pytest.mark.parametrize("op", _FLOAT_OPS)
def test_float64_runs_in_float64_by_automatic_dispatch(op, backend, dev):
    spec = selftest.CASES[op]
    case = selftest.Case(op, None, torch.float64, torch.device(dev), quick=True)
    with dispatch.record_backends() as seen:
        spec.build(case)
    assert case.errors, f"{op}: the case compared nothing"
    worst = max(err for err, _ in case.errors)
    assert worst <= 1e-10, f"{op}: float64 error {worst:.2e} (computed in fp32?)"
    chosen = {b for name, b in seen if name == op}
    assert chosen, f"{op}: dispatch was not asked"
    assert chosen <= set(dispatch.registered_ops()[op].fp64_backends), (op, chosen)


def _forcible_non_fp64(op: str) -> list[str]:
    spec = dispatch.registered_ops()[op]
    return [b for b in spec.backends if b not in spec.fp64_backends]


@pytest.mark.parametrize("op", [op for op in _FLOAT_OPS if _forcible_non_fp64(op)])
def test_forcing_an_fp32_backend_on_float64_is_a_clear_error(op):
    for backend in _forcible_non_fp64(op):
        case = selftest.Case(op, backend, torch.float64, torch.device("cpu"), quick=True)
        # Dispatch refuses before any availability check, so this holds on a CPU without the interpreter too.
        with pytest.raises(dispatch.DtypeNotSupportedError, match="float64"):
            selftest.CASES[op].build(case)
        assert issubclass(dispatch.DtypeNotSupportedError, TypeError)


def test_fp64_declaration_is_validated():
    with pytest.raises(ValueError, match="fp64 backend"):
        dispatch.register_op("fp64_declaration_probe", ["triton"], fp64=["cpp"])

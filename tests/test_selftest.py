"""fastdistill selftest: every registered op has a case, errors are measured and reported, failures
and crashes fail the run (exit status 1), and the command runs the Triton kernels on CPU through the
interpreter when asked for --device cpu."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fastdistill
from fastdistill import cli, dispatch, selftest


def test_every_registered_op_has_a_selftest_case():
    # A new op registered with dispatch.register_op must get a case in fastdistill.selftest.CASES.
    assert selftest.missing_cases() == []
    assert set(selftest.CASES) == set(dispatch.registered_ops()), "CASES names an op that is not registered"


def test_an_op_without_a_case_is_a_failed_row(monkeypatch):
    monkeypatch.setitem(dispatch._REGISTRY, "selftest_probe_op", dispatch.OpSpec("selftest_probe_op", ("reference",)))
    assert selftest.missing_cases() == ["selftest_probe_op"]
    rows = selftest.run("cpu", quick=True, ops=["selftest_probe_op"])
    assert len(rows) == 1 and not rows[0].passed and "no selftest case" in rows[0].error


def test_rows_cover_every_backend_and_dtype_and_report_real_errors():
    rows = selftest.run("cpu", quick=True, ops=["adversarial_losses", "segment_route"])
    want = {("adversarial_losses", b, d) for b in dispatch.available_backends("adversarial_losses", "cpu")
            for d in ("float32", "bfloat16", "float16")}
    want |= {("segment_route", b, "int64") for b in dispatch.available_backends("segment_route", "cpu")}
    assert {(r.op, r.backend, r.dtype) for r in rows} == want
    assert all(r.passed and r.checks > 0 and r.seconds >= 0 for r in rows), [r.error for r in rows]
    bf16 = [r for r in rows if r.dtype == "bfloat16"]
    # bf16 rounding is visible and inside its bound: the error is measured, not assumed
    assert all(0 < r.max_rel_error <= r.tolerance for r in bf16)
    assert all(r.max_rel_error == 0 for r in rows if r.op == "segment_route")


def _wrong_by(factor: float):
    def build(c: selftest.Case) -> None:
        real = c.randn(7, 1, grad=True)
        c.check(lambda x: fastdistill.adversarial_losses(None, x)[1] * factor, [real],
                reference=lambda x: fastdistill.adversarial_losses(None, x)[1])
    return build


def test_a_wrong_op_fails_with_its_measured_error(monkeypatch):
    monkeypatch.setitem(selftest.CASES, "adversarial_losses", selftest.Spec(_wrong_by(1.001), dtypes=("float32",)))
    rows = selftest.run("cpu", quick=True, ops=["adversarial_losses"])
    assert rows and all(not r.passed for r in rows)
    for r in rows:
        assert r.max_rel_error == pytest.approx(1e-3, rel=1e-2) and r.tolerance == 1e-5
        assert "output[0]" in r.error


def test_a_crash_fails_its_row_and_the_command_exits_1(monkeypatch, capsys):
    def crash(c: selftest.Case) -> None:
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(selftest.CASES, "adversarial_losses", selftest.Spec(crash, dtypes=("float32",)))
    assert cli.main(["selftest", "--device", "cpu", "--quick", "--ops", "adversarial_losses"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "RuntimeError: kernel exploded" in out and "0 passed" in out


def test_unknown_op_is_a_usage_error(capsys):
    assert cli.main(["selftest", "--device", "cpu", "--ops", "no_such_op"]) == 2
    assert "unknown op(s) no_such_op" in capsys.readouterr().err


def test_command_line_on_cpu_sets_the_interpreter_and_writes_json(tmp_path):
    """`python -m fastdistill selftest --device cpu` with TRITON_INTERPRET unset: the Triton rows run
    (through the interpreter switched on before triton's import), the table and the JSON agree."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDISTILL_TEST_INTERPRET")}
    path = tmp_path / "st.json"
    p = subprocess.run([sys.executable, "-m", "fastdistill", "selftest", "--device", "cpu", "--quick",
                        "--ops", "pd_loss", "--seed", "123", "--json", str(path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "through the interpreter" in p.stdout and "seed 123" in p.stdout
    data = json.loads(path.read_text())
    assert data["seed"] == 123 and data["failed"] == 0 and data["environment"]["triton_interpret"] is True
    backends = {r["backend"] for r in data["rows"]}
    assert "triton" in backends and "reference" in backends
    for r in data["rows"]:
        assert r["passed"] and r["max_rel_error"] <= r["tolerance"]
        assert f"pd_loss                          {r['backend']:<10} {r['dtype']:<9}" in p.stdout


def test_json_without_path_goes_to_stdout(capsys):
    assert cli.main(["selftest", "--device", "cpu", "--quick", "--ops", "segment_route", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["passed"] == len(data["rows"]) > 0 and "segment_route" in captured.err


def test_prepare_device_rejects_unknown_devices():
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        selftest.prepare_device("mps")
    if not torch.cuda.is_available():
        assert selftest.prepare_device(None) == "cpu"
        with pytest.raises(ValueError, match="no CUDA GPU"):
            selftest.run("cuda", ops=["segment_route"])


@pytest.mark.gpu
def test_quick_selftest_on_cuda_passes():
    rows = selftest.run("cuda", quick=True, ops=["relational_kl", "fused_attention", "segment_mse", "moment_dot"])
    assert {r.backend for r in rows} >= {"triton", "cuda", "reference"}
    assert all(r.passed for r in rows), [(r.op, r.backend, r.dtype, r.error) for r in rows if not r.passed]

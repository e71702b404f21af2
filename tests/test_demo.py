"""`fastdistill demo`: runs end to end on CPU, writes every output, and fails clearly on bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from fastdistill.cli import main
from fastdistill.demo import methods


def _finite_numbers(obj, path="report"):
    """Yield (path, value) for every number in the report, so a NaN anywhere names itself."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _finite_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # A short teacher keeps CI fast; the default trains longer.
    rc = main(["demo", "--method", "all", "--steps", "5", "--teacher-steps", "10", "--num-samples", "4",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


def test_demo_writes_every_file_with_finite_numbers(demo_run):
    for name in ("report.md", "report.json", "samples.png", "losses.png", "teacher.pt"):
        path = demo_run / name
        assert path.is_file() and path.stat().st_size > 0, name
    report = json.loads((demo_run / "report.json").read_text())
    assert set(report["methods"]) == set(methods.METHODS)
    for name, m in report["methods"].items():
        assert m["steps_done"] == 5, name
        c = m["fused_vs_reference"]
        assert c["step_ms_fused"] > 0 and c["step_ms_reference"] > 0
        # Same state, same batch: fused and reference losses agree to kernel tolerance.
        assert c["loss_relative_difference"] < 1e-3, (name, c)
    bad = [(p, v) for p, v in _finite_numbers(report) if not math.isfinite(v)]
    assert not bad, bad
    md = (demo_run / "report.md").read_text()
    for name in methods.METHODS:
        assert f"| {name} |" in md


def test_second_run_reuses_cached_teacher(demo_run):
    rc = main(["demo", "--method", "rdd", "--steps", "1", "--teacher-steps", "10", "--num-samples", "2",
               "--out", str(demo_run), "--no-progress"])
    assert rc == 0
    report = json.loads((demo_run / "report.json").read_text())
    assert report["teacher"]["source"].startswith("loaded from cache")


def test_corrupt_cache_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "teacher.pt").write_bytes(b"not a checkpoint")
    rc = main(["demo", "--steps", "1", "--teacher-steps", "2", "--out", str(tmp_path), "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "teacher.pt" in err and "--retrain-teacher" in err


def test_cache_from_another_config_is_a_clear_error(demo_run, capsys):
    rc = main(["demo", "--steps", "1", "--teacher-steps", "11", "--out", str(demo_run), "--no-progress"])
    assert rc == 1
    assert "another config" in capsys.readouterr().err


def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("x")
    rc = main(["demo", "--steps", "1", "--out", str(f), "--no-progress"])
    assert rc == 1
    assert "cannot write to --out" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "fastdistill", "demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "--method" in out.stdout and "--steps" in out.stdout


def test_missing_demo_dependencies_name_the_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    rc = main(["demo", "--steps", "1", "--out", str(tmp_path), "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "sklearn" in err and "fastdistill[demo]" in err

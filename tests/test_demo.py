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
    # A speed-up only where the two paths ran different backends (on CPU e.g. o2mkd's C++ kernels).
    for name, m in report["methods"].items():
        c = m["fused_vs_reference"]
        assert all(b.endswith("=reference") for b in c["reference_backends"]), c
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        assert c["same_backends"] == (c["fused_backends"] == c["reference_backends"])
        if c["same_backends"]:
            assert c["speedup"] is None and "none: both ran the reference" in row, (name, c)
        else:
            assert c["speedup"] > 0 and f"| {c['speedup']:.4g}x |" in row, (name, c)


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


def _fake_method(fused_backends, speedup):
    return {"steps_done": 3, "interrupted": False, "student_sampling_steps": 8, "final_loss": 0.1,
            "fused_vs_reference": {"fused_backends": fused_backends,
                                   "reference_backends": [b.split("=")[0] + "=reference" for b in fused_backends],
                                   "same_backends": all(b.endswith("=reference") for b in fused_backends),
                                   "step_ms_fused": 10.0, "step_ms_reference": 15.0, "speedup": speedup,
                                   "peak_mib_fused": None, "peak_mib_reference": None,
                                   "loss_relative_difference": 0.0},
            "quality": {"sample_mse_vs_teacher": 0.1, "feature_distance_student_vs_teacher": 1.0,
                        "feature_distance_student_vs_data": 2.0, "feature_distance_teacher_vs_data": 3.0}}


def test_report_gives_a_speedup_only_for_different_backends(tmp_path):
    from fastdistill.demo.report import write_reports

    report = {"environment": {"device_name": "cpu", "torch": "x", "triton": "y", "fastdistill": "z"},
              "data": "digits", "teacher": {"description": "unet", "source": "shipped", "sampling_steps": 16},
              "peak_memory_kind": "n/a",
              "methods": {"same": _fake_method(["pd_loss=reference", "ddim_step=reference"], None),
                          "cpp": _fake_method(["segment_mse=cpp", "pd_loss=reference"], 1.5)}}
    write_reports(str(tmp_path / "r.md"), str(tmp_path / "r.json"), report)
    rows = {line.split("|")[1].strip(): line for line in (tmp_path / "r.md").read_text().splitlines()
            if line.startswith("| same |") or line.startswith("| cpp |")}
    assert "none: both ran the reference" in rows["same"] and "x |" not in rows["same"]
    assert "| 1.5x |" in rows["cpp"]


def test_loss_plot_has_one_linear_panel_per_term(tmp_path):
    from fastdistill.demo.report import save_loss_curves

    curves = {"rdd": [{"loss": 0.01 - 1e-4 * i, "pd": 0.01 - 1e-4 * i, "relational": 1e-4} for i in range(12)],
              "adv-kd": [{"loss": 2.0, "discriminator": 10.0, "l2": 0.1 / (i + 1)} for i in range(12)],
              "empty": []}
    panels = save_loss_curves(str(tmp_path / "l.png"), curves)
    # The total first, then every term in its own panel: none hides under another or shares a scale.
    assert panels == [("rdd", "loss"), ("rdd", "pd"), ("rdd", "relational"),
                      ("adv-kd", "loss"), ("adv-kd", "discriminator"), ("adv-kd", "l2")]
    assert (tmp_path / "l.png").stat().st_size > 0

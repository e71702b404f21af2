"""scripts/gpu_check.sh --dry-run: every stage's plumbing on a CPU (install command printed and its
tools checked, info, selftest of one op, a tiny test selection, the race check through the Triton
interpreter, the benchmark report of the ceilings case, the compile audit's command line), one log per
stage, the summary table last, and a stage whose budget runs out reported as TIMED OUT while the next
stages still run. Also the --quick selection of bench/report.py and scripts/race_check.py's verdicts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STAGES = ["install", "info", "selftest", "tests", "race", "bench", "audit"]


def test_dry_run_writes_every_stage_and_reports_a_timeout(tmp_path):
    assert shutil.which("bash") and shutil.which("timeout"), "gpu_check.sh needs bash and coreutils' timeout"
    out = tmp_path / "gpu-check"
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_BUDGET_INFO="1")  # info is forced to time out
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=900)
    log = p.stdout + p.stderr
    assert p.returncode == 1, log  # a stage timed out: the run is not a pass
    assert "would run: " in log and "TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16" in log
    assert "setuptools " in log  # the version the install needs (>= 77) is checked and printed

    summary = (out / "summary.txt").read_text()
    assert p.stdout.rstrip().endswith(summary.rstrip()), "the summary table must be printed last"
    status = {}
    for line in summary.splitlines():
        m = re.match(r"^(\w+) +(ok|FAILED|TIMED OUT|skipped) +(\d+)s", line)
        if m:
            status[m.group(1)] = m.group(2)
    assert list(status) == STAGES, summary
    assert status["info"] == "TIMED OUT", summary
    for stage in ("install", "selftest", "tests", "race", "bench", "audit"):
        assert status[stage] == "ok", f"{stage}: {status[stage]}\n{log}"

    logs = sorted(x.name for x in out.glob("*.log"))
    assert logs == [f"{i + 1:02d}-{s}.log" for i, s in enumerate(STAGES)]
    assert "TIMED OUT after 1s" in (out / "02-info.log").read_text()
    st = json.loads((out / "selftest.json").read_text())
    assert st["failed"] == 0 and st["passed"] > 0 and {r["op"] for r in st["rows"]} == {"adversarial_losses"}
    assert re.search(r"selftest +ok .* \d+ passed, 0 failed \(cpu\)", summary)
    assert re.search(r"tests +ok .* 2 passed, 0 failed", summary)
    race = json.loads((out / "race.json").read_text())
    assert race["device"] == "cpu" and {(r["case"], r["mode"]) for r in race["rows"]} == {
        (c, m) for c in ("fused_rdd_loss", "attention_kl", "fused_attention") for m in ("fast", "deterministic")}
    assert all(r["ok"] and r["bit_identical"] and r["ref_rel_err"] < 1e-4 for r in race["rows"]), race
    assert re.search(r"race +ok .* 6 ok, 0 failed; fast max \|run1-run2\| \S+; deterministic bit-identical: yes",
                     summary), summary
    assert "atomics cannot race here" in (out / "05-race.log").read_text()
    bench = list((out / "bench").glob("*.json"))
    assert len(bench) == 1 and list((out / "bench").glob("*.md"))
    payload = json.loads(bench[0].read_text())
    assert payload["selection"]["quick"] is True and payload["ceilings"]["copy_bytes_per_s"] > 0
    assert payload["ceilings"]["exp_per_s"] > 0  # the exp floor's rate, measured in the same run
    assert {r["floor_term"] for r in payload["results"]} <= {"gemm", "bytes", "exp"}


def _race_check():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import race_check
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return race_check


def test_race_check_verdicts():
    """Deterministic runs must be bit-identical; fast runs may differ a little; both must match float64."""
    import torch

    rc = _race_check()
    ref = [torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(8, 8)]
    a = [ref[0].float()]
    b = [a[0].clone()]
    b[0][3, 4] = torch.nextafter(b[0][3, 4], torch.tensor(2.0))  # one ulp: an atomic add's reordering
    same = rc.compare([a, [a[0].clone()]], ref, deterministic=True)
    assert same["ok"] and same["bit_identical"] and same["max_abs_diff"] == 0.0
    fast = rc.compare([a, b], ref, deterministic=False)
    assert fast["ok"] and not fast["bit_identical"] and 0 < fast["max_abs_diff"] < 1e-6
    det = rc.compare([a, b], ref, deterministic=True)
    assert not det["ok"] and "deterministic runs differ" in det["why"]
    off = rc.compare([a, [a[0] + 1e-2]], ref, deterministic=False)
    assert not off["ok"] and "reference error" in off["why"]
    nan = rc.compare([a, [torch.full_like(a[0], float("nan"))]], ref, deterministic=False)
    assert not nan["ok"] and "non-finite" in nan["why"]


def test_quick_selection_keeps_the_first_case_of_each_benchmark():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import report
    finally:
        sys.path.remove(str(REPO / "bench"))

    def item(name, fn, **params):
        return SimpleNamespace(name=name, originalname=fn, fspath="bench/b.py",
                               callspec=SimpleNamespace(params=params) if params else None)

    items = [item("a[x-fwd]", "a", case="x", mode="fwd"), item("a[x-bwd]", "a", case="x", mode="bwd"),
             item("a[y-fwd]", "a", case="y", mode="fwd"), item("b[plain]", "b", cfg=False),
             item("b[cfg]", "b", cfg=True), item("c", "c")]
    assert [i.name for i in report.headline(items)] == ["a[x-fwd]", "a[x-bwd]", "b[plain]", "c"]

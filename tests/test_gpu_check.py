"""scripts/gpu_check.sh --dry-run: every stage's plumbing on a CPU (install command printed and its
tools checked, info, selftest of one op, a tiny test selection, the benchmark report of the ceilings
case, the compile audit's command line), one log per stage, the summary table last, and a stage whose
budget runs out reported as TIMED OUT while the next stages still run. Also the --quick selection of
bench/report.py."""

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
STAGES = ["install", "info", "selftest", "tests", "bench", "audit"]


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
    for stage in ("install", "selftest", "tests", "bench", "audit"):
        assert status[stage] == "ok", f"{stage}: {status[stage]}\n{log}"

    logs = sorted(x.name for x in out.glob("*.log"))
    assert logs == [f"{i + 1:02d}-{s}.log" for i, s in enumerate(STAGES)]
    assert "TIMED OUT after 1s" in (out / "02-info.log").read_text()
    st = json.loads((out / "selftest.json").read_text())
    assert st["failed"] == 0 and st["passed"] > 0 and {r["op"] for r in st["rows"]} == {"adversarial_losses"}
    assert re.search(r"selftest +ok .* \d+ passed, 0 failed \(cpu\)", summary)
    assert re.search(r"tests +ok .* 2 passed, 0 failed", summary)
    bench = list((out / "bench").glob("*.json"))
    assert len(bench) == 1 and list((out / "bench").glob("*.md"))
    payload = json.loads(bench[0].read_text())
    assert payload["selection"]["quick"] is True and payload["ceilings"]["copy_bytes_per_s"] > 0


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

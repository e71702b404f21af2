"""examples/moment_matching.py --tiny runs on CPU (both variants of MomentMatchingDistiller) and reports
finite numbers."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "moment_matching.py"
FINAL = re.compile(r"^final: variant (\w+), student (\S+) -> (\S+), gap (\S+) -> (\S+), mean err (\S+), "
                   r"std err (\S+), backend (\w+), (\S+) s$")


def test_moment_matching_example_tiny_cli():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    finals = [FINAL.match(line) for line in proc.stdout.splitlines() if line.startswith("final:")]
    assert len(finals) == 1 and finals[0] is not None, out[-2000:]
    assert finals[0][1] == "alternating"
    values = [float(v) for v in finals[0].groups()[1:7]]
    assert all(math.isfinite(v) for v in values), values
    assert finals[0][8] in ("reference", "triton")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 6 and sum(" aux " in line for line in lines) == 3  # student and aux steps alternate


def test_moment_matching_example_parameter_variant():
    spec = importlib.util.spec_from_file_location("example_moment_matching", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--tiny", "--device", "cpu", "--variant", "parameter", "--steps", "2", "--batch-size", "4"])
    assert all(math.isfinite(v) for v in res.values()), res

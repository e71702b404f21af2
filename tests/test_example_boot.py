"""examples/boot.py --tiny runs on CPU (BootDistiller in a diffusers-style loop) and reports finite losses."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "boot.py"
FINAL = re.compile(r"^final: boot (\S+) -> (\S+), boundary (\S+) -> (\S+), one-step vs teacher mse (\S+), "
                   r"backend (\w+), (\S+) s$")


def test_boot_example_tiny_cli():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    finals = [FINAL.match(line) for line in proc.stdout.splitlines() if line.startswith("final:")]
    assert len(finals) == 1 and finals[0] is not None, out[-2000:]
    values = [float(v) for v in finals[0].groups()[:5]]
    assert all(math.isfinite(v) and v >= 0 for v in values), values
    assert finals[0][6] in ("reference", "triton")
    assert len([line for line in proc.stdout.splitlines() if line.startswith("step ")]) == 6


def test_boot_example_with_classifier_free_guidance():
    spec = importlib.util.spec_from_file_location("example_boot", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--tiny", "--device", "cpu", "--steps", "2", "--batch-size", "2", "--guidance-scale", "3",
                    "--teacher-steps", "2"])
    assert all(math.isfinite(v) for v in res.values()), res

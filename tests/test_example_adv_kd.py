"""examples/adv_kd.py --tiny runs on CPU (AdversarialDistiller in Adv-KD's loop) and reports finite losses."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "adv_kd.py"
FINAL = re.compile(r"^final: d_loss (\S+) -> (\S+), g_loss (\S+) -> (\S+), mse to teacher (\S+) -> (\S+), "
                   r"backend (\w+), (\S+) s$")


def test_adv_kd_example_tiny_cli():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    finals = [FINAL.match(line) for line in proc.stdout.splitlines() if line.startswith("final:")]
    assert len(finals) == 1 and finals[0] is not None, out[-2000:]
    values = [float(v) for v in finals[0].groups()[:6]]
    assert all(math.isfinite(v) for v in values), values
    assert values[0] > 0 and values[2] > 0  # softplus losses (+ GP) are positive
    assert finals[0][7] in ("reference", "triton")
    assert len([line for line in proc.stdout.splitlines() if line.startswith("step ")]) == 8

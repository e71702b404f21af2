"""examples/adv_kd.py --tiny runs on CPU (AdversarialDistiller in Adv-KD's loop) and reports finite losses."""

from __future__ import annotations

import math
import re

from _examples import final_line, run_example, step_lines

FINAL = re.compile(r"^final: d_loss (\S+) -> (\S+), g_loss (\S+) -> (\S+), mse to teacher (\S+) -> (\S+), "
                   r"backend (\w+), (\S+) s$")


def test_adv_kd_example_tiny_cli():
    proc = run_example("adv_kd.py", "--tiny", "--device", "cpu", timeout=300)
    final = final_line(proc, FINAL)
    values = [float(v) for v in final.groups()[:6]]
    assert all(math.isfinite(v) for v in values), values
    assert values[0] > 0 and values[2] > 0  # softplus losses (+ GP) are positive
    assert final[7] in ("reference", "triton")
    assert len(step_lines(proc)) == 8

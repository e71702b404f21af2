"""examples/boot.py --tiny runs on CPU (BootDistiller in a diffusers-style loop) and reports finite losses."""

from __future__ import annotations

import math
import re

from _examples import final_line, load_example, run_example, step_lines

FINAL = re.compile(r"^final: boot (\S+) -> (\S+), boundary (\S+) -> (\S+), one-step vs teacher mse (\S+), "
                   r"backend (\w+), (\S+) s$")


def test_boot_example_tiny_cli():
    proc = run_example("boot.py", "--tiny", "--device", "cpu", timeout=300)
    final = final_line(proc, FINAL)
    values = [float(v) for v in final.groups()[:5]]
    assert all(math.isfinite(v) and v >= 0 for v in values), values
    assert final[6] in ("reference", "triton")
    assert len(step_lines(proc)) == 6


def test_boot_example_with_classifier_free_guidance():
    mod = load_example("boot.py")
    res = mod.main(["--tiny", "--device", "cpu", "--steps", "2", "--batch-size", "2", "--guidance-scale", "3",
                    "--teacher-steps", "2"])
    assert all(math.isfinite(v) for v in res.values()), res

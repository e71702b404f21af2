"""examples/moment_matching.py --tiny runs on CPU (both variants of MomentMatchingDistiller) and reports
finite numbers."""

from __future__ import annotations

import math
import re

from _examples import final_line, load_example, run_example, step_lines

FINAL = re.compile(r"^final: variant (\w+), student (\S+) -> (\S+), gap (\S+) -> (\S+), mean err (\S+), "
                   r"std err (\S+), backend (\w+), (\S+) s$")


def test_moment_matching_example_tiny_cli():
    proc = run_example("moment_matching.py", "--tiny", "--device", "cpu", timeout=300)
    final = final_line(proc, FINAL)
    assert final[1] == "alternating"
    values = [float(v) for v in final.groups()[1:7]]
    assert all(math.isfinite(v) for v in values), values
    assert final[8] in ("reference", "triton")
    lines = step_lines(proc)
    assert len(lines) == 6 and sum(" aux " in line for line in lines) == 3  # student and aux steps alternate


def test_moment_matching_example_parameter_variant():
    mod = load_example("moment_matching.py")
    res = mod.main(["--tiny", "--device", "cpu", "--variant", "parameter", "--steps", "2", "--batch-size", "4"])
    assert all(math.isfinite(v) for v in res.values()), res

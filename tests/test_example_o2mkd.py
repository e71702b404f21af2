"""examples/o2mkd.py runs end to end on CPU (cpp backend), the students learn, and DDIM sampling
through a DDIMPipeline whose unet is the MultiStudent works."""

from __future__ import annotations

import math
import re

from _examples import example_env, run_example


def test_example_o2mkd_tiny_runs_and_learns():
    proc = run_example("o2mkd.py", "--tiny", "--device", "cpu", "--students", "2", "--steps", "10",
                       "--sampling-steps", "2", env=example_env())
    m = re.search(r"final: o2mkd ([\d.eE+-]+) -> ([\d.eE+-]+), students (\d+), fused (\w+), backend (\w+), "
                  r"sample_mse ([\d.eE+-]+)", proc.stdout)
    assert m, proc.stdout[-2000:]
    first, last, sample_mse = float(m.group(1)), float(m.group(2)), float(m.group(6))
    assert m.group(3) == "2" and m.group(4) == "False"  # "auto" runs the per-student loop on CPU
    assert m.group(5) == "cpp"  # CPU tensors: the C++ kernels of segment_mse
    assert all(math.isfinite(v) and v >= 0 for v in (first, last, sample_mse))
    # Fixed seed: the averaged loss of the last fifth of the steps is below that of the first fifth.
    assert last < first, proc.stdout

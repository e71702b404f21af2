"""examples/rdd.py runs end to end with --tiny (CPU, reference backend) and the student learns."""

from __future__ import annotations

import math
import re

from _examples import example_env, run_example


def test_example_rdd_tiny_runs_and_learns():
    proc = run_example("rdd.py", "--tiny", "--device", "cpu", env=example_env())
    m = re.search(r"final: rdd ([\d.eE+-]+) -> ([\d.eE+-]+), mse ([\d.eE+-]+) -> ([\d.eE+-]+), backend (\w+)",
                  proc.stdout)
    assert m, proc.stdout[-2000:]
    rdd0, rdd1, mse0, mse1 = (float(m.group(i)) for i in range(1, 5))
    assert all(math.isfinite(v) and v >= 0 for v in (rdd0, rdd1, mse0, mse1))
    assert m.group(5) == "reference"  # CPU tensors outside the interpreter: the reference backend
    # Fixed seed: the averaged losses of the last fifth of the steps are below those of the first fifth.
    assert rdd1 < rdd0 and mse1 < mse0, proc.stdout

"""examples/ddp_rdd.py runs under torchrun on 2 CPU ranks (gloo), raw DDP and through accelerate."""

from __future__ import annotations

import math
import os
import re

import pytest
from _examples import ROOT, run_example

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # two torchrun launches, ~20-40 s each

LINE = re.compile(r"rank (\d+)/(\d+) step (\d+) loss (\S+) \(rdd ([^,]+), memory ([^,]+), mse ([^)]+)\)")


def _torchrun(*extra: str, steps: int = 3) -> str:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    # --standalone: a private rendezvous on a free port, so parallel runs do not clash
    proc = run_example("ddp_rdd.py", "--tiny", "--cpu", "--steps", str(steps), *extra, env=env, timeout=300,
                       launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"))
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("mode", ["ddp", "accelerate"])
def test_ddp_rdd_example_two_cpu_ranks(mode):
    out = _torchrun(*(["--accelerate"] if mode == "accelerate" else []))
    rows = {}
    for m in LINE.finditer(out):  # not line by line: the two ranks share one stdout pipe
        rank, world, step = int(m[1]), int(m[2]), int(m[3])
        assert world == 2
        rows[(rank, step)] = [float(v) for v in m.groups()[3:]]
    assert sorted(rows) == [(r, s) for r in range(2) for s in range(3)], out[-4000:]
    assert all(math.isfinite(v) for vals in rows.values() for v in vals), out[-4000:]
    assert "process group active: True" in out
    for step in range(3):
        # the relational loss is computed over the global batch: the same value on both ranks ...
        assert rows[(0, step)][1] == pytest.approx(rows[(1, step)][1], rel=1e-5)
        # ... while the plain per-rank MSE sees different data on each rank
        assert rows[(0, step)][3] != rows[(1, step)][3]

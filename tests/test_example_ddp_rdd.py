"""examples/ddp_rdd.py runs under torchrun on 2 CPU ranks (gloo), raw DDP and through accelerate, and warns
when a launch meant for several processes yields one."""

from __future__ import annotations

import math
import os
import re

import pytest
from _examples import ROOT, load_example, run_example

pytestmark = pytest.mark.distributed

LINE = re.compile(r"rank (\d+)/(\d+) step (\d+) loss (\S+) \(rdd ([^,]+), memory ([^,]+), mse ([^)]+)\)")
WARNING = "ddp_rdd: WARNING: training on ONE process (world 1)"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for var in ("WORLD_SIZE", "ACCELERATE_NUM_PROCESSES", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    return env


def _torchrun(*extra: str, steps: int = 3) -> str:
    # --standalone: a private rendezvous on a free port, so parallel runs do not clash
    proc = run_example("ddp_rdd.py", "--tiny", "--cpu", "--steps", str(steps), *extra, env=_env(), timeout=300,
                       launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"))
    return proc.stdout + proc.stderr


@pytest.mark.slow  # two torchrun launches, ~20-40 s each
@pytest.mark.parametrize("mode", ["ddp_world", "accelerate_local"])
def test_ddp_rdd_example_two_cpu_ranks(mode):
    extra = ["--process-group", "world"] if mode == "ddp_world" else ["--accelerate"]
    out = _torchrun(*extra)
    rows = {}
    for m in LINE.finditer(out):  # not line by line: the two ranks share one stdout pipe
        rank, world, step = int(m[1]), int(m[2]), int(m[3])
        assert world == 2
        rows[(rank, step)] = [float(v) for v in m.groups()[3:]]
    assert sorted(rows) == [(r, s) for r in range(2) for s in range(3)], out[-4000:]
    assert all(math.isfinite(v) for vals in rows.values() for v in vals), out[-4000:]
    assert "process group active: True" in out
    assert WARNING not in out
    for step in range(3):
        rdd0, rdd1 = rows[(0, step)][1], rows[(1, step)][1]
        if mode == "ddp_world":
            # the relational loss is computed over the global batch: the same value on both ranks ...
            assert rdd0 == pytest.approx(rdd1, rel=1e-5)
        else:
            # ... while by default (official RDD) each rank's loss is its own local batch's
            assert rdd0 != pytest.approx(rdd1, rel=1e-5)
        # the plain per-rank MSE sees different data on each rank
        assert rows[(0, step)][3] != rows[(1, step)][3]


@pytest.fixture(scope="module")
def example():
    return load_example("ddp_rdd.py")


def test_single_process_warning_rules(example):
    warn = example.single_process_warning
    accel_cmd = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--num_processes", "2", "--cpu", "x.py"]
    # several processes asked for, one obtained: warned, with the fix and the docs reference
    msg = warn(1, False, environ={}, parent_cmdline=accel_cmd)
    assert msg is not None and msg.startswith(WARNING) and "accelerate launch --num_processes 2" in msg
    assert "torchrun --nproc-per-node N" in msg and "docs/distributed.md" in msg
    assert "--num-processes 3" in warn(1, False, environ={}, parent_cmdline=[
        "python", "-m", "accelerate.commands.launch", "--num-processes", "3", "x.py"])
    assert "4 processes were requested" in warn(1, False, environ={}, parent_cmdline=[
        "accelerate", "launch", "--num_processes=4", "x.py"])
    assert "WORLD_SIZE=2" in warn(1, False, environ={"WORLD_SIZE": "2"}, parent_cmdline=[])
    assert "ACCELERATE_NUM_PROCESSES=2" in warn(1, True, environ={"ACCELERATE_NUM_PROCESSES": "2"}, parent_cmdline=[])
    assert "--accelerate was given" in warn(1, True, environ={}, parent_cmdline=[])
    # no warning: several processes obtained, or a plain one-process run
    assert warn(2, True, environ={"WORLD_SIZE": "2"}, parent_cmdline=accel_cmd) is None
    assert warn(1, False, environ={}, parent_cmdline=["python", "examples/ddp_rdd.py"]) is None
    assert warn(1, False, environ={"WORLD_SIZE": "1"}, parent_cmdline=["bash"]) is None
    # --num_processes of a parent that is not accelerate is not read
    assert warn(1, False, environ={}, parent_cmdline=["python", "other.py", "--num_processes", "2"]) is None


@pytest.mark.slow  # one accelerate launch of a 1-step tiny run
def test_accelerate_launch_cpu_two_processes_warns_world_one():
    """The reported case: `accelerate launch --num_processes 2 --cpu` runs the script ONCE (no mpirun)."""
    proc = run_example("ddp_rdd.py", "--tiny", "--cpu", "--accelerate", "--steps", "1", env=_env(), timeout=300,
                       launcher=("-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"))
    assert "world 1" in proc.stdout, proc.stdout[-2000:]
    assert WARNING in proc.stderr and "2 processes were requested" in proc.stderr, proc.stderr[-3000:]
    assert WARNING not in proc.stdout  # on stderr only

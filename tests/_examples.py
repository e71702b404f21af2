"""Helpers for the tests that run the scripts in examples/ (``from _examples import run_example``).

pytest's default "prepend" import mode puts this directory on ``sys.path`` (tests/ has no
``__init__.py``), so the test files import this module by its bare name.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def example_env() -> dict[str, str]:
    """The current environment without ``FASTDISTILL_BACKEND``, so the example picks its own backends."""
    env = dict(os.environ)
    env.pop("FASTDISTILL_BACKEND", None)
    return env


def run_example(script_name: str, *args: str, env: Mapping[str, str] | None = None, timeout: float = 600,
                launcher: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Run ``python [*launcher] examples/<script_name> *args`` from the repository root; assert it exits 0.

    ``launcher``: interpreter arguments before the script (e.g. ``("-m", "torch.distributed.run", ...)``).
    ``env``: the child's environment (None: inherit). On failure the message carries the tails of
    stdout and stderr.
    """
    cmd = [sys.executable, *launcher, str(EXAMPLES / script_name), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=None if env is None else dict(env), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (f"{script_name} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                  f"--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def final_line(proc: subprocess.CompletedProcess[str], pattern: re.Pattern[str]) -> re.Match[str]:
    """The example's one ``final:`` line of stdout, matched against ``pattern`` (asserts both)."""
    finals = [pattern.match(line) for line in proc.stdout.splitlines() if line.startswith("final:")]
    assert len(finals) == 1 and finals[0] is not None, (proc.stdout + proc.stderr)[-2000:]
    return finals[0]


def step_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The stdout lines that start with ``step ``."""
    return [line for line in proc.stdout.splitlines() if line.startswith("step ")]


def load_example(script_name: str) -> ModuleType:
    """Import examples/<script_name> as a module (named ``example_<stem>``) without running its CLI."""
    path = EXAMPLES / script_name
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None and spec.loader is not None, path
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

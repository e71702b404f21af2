"""examples/attention_distill.py runs end to end with --tiny (CPU, reference backends) and the
student's attention maps move toward the teacher's."""

from __future__ import annotations

import json
import math

import pytest
from _examples import example_env, run_example

pytest.importorskip("diffusers")


def test_example_attention_distill_tiny_runs_and_learns():
    proc = run_example("attention_distill.py", "--tiny", "--device", "cpu", "--steps", "6", env=example_env())
    last = proc.stdout.strip().splitlines()[-1]
    summary = json.loads(last)["summary"]
    assert summary["steps"] == 6 and summary["layers"] == 4
    vals = [summary[k] for k in ("first_attention_kl", "last_attention_kl", "first_loss", "last_loss")]
    assert all(math.isfinite(v) and v >= 0 for v in vals)
    # Fixed seeds: training on the attention KL lowers it, and the total loss.
    assert summary["last_attention_kl"] < summary["first_attention_kl"], proc.stdout
    assert summary["last_loss"] < summary["first_loss"], proc.stdout
    # Both fused ops ran (CPU tensors outside the interpreter: their reference backends).
    assert "fused_attention=reference" in summary["backends"] and "attention_kl=reference" in summary["backends"]

"""Benchmarks are pytest items marked ``bench``; run them with ``pytest --benchmark`` (our flag,
defined in the root conftest) or ``pytest bench --benchmark-only`` (pytest-benchmark's).

At the end of the session every recorded result is written to ``$FASTDISTILL_BENCH_OUT`` (JSON)
when that variable is set (``bench/report.py`` sets it), and a short table is printed.
"""

from __future__ import annotations

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "bench" in str(item.fspath):
            item.add_marker(pytest.mark.bench)


try:
    import pytest_benchmark  # noqa: F401

    @pytest.fixture(autouse=True)
    def _plugin_benchmark(benchmark):
        """Hand pytest-benchmark's ``benchmark`` fixture to the harness (declared statically, so
        ``--benchmark-only`` sees that every benchmark uses it)."""
        harness._PLUGIN_FIXTURE[:] = [benchmark, False]
        yield
        harness._PLUGIN_FIXTURE[:] = [None, False]

except ImportError:  # the plugin is optional: our own --benchmark flag works without it
    pass


def pytest_sessionfinish(session, exitstatus):
    if not harness.RESULTS:
        return
    out = os.environ.get("FASTDISTILL_BENCH_OUT")
    if out:
        harness.dump(out)
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is None:
        return
    tr.write_sep("=", f"fastdistill benchmarks on {harness.RESULTS[0].device}")
    base = {}
    for r in harness.RESULTS:
        if r.provider == "eager":
            base[(r.op, r.case, r.mode)] = r.ms
    tr.write_line(f"{'op':<22}{'case':<34}{'mode':<9}{'provider':<14}{'ms':>10}{'vs eager':>10}{'floor':>8}")
    for r in harness.RESULTS:
        ref = base.get((r.op, r.case, r.mode))
        ratio = ref / r.ms if ref and r.ms == r.ms and r.ms > 0 else math.nan
        tr.write_line(f"{r.op:<22}{r.case[:33]:<34}{r.mode:<9}{r.provider:<14}{r.ms:>10.3f}{ratio:>9.2f}x"
                      f"{100 * r.fraction_of_floor:>7.1f}%")

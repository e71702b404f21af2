"""Repository-wide pytest setup.

* Triton's CPU interpreter must be chosen before triton is first imported: when no CUDA GPU is
  visible (CI, laptops), ``TRITON_INTERPRET=1`` is set here, at the very start of the session, so
  every Triton kernel is tested on CPU tensors. ``FASTDISTILL_TEST_INTERPRET=0/1`` overrides.
* ``--benchmark`` (our flag; pytest-benchmark has none of that name) runs the microbenchmarks
  under ``bench/`` instead of the tests. Without it, benchmark items are deselected.
"""

from __future__ import annotations

import os

if "FASTDISTILL_TEST_INTERPRET" in os.environ:
    os.environ["TRITON_INTERPRET"] = os.environ["FASTDISTILL_TEST_INTERPRET"]
elif "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the fastdistill microbenchmarks in bench/ (and only them)")


def _benchmarking(config: pytest.Config) -> bool:
    return bool(config.getoption("--benchmark") or config.getoption("--benchmark-only", default=False))


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--benchmark") and not config.args_source == pytest.Config.ArgsSource.ARGS:
        # `pytest --benchmark` with no paths: run the benchmark folder.
        config.args[:] = [os.path.join(os.path.dirname(__file__), "bench")]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    bench = _benchmarking(config)
    keep, drop = [], []
    for item in items:
        is_bench = item.get_closest_marker("bench") is not None
        (keep if is_bench == bench else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep

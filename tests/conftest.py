"""Shared fixtures for the test suite (see fastdistill.testing for the comparison harness)."""

from __future__ import annotations

import pytest
import torch

from fastdistill import _alloc
from fastdistill.testing import NO_GPU_REASON, fail_if_unavailable, last_seed, start_test_seed


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without a visible CUDA GPU every ``gpu`` test (the ``*-cuda`` cases of the op tests and the
    large-shape GPU tests) is reported as skipped with the reason, never as passed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_GPU_REASON)
    for item in items:
        if item.get_closest_marker("gpu") is not None and item.get_closest_marker("skip") is None:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """A (backend, device) case whose backend the op declares but that cannot run where it must
    (fastdistill.testing.backend_device_cases) fails here with the reason."""
    fail_if_unavailable(item)


@pytest.fixture(autouse=True)
def _test_seed():
    """A fresh base seed per test (printed on failure; FASTDISTILL_TEST_SEED pins it)."""
    start_test_seed()
    yield


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    """Every kernel output buffer starts as NaN / INT_MIN, so unwritten elements fail."""
    with _alloc.poison_outputs():
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        report.sections.append(("fastdistill", f"test seed: {last_seed()} "
                                               f"(pin with FASTDISTILL_TEST_SEED={last_seed()})"))


@pytest.fixture
def device() -> torch.device:
    """The GPU when there is one, else the CPU (op tests parametrise ``backend,device`` instead)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

"""Shared pytest fixtures, and the `cuda` marker: tests that need a CUDA device.

Tests marked `cuda` are skipped where torch sees no CUDA device; `pytest -m cuda` runs only them (on a
GPU machine, `bash bench/gpu_check.sh` does). Every other test is a CPU test: on a machine with a GPU
it still sees none (`torch.cuda.is_available()` is False inside it), so that device "auto" means the
CPU there as it does on the machines the suite normally runs on.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked `cuda` when there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (on a GPU machine: pytest -m cuda)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide the GPU from tests not marked `cuda` (nothing to do on a machine without one)."""
    if request.node.get_closest_marker("cuda") is None and torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test with one intra-op thread: tiny models gain nothing from more, and on a busy 2-core
    machine every parallel region of a second thread waits for a descheduled core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""Shared fixtures: every test must leave no checkpoint worker process behind."""

from __future__ import annotations

from collections.abc import Iterator

import psutil
import pytest
import torch


def _workers() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        # multiprocessing's own helpers live for the whole session; they are not ours.
        if "resource_tracker" in cmd or "forkserver" in cmd:
            continue
        if child.status() == psutil.STATUS_ZOMBIE:
            continue
        found.append(child)
    return found


@pytest.fixture(autouse=True)
def no_leftover_workers() -> Iterator[None]:
    yield
    left = _workers()
    for proc in left:
        proc.kill()
    assert not left, f"test left processes running: {[p.pid for p in left]}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

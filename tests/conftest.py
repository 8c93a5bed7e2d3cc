"""Shared fixtures: every test must leave no checkpoint worker process behind."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from ckpt_helpers import live_workers as _workers

# A suite started in the background by a shell (`cmd &`) inherits SIGINT ignored, and so
# would every program it starts: the Ctrl-C tests need it delivered, as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def gate(tmp_path: Any) -> Iterator[str]:
    """A gate a worker blocks on until the test opens it; opened in teardown whatever
    happened, so no worker is left parked on it."""
    from ckpt_helpers import make_gate, open_gate

    path = make_gate(str(tmp_path), "gate")
    yield path
    with contextlib.suppress(OSError):
        open_gate(path)


@pytest.fixture(autouse=True)
def no_leftover_workers() -> Iterator[None]:
    yield
    left = _workers()
    for proc in left:
        proc.kill()
    assert not left, f"test left processes running: {[p.pid for p in left]}"


# Each of these starts several processes (ranks, torchrun, the CLI, a whole example) or
# runs for tens of seconds: `-m "not slow"` leaves them out of a quick inner loop. The
# README's test command runs them all.
SLOW_MODULES = {
    "test_cli.py",
    "test_dcp.py",
    "test_distributed.py",
    "test_examples.py",
    "test_manager_dcp.py",
    "test_soak.py",
}
SLOW_TESTS = {
    "test_hundred_thousand_tensors_round_trip",
    "test_fifo_metadata_or_shard_fails_fast_instead_of_hanging",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow = pytest.mark.slow
    for item in items:
        name = getattr(item, "originalname", None) or item.name
        if item.path.suffix == ".md" or item.path.name in SLOW_MODULES or name in SLOW_TESTS:
            item.add_marker(slow)  # the documents' blocks run the examples end to end
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

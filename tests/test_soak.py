"""A soak of 200 saves per caller: nothing leaks (processes, threads, descriptors, memfds,
temporary files) and memory stays flat after warm-up. ``benchmarks/soak.py`` runs more."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "soak", Path(__file__).parent.parent / "benchmarks" / "soak.py"
)
assert _spec is not None and _spec.loader is not None
soak_module = importlib.util.module_from_spec(_spec)
sys.modules["soak"] = soak_module
_spec.loader.exec_module(soak_module)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("persistent", [False, True], ids=["fork", "persistent"])
def test_two_hundred_saves_leak_nothing(tmp_path: Path, persistent: bool) -> None:
    out = soak_module.soak(tmp_path, 200, persistent)
    assert out["last_step_ok"] == 1.0
    assert (out["children"], out["threads"], out["fds"], out["memfds"], out["temps"]) == (
        0,
        0,
        0,
        0,
        0,
    ), out
    # One staging copy is 2 MiB here: growth beyond a few MiB would be a leak per save.
    assert out["rss_mib"] < 16, out

"""The event loops the async facade is tested on: asyncio, trio, and uvloop when present."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

BACKENDS: list[Any] = [pytest.param("asyncio", id="asyncio"), pytest.param("trio", id="trio")]
with contextlib.suppress(ImportError):
    import uvloop  # noqa: F401

    BACKENDS.append(pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"))

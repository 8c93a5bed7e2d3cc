"""Generated state dicts, saved through the queue and loaded back with ``torch.load``:
nested containers, every dtype (bfloat16 and float8 included), non-contiguous tensors,
views sharing storage, zero-size tensors, scalars and plain Python values. Values, dtypes,
shapes, strides and storage sharing must all come back as ``torch.save`` keeps them."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiockpt import TorchCheckpoint

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
]
_counter = itertools.count()


@st.composite
def tensors(draw: st.DrawFn, pool: list[torch.Tensor]) -> torch.Tensor:
    """A fresh tensor, or a view (slice, transpose, reshape) of one drawn before."""
    if pool and draw(st.booleans()):
        base = draw(st.sampled_from(pool))
        flat = base.reshape(-1) if base.is_contiguous() else base
        kind = draw(st.sampled_from(["slice", "transpose", "same"]))
        if kind == "slice" and flat.dim() == 1 and flat.numel() > 1:
            start = draw(st.integers(0, flat.numel() - 1))
            return flat[start : draw(st.integers(start, flat.numel()))]
        if kind == "transpose" and base.dim() == 2:
            return base.t()
        return base.view(base.shape)  # another tensor object on the same storage
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    g = torch.Generator().manual_seed(next(_counter))
    raw = torch.randint(0, 256, (int(torch.tensor(shape).prod()) if shape else 1,), generator=g)
    if dtype.is_floating_point and dtype.itemsize >= 2:
        t = (raw.to(torch.float32) / 7).to(dtype).reshape(shape)
    elif dtype.is_complex:
        t = torch.complex(raw.float(), -raw.float()).to(dtype).reshape(shape)
    else:
        t = raw.to(torch.uint8).view(torch.uint8).to(torch.uint8).reshape(shape)
        t = t.view(dtype) if dtype.itemsize == 1 else t.to(dtype)
    if t.dim() == 2 and draw(st.booleans()):
        t = t.t()  # non-contiguous from the start
    pool.append(t)
    return t


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, Any]:
    pool: list[torch.Tensor] = []
    leaves = st.one_of(
        tensors(pool),
        st.integers(-(2**40), 2**40),
        st.text(max_size=5),
        st.none(),
        st.floats(allow_nan=False),
    )
    tree = st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.text(max_size=4), children, max_size=4),
            st.lists(children, max_size=3).map(tuple),
        ),
        max_leaves=12,
    )
    return draw(st.dictionaries(st.text(min_size=1, max_size=6), tree, min_size=1, max_size=5))


def _leaves(obj: Any) -> Iterator[Any]:
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _leaves(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _leaves(value)
    else:
        yield obj


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if (a.dtype, a.shape, a.stride(), a.storage_offset()) != (
        b.dtype,
        b.shape,
        b.stride(),
        b.storage_offset(),
    ):
        return False
    return bytes(a.untyped_storage()) == bytes(b.untyped_storage())


def _sharing(obj: Any) -> list[tuple[int, int]]:
    ts = [x for x in _leaves(obj) if isinstance(x, torch.Tensor)]
    ptr = [t.untyped_storage().data_ptr() if t.untyped_storage().nbytes() else -1 for t in ts]
    return [(i, j) for i, j in itertools.combinations(range(len(ts)), 2) if ptr[i] == ptr[j] >= 0]


@pytest.fixture(params=[False, True], ids=["fork", "persistent"])
def ckpt(request: pytest.FixtureRequest) -> Iterator[TorchCheckpoint]:
    c = TorchCheckpoint(persistent=request.param)
    yield c
    c.close()


@pytest.mark.timeout(300)
def test_generated_state_dicts_round_trip(ckpt: TorchCheckpoint, tmp_path: Path) -> None:
    tried = []

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(state_dicts())
    def check(sd: dict[str, Any]) -> None:
        path = tmp_path / f"fuzz{len(tried)}.pt"
        tried.append(path)
        ckpt.async_save(sd, str(path))
        ckpt.finalize_async_save(blocking=True)
        out = torch.load(path, weights_only=True)
        ours, theirs = list(_leaves(out)), list(_leaves(sd))
        assert len(ours) == len(theirs)
        for x, y in zip(ours, theirs, strict=True):
            if isinstance(y, torch.Tensor):
                assert isinstance(x, torch.Tensor) and _same(x, y), (x, y)
            else:
                assert x == y
        assert _sharing(out) == _sharing(sd)

    check()
    assert len(tried) >= 20

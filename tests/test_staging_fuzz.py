"""Generated state dicts, saved through the queue and loaded back with ``torch.load``:
nested containers (some referenced twice, some cyclic), every dtype (bfloat16 and float8
included), non-contiguous tensors, views sharing storage, zero-size tensors, Parameters and
subclasses with attributes, tensors requiring grad, conjugate, negative and expanded views,
scalars and plain Python values. Everything must come back as ``torch.save`` of the same
state dict, taken when the save was scheduled, keeps it."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fidelity import as_saved, as_torch_saves
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


class Tagged(torch.Tensor):
    """A Python tensor subclass (no ``__torch_dispatch__``)."""


class FlaggedParameter(torch.nn.Parameter):
    """A Parameter subclass."""


@st.composite
def dressed(draw: st.DrawFn, pool: list[torch.Tensor]) -> torch.Tensor:
    """A tensor as training code holds them: a Parameter (or a subclass) with flags, a
    tensor subclass, one that requires grad, a conjugate, negative or expanded view."""
    t = draw(tensors(pool))
    kind = draw(
        st.sampled_from(["parameter", "flagged", "subclass", "grad", "conj", "neg", "expand"])
    )
    # torch.load cannot load a float8 tensor that requires grad: leave those plain.
    floating = (t.dtype.is_floating_point and t.dtype.itemsize >= 2) or t.dtype.is_complex
    if kind in ("parameter", "flagged") and floating:
        cls = torch.nn.Parameter if kind == "parameter" else FlaggedParameter
        t = cls(t, requires_grad=draw(st.booleans()))
    elif kind == "subclass":
        t = t.as_subclass(Tagged)
    elif kind == "grad" and floating:
        t = t.detach().requires_grad_()
    elif kind == "conj" and t.dtype.is_complex:
        t = t.conj()
    elif kind == "neg" and floating:
        t = torch._neg_view(t)
    elif kind == "expand" and t.numel() == 1:
        t = t.reshape(1).expand(draw(st.integers(2, 1000)))
    if draw(st.booleans()):
        t.note = draw(st.text(max_size=3))  # Megatron-style flags
        t.partition_dim = draw(st.integers(-1, 3))
    return t


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, Any]:
    pool: list[torch.Tensor] = []
    containers: list[Any] = []
    leaves = st.one_of(
        tensors(pool),
        dressed(pool),
        st.integers(-(2**40), 2**40),
        st.text(max_size=5),
        st.none(),
        st.floats(allow_nan=False),
    )

    def kept(container: Any) -> Any:
        containers.append(container)
        return container

    tree = st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4).map(kept),
            st.dictionaries(st.text(max_size=4), children, max_size=4).map(kept),
            st.lists(children, max_size=3).map(tuple),
        ),
        max_leaves=12,
    )
    sd = draw(st.dictionaries(st.text(min_size=1, max_size=6), tree, min_size=1, max_size=5))
    if containers and draw(st.booleans()):
        sd["again"] = draw(st.sampled_from(containers))  # a container referenced twice
    if containers and draw(st.booleans()):
        target = draw(st.sampled_from(containers))  # a cycle back to the top
        if isinstance(target, list):
            target.append(sd)
        else:
            target["up"] = sd
    return sd


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
        want = as_torch_saves(sd)
        ckpt.async_save(sd, str(path))
        ckpt.finalize_async_save(blocking=True)
        assert as_saved(str(path)) == want

    check()
    assert len(tried) >= 20

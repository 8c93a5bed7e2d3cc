"""Finding the tensors of a request and where each goes in a staging arena.

A *scan* walks the arguments once and collects, per tensor, what decides its place in an
arena: whether it is staged at all, which storage it views (by order of first appearance,
so that a state dict rebuilt around the same storages, or around fresh storages shared the
same way, scans alike), the storage's size, and the view's dtype, size, stride and offset.
The :class:`StagingPlan` computed from those is kept with them; the next scan that collects
the same values gets the same plan object back, and with it the arena's views, built once.
Any change of shape, dtype, storage size or sharing changes the values, hence the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._tree import iter_tensors

ALIGNMENT = 64
_TENSOR = torch.Tensor
_PARAMETER = torch.nn.Parameter
_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__
_plain_subclasses: dict[type, bool] = {}
_UNINITIALIZED: type = torch.nn.parameter.UninitializedTensorMixin  # type: ignore[attr-defined]
_STRIDED = torch.strided
_QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
_NOT_STAGED = -1


def plain_subclass(cls: type) -> bool:
    """Whether instances of the tensor subclass ``cls`` hold their data in their own
    storage, as a plain tensor does (Python subclasses that only add methods, attributes
    or ``__torch_function__``): such tensors are staged by storage and re-dressed. Wrapper
    subclasses (``__torch_dispatch__``, ``__tensor_flatten__``: DTensor, fake tensors)
    are copied whole."""
    known = _plain_subclasses.get(cls)
    if known is None:
        known = _plain_subclasses[cls] = (
            getattr(cls, "__torch_dispatch__", _PLAIN_DISPATCH) is _PLAIN_DISPATCH
            and not hasattr(cls, "__tensor_flatten__")
            # A lazy module's parameter has no data yet: every access to it raises.
            and not issubclass(cls, _UNINITIALIZED)
        )
    return known


def align(n: int) -> int:
    """``n`` rounded up to the arena alignment."""
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


@dataclass(frozen=True, eq=False)
class StagingPlan:
    """Where each storage of a state dict goes in an arena, and each tensor in it.

    ``slots`` holds ``(offset, nbytes)`` per distinct storage; ``tensors`` holds, per
    distinct staged tensor in traversal order, ``(slot, dtype, size, stride,
    storage_offset)``. Plans compare by identity: a scan returns the same plan object for
    the same layout, and an arena keeps its views for as long as its plan is the same.
    """

    slots: tuple[tuple[int, int], ...]
    tensors: tuple[tuple[int, torch.dtype, tuple[int, ...], tuple[int, ...], int], ...]
    nbytes: int


@dataclass
class Scan:
    """One scan of a request's arguments: the plan, and what a copy into it needs."""

    plan: StagingPlan
    #: Per tensor in traversal order: its index in ``plan.tensors``, or -1 if not staged.
    index: list[int]
    #: Per slot: a tensor whose storage fills it, and that storage's address.
    sources: list[torch.Tensor]
    pointers: list[int]
    #: Indices in ``plan.tensors`` of tensors that are more than a plain view of their
    #: storage (a Parameter, a subclass, requires_grad, attributes, conj/neg bits).
    dressed: set[int]

    @property
    def nbytes(self) -> int:
        return self.plan.nbytes


class PlanCache:
    """Scans arguments and hands back the previous plan while the layout is unchanged."""

    def __init__(self) -> None:
        self._key: list[Any] | None = None
        self._plan: StagingPlan | None = None
        self.hits = 0  # scans that reused the previous plan

    def scan(self, args: Any) -> Scan:
        """Scan the tensors inside ``args`` (any nested containers)."""
        first: dict[int, int] = {}
        slot_of: dict[int, int] = {}
        key: list[Any] = []
        index: list[int] = []
        sizes: list[int] = []
        sources: list[torch.Tensor] = []
        pointers: list[int] = []
        specs: list[Any] = []
        dressed: set[int] = set()
        flat = iter_tensors(args)
        # Repeated tensor objects are rare: look for them only if there are any.
        repeats = len(set(map(id, flat))) != len(flat)
        for pos, t in enumerate(flat):
            if repeats:
                seen = first.setdefault(id(t), pos)
                if seen != pos:  # the same tensor object again: it stays one object
                    index.append(index[seen])
                    key.append(seen)
                    continue
            dtype = t.dtype
            cls = type(t)
            if cls is not _TENSOR and cls is not _PARAMETER and not plain_subclass(cls):
                index.append(_NOT_STAGED)  # a wrapper subclass (its data is elsewhere)
                key.append(_NOT_STAGED)
                continue
            if t.layout is not _STRIDED or dtype in _QUANTIZED or t.is_nested or t.is_meta:
                # Sparse, quantized and nested tensors are copied whole; meta tensors pass.
                index.append(_NOT_STAGED)
                key.append(_NOT_STAGED)
                continue
            # What the arena's view lacks: its type, requires_grad, attributes, and the
            # conjugate/negative bits (the arena holds the storage's bytes as they are).
            dress = (
                cls is not _TENSOR
                or t.requires_grad
                or bool(t.__dict__)
                or t.is_neg()
                or (dtype.is_complex and t.is_conj())
            )
            try:
                storage = t.untyped_storage()
            except (RuntimeError, ValueError):  # no storage of its own (a lazy parameter)
                index.append(_NOT_STAGED)
                key.append(_NOT_STAGED)
                continue
            cdata = storage._cdata
            slot = slot_of.get(cdata)
            if slot is None:
                nbytes = storage.nbytes()
                if nbytes == 0:  # nothing to copy: cloned (an empty tensor)
                    index.append(_NOT_STAGED)
                    key.append(_NOT_STAGED)
                    continue
                slot = slot_of[cdata] = len(sizes)
                sizes.append(nbytes)
                sources.append(t)
                pointers.append(storage.data_ptr())
            spec = (slot, dtype, t.shape, t.stride(), t.storage_offset())
            if dress:
                dressed.add(len(specs))
            index.append(len(specs))
            specs.append(spec)
            key.append(spec)
        key.append(sizes)
        if self._plan is not None and key == self._key:
            self.hits += 1
            plan = self._plan
        else:
            plan = _make_plan(sizes, specs)
            self._key, self._plan = key, plan
        return Scan(plan, index, sources, pointers, dressed)


def _make_plan(sizes: list[int], specs: list[Any]) -> StagingPlan:
    slots = []
    offset = 0
    for size in sizes:
        slots.append((offset, size))
        offset += align(size)
    tensors = tuple((s, d, tuple(size), tuple(stride), o) for s, d, size, stride, o in specs)
    return StagingPlan(tuple(slots), tensors, offset)


def make_plan(args: Any) -> StagingPlan:
    """The plan for the arena-stageable tensors found in ``args`` (no cache)."""
    return PlanCache().scan(args).plan

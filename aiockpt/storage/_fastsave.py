"""``torch.save``'s file format, written with little work per tensor.

``torch.save`` spends several microseconds of Python per storage (its ``persistent_id``,
``Tensor.__reduce_ex__``, one record call each), which dominates with 100k tensors. This
writer produces the same archive: ``data.pkl`` pickled with protocol 2, the same reduce
calls (``torch._utils._rebuild_tensor_v2``, ``_rebuild_parameter``), storages keyed
``"0"``, ``"1"``... in the order they are first met (so tensors that share a storage still
share one when loaded), ``.format_version``, ``.storage_alignment``, ``byteorder``,
``data/<key>`` aligned to 64 bytes, ``version`` and ``.data/serialization_id``. The storage
bytes are written from where they lie, many records per ``os.writev``.

Plain CPU tensors and parameters take the fast path. Any other object is pickled the way
``torch.save`` pickles it (its storages get the same keys); objects this writer cannot
reproduce exactly (storages off the CPU, fake or meta tensors, storages viewed as two
dtypes) make :func:`save` hand the whole object to ``torch.save`` instead.
"""

from __future__ import annotations

import ctypes
import io
import pickle
import sys
import uuid
from collections import OrderedDict
from typing import Any

import torch

from .._staging import _views
from ._zipwrite import ZipStream

PROTOCOL = 2  # torch.save's default
_IOV_BATCH = 1024  # buffers per writev (IOV_MAX on Linux)
_STRIDED = torch.strided
_STORAGE_TYPES = (torch.storage.TypedStorage, torch.storage.UntypedStorage)
_rebuild_tensor_v2 = torch._utils._rebuild_tensor_v2
_rebuild_parameter = torch._utils._rebuild_parameter


def _storage_classes() -> dict[torch.dtype, tuple[Any, int, bool]]:
    """Per dtype that ``torch.save`` pickles through ``_rebuild_tensor_v2`` (dtypes that
    need ``_rebuild_tensor_v3`` are left out): the legacy storage class it names, the
    element size, and whether the dtype is complex (the only ones with a conjugate bit)."""
    newer = set(torch.storage._new_dtypes())
    out = {}
    for dtype, name in torch.storage._dtype_to_storage_type_map().items():
        if dtype not in newer and hasattr(torch, name):
            out[dtype] = (getattr(torch, name), dtype.itemsize, dtype.is_complex)
    for quantized in (torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4):
        out.pop(quantized, None)
    return out


_CLASSES = _storage_classes()


class Unsupported(Exception):
    """This object must be saved by ``torch.save`` itself."""


class _Pid:
    """A storage reference, pickled as its persistent id."""

    __slots__ = ("pid",)

    def __init__(self, pid: tuple[Any, ...]) -> None:
        self.pid = pid


class _Hooks:
    """Pickled as a fresh empty ``OrderedDict``, as ``torch.save`` writes backward hooks."""

    __slots__ = ()


_HOOKS_REDUCE = (OrderedDict, ())


# Tensors whose reduction is known before they are pickled: the views of staging arenas
# in a worker, built once per layout. Per arena: id(view) -> (view, storage, storage
# class, storage numel, dtype, storage offset, size, stride).
_KNOWN: dict[int, dict[int, tuple[Any, ...]]] = {}


def register_views(group: int, views: list[torch.Tensor]) -> None:
    """Remember how to pickle ``views`` (plain CPU tensors that will not change shape or
    storage while registered); replaces the views registered under ``group`` before."""
    known = {}
    # One tuple object per distinct size or stride: the pickler then writes each once and
    # refers to it from its memo (tuples are immutable: loading is unchanged).
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}
    for view in views:
        entry = _CLASSES.get(view.dtype)
        if entry is None or view.is_neg() or view.is_conj():
            continue
        storage = view.untyped_storage()
        known[id(view)] = (
            view,
            storage,
            entry[0],
            storage.nbytes() // entry[1],
            view.dtype,
            view.storage_offset(),
            shapes.setdefault(tuple(view.size()), tuple(view.size())),
            shapes.setdefault(view.stride(), view.stride()),
        )
    _KNOWN[group] = known


def forget_views(group: int) -> None:
    """Drop the views registered under ``group``."""
    _KNOWN.pop(group, None)


_views.subscribe(register_views, forget_views)


def _known(obj: torch.Tensor) -> tuple[Any, ...] | None:
    if not _views.trusted():
        return None
    key = id(obj)
    # The worker's reader thread registers the views of new arenas while this runs.
    for known in tuple(_KNOWN.values()):
        entry = known.get(key)
        if entry is not None and entry[0] is obj:
            return entry
    return None


class ArchivePickler(pickle.Pickler):
    """Pickles ``data.pkl`` as ``torch.save`` does and collects the storages to write."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=PROTOCOL)
        self.storages: list[torch.UntypedStorage] = []
        self._keys: dict[int, tuple[str, torch.dtype]] = {}
        self._dtypes: dict[int, torch.dtype] = {}
        self._shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # see register_views

    def _pid(
        self, storage: torch.UntypedStorage, dtype: torch.dtype, kind: Any, numel: int
    ) -> _Pid:
        """The persistent id of a CPU ``storage`` viewed as ``dtype``; the first time a
        storage is met, it gets the next key and is queued for writing."""
        cdata = storage._cdata
        known = self._keys.get(cdata)
        if known is None:
            ptr = storage.data_ptr()
            if ptr and self._dtypes.setdefault(ptr, dtype) != dtype:
                raise Unsupported("a storage viewed as two dtypes")  # torch.save refuses it
            known = self._keys[cdata] = (str(len(self.storages)), dtype)
            self.storages.append(storage)
        elif known[1] != dtype:
            raise Unsupported("a storage viewed as two dtypes")
        return _Pid(("storage", kind, known[0], "cpu", numel))

    def _storages_as_pids(self, value: Any) -> Any:
        """``value`` (a reduce tuple's arguments) with every storage in it, at any depth
        of tuples, replaced by its persistent id, as ``torch.save``'s would be."""
        if isinstance(value, tuple):
            return tuple(self._storages_as_pids(v) for v in value)
        if isinstance(value, torch.storage.TypedStorage):
            typed: Any = value
            kind = getattr(torch, typed._pickle_storage_type())
            return self._pid(typed._untyped_storage, typed.dtype, kind, typed._size())
        if isinstance(value, torch.UntypedStorage):
            return self._pid(value, torch.uint8, torch.UntypedStorage, value.nbytes())
        return value

    def reducer_override(self, obj: Any) -> Any:
        tp = type(obj)
        if tp is torch.Tensor and _KNOWN:
            entry = _known(obj)
            if entry is not None:
                _, storage, kind, numel, dtype, offset, size, stride = entry
                args = (
                    self._pid(storage, dtype, kind, numel),
                    offset,
                    size,
                    stride,
                    obj.requires_grad,
                    _Hooks(),
                )
                return _rebuild_tensor_v2, args
        if tp is torch.Tensor:
            dtype = obj.dtype
            known = _CLASSES.get(dtype)
            if (
                known is not None
                and obj.is_cpu
                and obj.layout is _STRIDED
                and not obj.is_nested
                and not obj.__dict__
                and not obj._backward_hooks
                and not obj.is_neg()
                and not (known[2] and obj.is_conj())
            ):
                storage = obj.untyped_storage()
                args = (
                    self._pid(storage, dtype, known[0], storage.nbytes() // known[1]),
                    obj.storage_offset(),
                    self._shapes.setdefault(size := tuple(obj.size()), size),
                    self._shapes.setdefault(stride := obj.stride(), stride),
                    obj.requires_grad,
                    _Hooks(),
                )
                return _rebuild_tensor_v2, args
        elif tp is _Hooks:
            return _HOOKS_REDUCE
        elif tp is torch.nn.Parameter and not obj.__dict__:
            return _rebuild_parameter, (obj.detach(), obj.requires_grad, _Hooks())
        elif isinstance(obj, _STORAGE_TYPES):
            # Storages inside tensors become persistent ids before pickling reaches them:
            # this one is saved on its own, which torch.save pickles its own way.
            raise Unsupported("a storage object")
        elif not issubclass(tp, torch.Tensor):
            return NotImplemented
        if obj.device.type != "cpu":
            raise Unsupported(f"a {obj.device.type} tensor")
        # Any other tensor: torch's own reduction, its storages as persistent ids.
        reduced = obj.__reduce_ex__(PROTOCOL)
        if not isinstance(reduced, tuple):
            return NotImplemented
        return (reduced[0], self._storages_as_pids(reduced[1]), *reduced[2:])

    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if type(obj) is _Pid else None


_ARRAYS: dict[int, Any] = {}


def _view(storage: torch.UntypedStorage) -> Any:
    """The bytes of a CPU storage, without a copy (valid while ``storage`` lives)."""
    nbytes = storage.nbytes()
    if nbytes == 0:
        return b""
    array = _ARRAYS.get(nbytes)
    if array is None:
        if len(_ARRAYS) > 4096:
            _ARRAYS.clear()
        array = _ARRAYS[nbytes] = ctypes.c_char * nbytes
    return array.from_address(storage.data_ptr())


def _writev(f: Any, buffers: list[Any]) -> None:
    writev = getattr(f, "writev", None)
    if writev is not None:
        writev(buffers)
    else:
        for buf in buffers:
            f.write(buf)


def _alignment() -> int:
    get = getattr(torch.serialization, "_get_storage_alignment", None)
    return int(get()) if get is not None else 64


def save(obj: Any, f: Any) -> None:
    """Write ``obj`` to the binary file object ``f`` as ``torch.save(obj, f)`` would.

    Falls back to ``torch.save`` (before anything is written) for objects outside the
    fast path's reach. ``f`` may offer ``writev(buffers)``; otherwise ``write`` is used.
    """
    if torch.serialization._serialization_tls.skip_data or _alignment() != 64:
        # The archive is laid out with torch's default 64-byte record alignment.
        torch.save(obj, f)
        return
    data = io.BytesIO()
    pickler = ArchivePickler(data)
    try:
        pickler.dump(obj)
    except Unsupported:
        torch.save(obj, f)
        return
    storages = pickler.storages
    del pickler
    zipf = ZipStream()
    pending: list[Any] = []

    def record(name: str, payload: Any, nbytes: int) -> None:
        pending.append(zipf.add(name, nbytes))
        if nbytes:
            pending.append(payload)
        if len(pending) >= _IOV_BATCH:
            _writev(f, pending)
            pending.clear()

    pkl = data.getbuffer()
    record("data.pkl", pkl, pkl.nbytes)
    for name, text in (
        (".format_version", "1"),
        (".storage_alignment", str(_alignment())),
        ("byteorder", sys.byteorder),
    ):
        record(name, text.encode(), len(text))
    for key, storage in enumerate(storages):
        record(f"data/{key}", _view(storage), storage.nbytes())
    record("version", b"3\n", 2)
    serialization_id = f"{uuid.uuid4().int:040d}"[:40].encode()
    record(".data/serialization_id", serialization_id, len(serialization_id))
    _writev(f, pending)
    pkl.release()
    f.write(zipf.close())

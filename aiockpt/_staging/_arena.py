"""Host staging buffers: where a state dict's tensors are copied when a save is scheduled.

A buffer is an *arena*, one shared-memory region (a memfd on Linux) holding the storages of
one state dict back to back. Shared memory lets a persistent worker map the same pages (the
file descriptor is sent once, not the bytes), and a forked child inherits them. Arenas are
page-locked with ``cudaHostRegister`` when CUDA is present, so device-to-host copies run at
full speed. An arena is leased to one request until that request's worker has reported or
died; a later save with the same layout reuses it and allocates nothing.

Tensors are staged by *storage*, as ``torch.save`` writes them: every storage is copied
once, and each tensor becomes a view with its own offset, size and stride into the copy. So
tied weights stay tied, views that partly overlap still overlap, and a file is no larger
than ``torch.save`` would make it.
"""

from __future__ import annotations

import contextlib
import copy
import copyreg
import ctypes
import io
import itertools
import mmap
import os
import pickle
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ._scan import ALIGNMENT, PlanCache, Scan, StagingPlan, align, make_plan, plain_subclass
from ._tree import map_tensors

__all__ = ["ALIGNMENT", "StagedArgs", "StagingArena", "StagingBuffers", "StagingPlan", "make_plan"]
_layout_versions = itertools.count(1)
_SPLIT_COPY = 32 << 20  # storages from this size are copied by two threads


def _split_memmove(pool: ThreadPoolExecutor, dst: int, src: int, nbytes: int) -> None:
    """memmove on two threads (ctypes releases the GIL): the pool's thread copies the
    second half while this thread copies the first."""
    half = nbytes // 2 // mmap.PAGESIZE * mmap.PAGESIZE
    done = pool.submit(ctypes.memmove, dst + half, src + half, nbytes - half)
    try:
        ctypes.memmove(dst, src, half)
    finally:
        done.result()


# Linux 5.14+: populate (prefault, writable) the pages of a mapping; not named by mmap yet.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_arena_ids = itertools.count(1)


def cuda_available() -> bool:
    """True when this process can use CUDA; the only CUDA query on a CPU-only path."""
    return torch.cuda.is_available()


def ready_event() -> Any:
    """A CUDA event recorded now on the calling thread's current stream, or None when CUDA
    is not in use. Staging that runs in another thread waits for it, so its copies are
    ordered after the kernels the caller queued (its own current stream is another one)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return None
    return torch.cuda.current_stream().record_event()


def _cudart() -> Any:
    return torch.cuda.cudart()  # type: ignore[no-untyped-call]


def _anonymous_fd(nbytes: int) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("aiockpt-staging", os.MFD_CLOEXEC)
    else:  # macOS and friends: an unlinked temporary file
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    try:
        os.ftruncate(fd, nbytes)
        if hasattr(os, "posix_fallocate"):
            # Allocate the pages now, with the GIL released, instead of one fault at a time
            # in the first copy; also fails here, not mid-save, if shared memory runs out.
            os.posix_fallocate(fd, 0, nbytes)
    except BaseException:
        os.close(fd)
        raise
    return fd


class StagingArena:
    """One shared-memory region that holds the storages of one staged state dict."""

    def __init__(self, nbytes: int, *, pin: bool) -> None:
        self.id = next(_arena_ids)
        self.nbytes = max(nbytes, mmap.PAGESIZE)
        self.fd = _anonymous_fd(self.nbytes)
        try:
            self._mm = mmap.mmap(self.fd, self.nbytes)
        except BaseException:
            os.close(self.fd)
            raise
        # The tensors made by torch.frombuffer keep the mmap object alive; the mapping goes
        # away when the arena and every view of it are gone (mmap.close would not refuse).
        whole = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.base_ptr = whole.data_ptr()
        self.pinned = False
        if pin:
            err = _cudart().cudaHostRegister(self.base_ptr, self.nbytes, 0)
            self.pinned = int(err) == 0
            if not self.pinned:
                # A failed call leaves a sticky error that the next CUDA call would report.
                _cudart().cudaGetLastError()
        self.plan: StagingPlan | None = None
        self.layout_version = 0  # changes with the plan (a worker rebuilds its views then)
        self.slots: list[torch.Tensor] = []  # one uint8 tensor per storage slot
        self.views: list[torch.Tensor] = []  # one tensor per planned tensor
        self.view_index: dict[int, int] = {}  # id of a view -> its index in views
        # Objects handed out by the current lease that wrap a view (a Parameter, a tensor
        # that requires grad): id -> (object, view index); kept alive with the lease.
        self.wrapped: dict[int, tuple[torch.Tensor, int]] = {}
        self.owner: int | None = None

    def prefault(self) -> None:
        """Map every page of the arena into this process now (a reserve does this, so the
        first save's copy takes no page faults)."""
        try:
            self._mm.madvise(_MADV_POPULATE_WRITE)
        except (OSError, ValueError):  # older kernels: touch every page instead
            torch.frombuffer(self._mm, dtype=torch.uint8).zero_()

    def slot(self, offset: int, nbytes: int) -> torch.Tensor:
        """A uint8 tensor over ``[offset, offset + nbytes)`` whose storage is exactly that
        range, so ``torch.save`` writes only its bytes."""
        return torch.frombuffer(self._mm, dtype=torch.uint8, count=nbytes, offset=offset)

    def lay_out(self, plan: StagingPlan) -> None:
        """Build the slots and tensor views of ``plan`` (kept until the plan changes)."""
        if self.plan is plan:
            return
        self.slots = [self.slot(off, size) for off, size in plan.slots]
        self.views = build_views(self.slots, plan)
        self.view_index = {id(v): i for i, v in enumerate(self.views)}
        self.plan = plan
        self.layout_version = next(_layout_versions)

    def contains(self, ptr: int) -> int | None:
        """Offset of address ``ptr`` in this arena, or None if it lies outside."""
        offset = ptr - self.base_ptr
        return offset if 0 <= offset < self.nbytes else None

    def free(self) -> None:
        """Drop the arena: unpin, close the descriptor; the pages go with the last view."""
        if self.pinned:
            _cudart().cudaHostUnregister(self.base_ptr)
            self.pinned = False
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.views, self.slots, self.plan = [], [], None
        self.view_index, self.wrapped = {}, {}


def build_views(slots: list[torch.Tensor], plan: StagingPlan) -> list[torch.Tensor]:
    """The tensors of ``plan`` as views of ``slots`` (one uint8 tensor per storage)."""
    storages = [s.untyped_storage() for s in slots]
    return [
        torch.empty(0, dtype=dtype).set_(storages[slot], offset, size, stride)
        for slot, dtype, size, stride, offset in plan.tensors
    ]


Dressing = tuple[type, bool, bool, bool, Any]


def dressing(t: torch.Tensor) -> Dressing:
    """What ``t`` is beyond a plain view of its storage: its class, ``requires_grad``, its
    conjugate and negative bits, and its attributes (``torch.save`` keeps them all)."""
    return (
        type(t),
        t.requires_grad,
        t.dtype.is_complex and t.is_conj(),
        t.is_neg(),
        _attributes(t),
    )


def _attributes(t: torch.Tensor) -> Any:
    """``t``'s own attributes as they are (``__dict__`` and slots), None if it has none.
    Not ``__getstate__``: the staged tensor gets the same attributes, so pickling it
    calls the class's own ``__getstate__`` (or not) exactly as pickling ``t`` would, and
    no ``__setstate__`` of the user's runs while staging."""
    cls = type(t)
    names = () if cls is torch.Tensor or cls is torch.nn.Parameter else copyreg._slotnames(cls)  # type: ignore[attr-defined]
    slots = {n: getattr(t, n) for n in names if n != "__dict__" and hasattr(t, n)}
    own = t.__dict__
    if not own and not slots:
        return None
    return (dict(own), slots)


def dress(data: torch.Tensor, how: Dressing) -> torch.Tensor:
    """A new tensor object over ``data``'s storage (a plain view, not modified) dressed as
    ``how`` says; ``how[4]``, the attributes, is used as given (pass a copy)."""
    cls, requires_grad, conj, neg, state = how
    if conj:
        data = data.conj()
    if neg:
        data = torch._neg_view(data)
    if cls is torch.Tensor:
        out = data.detach().requires_grad_(True) if requires_grad else data.detach()
    else:
        # A Parameter, or a subclass: made as Parameter.__new__ makes one, without calling
        # the subclass's own __new__ or __init__ (torch.load does not call them either).
        out = torch.Tensor._make_subclass(cls, data, requires_grad)
    if state:
        own, slots = state
        out.__dict__.update(own)
        for name, value in slots.items():
            object.__setattr__(out, name, value)
    return out


def copied(how: Dressing) -> Dressing:
    """``how`` with a copy of its attributes, taken now (tensors among them snapshotted),
    so that a change the caller makes later does not reach the checkpoint."""
    state = how[4]
    return (*how[:4], map_tensors(state, snapshot, _copy_value) if state else None)


def _copy_value(obj: Any) -> Any:
    """A copy of ``obj`` taken now, as pickling (what ``torch.save`` does) sees it: a
    pickle round trip, else a ``torch.save`` one, else ``copy.deepcopy``."""
    if isinstance(obj, _ATOMIC):
        return obj
    try:
        return pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:
        pass
    try:
        return _round_trip(obj)
    except Exception:
        return copy.deepcopy(obj)


def _round_trip(obj: Any, map_location: str | None = None) -> Any:
    """``obj`` as a ``torch.save``/``torch.load`` round trip gives it back."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, map_location=map_location, weights_only=False)


def _storage_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s storage, 0 when it has none of its own (meta, sparse, lazy)."""
    if t.is_meta or t.layout is not torch.strided:
        return 0
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, ValueError):
        return 0


def snapshot(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a tensor the arena does not hold, taken now, as ``torch.save`` would
    keep it: an empty tensor keeps its shape, strides, class and attributes; sparse,
    quantized, nested and wrapper-subclass tensors go through ``torch.save`` itself."""
    if t.is_meta:
        return t
    if (
        t.layout is torch.strided
        and not t.is_quantized
        and not t.is_nested
        and (type(t) in (torch.Tensor, torch.nn.Parameter) or plain_subclass(type(t)))
    ) and t.untyped_storage().nbytes() == 0:
        data = torch.empty(0, dtype=t.dtype).set_(
            torch.UntypedStorage(0),  # type: ignore[no-untyped-call]
            t.storage_offset(),
            t.shape,
            t.stride(),
        )
        return dress(data, copied(dressing(t)))
    out: torch.Tensor = _round_trip(t, map_location="cpu")
    return out


_ATOMIC = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device)


class _Discard:
    """A file that drops what is written to it (a dry-run pickle's sink)."""

    def write(self, data: bytes) -> int:
        return len(data)


def _numpy_view(obj: Any) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(obj, numpy.ndarray) and not obj.flags.owndata


def _holds_shared_storage(obj: Any) -> bool:
    """Whether pickling ``obj`` meets memory a fork may not snapshot: a storage in shared
    memory, or one torch did not allocate (not resizable: over a numpy array, an mmap,
    a ``SharedMemory`` block), or a numpy view. True too if the dry run cannot tell."""
    found = False

    class Finder(pickle.Pickler):
        def persistent_id(self, o: Any) -> Any:
            nonlocal found
            if _numpy_view(o):  # a view of memory it does not own: maybe shared
                found = True
                return id(o)
            if isinstance(o, torch.UntypedStorage | torch.TypedStorage):
                storage = o if isinstance(o, torch.UntypedStorage) else o._untyped_storage
                if storage.device.type == "cpu" and (
                    storage.is_shared() or not storage.resizable()
                ):
                    found = True
                return id(o)  # written as a reference: the bytes are not copied
            return None

    try:
        Finder(_Discard(), protocol=2).dump(obj)  # torch.save's protocol
    except Exception:
        return True  # cannot tell: copy it if it can be copied
    return found


def _unshared(obj: Any) -> Any:
    """An object the walk does not open, for a forked worker: copied now when it holds a
    tensor in shared memory (``share_memory_()``, a DataLoader worker's batch) or a numpy
    array over memory it does not own (which may be shared), which a fork does not
    snapshot; returned as it is otherwise (the fork's copy-on-write does)."""
    if isinstance(obj, _ATOMIC) or not _holds_shared_storage(obj):
        return obj
    try:
        return _copy_value(obj)
    except Exception:
        return obj  # torch.save in the worker says what cannot be pickled


@dataclass
class StagedArgs:
    """The arguments of a request with their tensors copied to host buffers."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    nbytes: int
    arena: StagingArena | None


class StagingBuffers:
    """A pool of at most ``max_copies`` arenas, reused across saves.

    ``stage`` copies every storage found in a request's arguments into a free arena and
    leases it to the request; ``release`` gives it back once the worker is done with it.
    With ``max_copies=1`` (the default) the host holds one staging copy of the state at most.
    """

    # Room added when an arena must grow, so that a state dict growing a little at a time
    # does not reallocate (and re-pin) at every save.
    GROWTH_HEADROOM = 0.125

    def __init__(
        self, max_copies: int = 1, pin_memory: bool | None = None, single_threaded: bool = False
    ) -> None:
        if max_copies < 1:
            raise ValueError("max_copies must be at least 1")
        self.max_copies = max_copies
        # One core for host-to-host copies (plain memmove, GIL released) instead of torch's
        # intra-op threads: a little slower, but leaves the other cores to the caller's
        # event loop and training. The async facade stages this way.
        self.single_threaded = single_threaded
        self._pin = cuda_available() if pin_memory is None else pin_memory
        self._arenas: list[StagingArena] = []
        self._lock = threading.Lock()
        self._plans = PlanCache()
        self._pool: ThreadPoolExecutor | None = None  # the helper of large copies
        self.allocations = 0  # arenas created so far: a warm save does not add one

    def _copy_pool(self) -> ThreadPoolExecutor | None:
        """The thread that copies half of each large storage (None: copy on one thread);
        it lives until :meth:`close`."""
        if self.single_threaded or (os.cpu_count() or 1) < 2:
            return None
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="aiockpt-copy")
            return self._pool

    @property
    def arenas(self) -> list[StagingArena]:
        return list(self._arenas)

    def has_free(self, nbytes: int) -> bool:
        """Whether ``stage`` for ``nbytes`` can proceed without waiting for a release."""
        with self._lock:
            free = [a for a in self._arenas if a.owner is None]
            return nbytes == 0 or bool(free) or len(self._arenas) < self.max_copies

    def leased(self) -> list[int]:
        """Owners of the arenas leased now."""
        with self._lock:
            return [a.owner for a in self._arenas if a.owner is not None]

    def plan(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Scan:
        """Scan ``args``/``kwargs``: the staging plan of their tensors (the previous plan
        object while the layout is unchanged) and what copying them needs."""
        return self._plans.scan((args, kwargs))

    def reserve(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Allocate (and lay out) a free arena for these arguments ahead of the first save,
        so that save copies into memory that is already there."""
        plan = self.plan(args, kwargs).plan
        if plan.nbytes == 0:
            return
        with self._lock:
            arena = self._pick(plan, grow=False)
            arena.lay_out(plan)
            arena.prefault()

    def stage(
        self,
        owner: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        scan: Scan | None = None,
        snapshot_leaves: bool = False,
    ) -> StagedArgs:
        """Copy the tensors of ``args``/``kwargs`` into a free arena leased to ``owner``.

        ``scan`` is :meth:`plan`'s result for these arguments, if already taken. With
        ``snapshot_leaves`` (a forked worker), objects the walk does not open are copied
        when they hold tensors in shared memory. Raises ``LookupError`` when every arena
        is leased (release one, then call again).
        """
        scan = scan if scan is not None else self.plan(args, kwargs)
        arena = None
        if scan.nbytes:
            with self._lock:
                arena = self._pick(scan.plan, grow=True)
                arena.owner = owner
        try:
            return self._copy(arena, scan, args, kwargs, snapshot_leaves)
        except BaseException:
            if arena is not None:
                self.release(owner)
            raise

    def _pick(self, plan: StagingPlan, grow: bool) -> StagingArena:
        free = [a for a in self._arenas if a.owner is None]
        fitting = [a for a in free if a.nbytes >= plan.nbytes]
        # Prefer the arena that already holds this layout: its views are reused as-is.
        fitting.sort(key=lambda a: (a.plan is not plan, a.nbytes))
        if fitting:
            return fitting[0]
        if not free and len(self._arenas) >= self.max_copies:
            raise LookupError("every staging buffer is leased")
        nbytes = plan.nbytes
        if free:  # too small: replace it rather than hold two copies
            self._drop(free[0])
            if grow:
                nbytes = align(int(nbytes * (1 + self.GROWTH_HEADROOM)))
        arena = StagingArena(nbytes, pin=self._pin)
        self._arenas.append(arena)
        self.allocations += 1
        return arena

    def _copy(
        self,
        arena: StagingArena | None,
        scan: Scan,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        snapshot_leaves: bool,
    ) -> StagedArgs:
        devices: set[torch.device] = set()
        nbytes = 0
        views: list[torch.Tensor] = []
        if arena is not None:
            arena.lay_out(scan.plan)
            arena.wrapped = {}
            views = arena.views
            slots = scan.plan.slots
            base = arena.base_ptr
            memmove = ctypes.memmove
            for slot, src in enumerate(scan.sources):
                offset, size = slots[slot]
                nbytes += size
                if src.is_cpu:
                    # memmove: no per-call dispatch, and no intra-op threads, whose
                    # spin-waits stall the copy on a busy machine. Large storages are
                    # split with one helper thread unless staging is single-threaded.
                    if size >= _SPLIT_COPY and (pool := self._copy_pool()) is not None:
                        _split_memmove(pool, base + offset, scan.pointers[slot], size)
                    else:
                        memmove(base + offset, scan.pointers[slot], size)
                else:
                    self._copy_storage(src, arena.slots[slot], arena.pinned)
                    if src.is_cuda:
                        devices.add(src.device)
        staged: dict[int, torch.Tensor] = {}
        positions = iter(scan.index)
        dressed = scan.dressed

        def copy_one(t: torch.Tensor) -> torch.Tensor:
            nonlocal nbytes
            index = next(positions)
            done = staged.get(id(t))
            if done is not None:
                return done
            if index >= 0:
                dst = views[index]
                if index in dressed:
                    dst = dress(dst, copied(dressing(t)))
                    arena.wrapped[id(dst)] = (dst, index)  # type: ignore[union-attr]
            else:
                dst = snapshot(t)
                nbytes += _storage_bytes(dst)
                if t.is_cuda:
                    devices.add(t.device)
            staged[id(t)] = dst
            return dst

        leaf = _unshared if snapshot_leaves else None
        new_args, new_kwargs = map_tensors((tuple(args), dict(kwargs)), copy_one, leaf)
        for device in devices:
            torch.cuda.synchronize(device)
        return StagedArgs(new_args, new_kwargs, nbytes, arena)

    def _copy_storage(self, t: torch.Tensor, dst: torch.Tensor, pinned: bool) -> int:
        storage = t.untyped_storage()
        src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
        dst.copy_(src, non_blocking=pinned and t.is_cuda)
        return storage.nbytes()

    def reference(self, t: torch.Tensor) -> tuple[int, int, Dressing | None] | None:
        """``(arena id, view index, dressing)`` of a tensor that :meth:`stage` handed out
        as an arena view (dressing None) or dressed one (see :func:`dress`), else None."""
        key = id(t)
        for arena in self._arenas:
            index = arena.view_index.get(key)
            if index is not None:
                return arena.id, index, None
            wrapped = arena.wrapped.get(key)
            if wrapped is not None and wrapped[0] is t:
                return arena.id, wrapped[1], dressing(t)
        return None

    def release(self, owner: int) -> None:
        """Give back the arena leased to ``owner`` (no-op if it holds none)."""
        with self._lock:
            for arena in self._arenas:
                if arena.owner == owner:
                    arena.owner = None

    def locate(self, t: torch.Tensor) -> tuple[int, int, int] | None:
        """``(arena id, slot offset, slot nbytes)`` of a staged tensor's storage, or None
        if its storage does not live in an arena."""
        if t.device.type != "cpu" or t.layout != torch.strided or t.is_nested or t.is_quantized:
            return None
        try:
            storage = t.untyped_storage()
        except (RuntimeError, ValueError):  # no storage of its own (a lazy parameter)
            return None
        size = storage.nbytes()
        if size == 0:
            return None
        for arena in self._arenas:
            offset = arena.contains(storage.data_ptr())
            if offset is not None:
                return arena.id, offset, size
        return None

    def _drop(self, arena: StagingArena) -> None:
        self._arenas.remove(arena)
        arena.free()

    def close(self) -> None:
        """Free every arena (leased or not) and stop the copy helper thread: call only when
        no worker reads them any more."""
        with self._lock:
            for arena in list(self._arenas):
                with contextlib.suppress(Exception):
                    self._drop(arena)
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

"""Host staging buffers: where a state dict's tensors are copied when a save is scheduled.

A buffer is an *arena*, one shared-memory region (a memfd on Linux) holding every tensor of
one state dict back to back. Shared memory lets a persistent worker map the same pages (the
file descriptor is sent once, not the bytes), and a forked child inherits them. Arenas are
page-locked with ``cudaHostRegister`` when CUDA is present, so device-to-host copies run at
full speed. An arena is leased to one request until that request's worker has finished with
it; a later save with the same layout reuses it and allocates nothing.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

import torch

from ._tree import iter_tensors, map_tensors

ALIGNMENT = 64
_arena_ids = itertools.count(1)


def cuda_available() -> bool:
    """True when this process can use CUDA; the only CUDA query on a CPU-only path."""
    return torch.cuda.is_available()


def _cudart() -> Any:
    return torch.cuda.cudart()  # type: ignore[no-untyped-call]


def arena_stageable(t: torch.Tensor) -> bool:
    """Plain dense tensors go to an arena; sparse, quantized and meta tensors are cloned."""
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.layout == torch.strided
        and not t.is_quantized
        and t.device.type != "meta"
    )


def _memmove_ok(src: torch.Tensor, dst: torch.Tensor) -> bool:
    return (
        src.device.type == "cpu"
        and src.dtype == dst.dtype
        and src.is_contiguous()
        and src.numel() > 0
        and not src.is_conj()
        and not src.is_neg()
    )


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _anonymous_fd(nbytes: int) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("aiockpt-staging", os.MFD_CLOEXEC)
    else:  # macOS and friends: an unlinked temporary file
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, nbytes)
    if hasattr(os, "posix_fallocate"):
        # Allocate the pages now, with the GIL released, instead of one fault at a time in
        # the first copy; also fails here, not mid-save, if shared memory is exhausted.
        os.posix_fallocate(fd, 0, nbytes)
    return fd


class StagingArena:
    """One shared-memory region that holds the tensors of one staged state dict."""

    def __init__(self, nbytes: int, *, pin: bool) -> None:
        self.id = next(_arena_ids)
        self.nbytes = max(nbytes, mmap.PAGESIZE)
        self.fd = _anonymous_fd(self.nbytes)
        self._mm = mmap.mmap(self.fd, self.nbytes)
        # The tensors made by torch.frombuffer keep the mmap object alive; the mapping goes
        # away when the arena and every view of it are gone (mmap.close would not refuse).
        whole = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.base_ptr = whole.data_ptr()
        self.pinned = False
        if pin:
            err = _cudart().cudaHostRegister(self.base_ptr, self.nbytes, 0)
            self.pinned = int(err) == 0
        self.layout: tuple[Any, ...] | None = None
        self.views: list[torch.Tensor] = []
        self.owner: int | None = None

    def view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor over ``[offset, offset + nbytes)`` with its own storage of exactly that
        size, so ``torch.save`` writes only its bytes."""
        count = 1
        for dim in shape:
            count *= dim
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._mm, dtype=dtype, count=count, offset=offset).view(shape)

    def offset_of(self, t: torch.Tensor) -> int | None:
        """Where ``t`` starts in this arena, or None if it does not live here."""
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            return None
        offset = t.data_ptr() - self.base_ptr
        return offset if 0 <= offset < self.nbytes else None

    def free(self) -> None:
        """Drop the arena: unpin, close the descriptor; the pages go with the last view."""
        if self.pinned:
            _cudart().cudaHostUnregister(self.base_ptr)
            self.pinned = False
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.views = []
        self.layout = None


@dataclass
class StagedArgs:
    """The arguments of a request with their tensors copied to host buffers."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    nbytes: int
    arena: StagingArena | None


class StagingBuffers:
    """A pool of at most ``max_copies`` arenas, reused across saves.

    ``stage`` copies every tensor found in a request's arguments into a free arena and
    leases it to the request; ``release`` gives it back once the worker is done with it.
    With ``max_copies=1`` (the default) the host holds one staging copy of the state at most.
    """

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
        self.allocations = 0  # arenas created so far: a warm save does not add one
        self.dropped: list[int] = []  # ids of arenas freed since the last look (workers unmap them)

    @property
    def arenas(self) -> list[StagingArena]:
        return list(self._arenas)

    def has_free(self, nbytes: int) -> bool:
        """Whether ``stage`` for ``nbytes`` can proceed without waiting for a release."""
        with self._lock:
            free = [a for a in self._arenas if a.owner is None]
            return bool(free) or len(self._arenas) < self.max_copies or nbytes == 0

    @staticmethod
    def plan(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], int]:
        """The layout key and byte size of the arena the tensors in ``args``/``kwargs`` need."""
        seen: set[int] = set()
        layout: list[Any] = []
        nbytes = 0
        for t in iter_tensors((args, kwargs)):
            if id(t) in seen or not arena_stageable(t):
                continue
            seen.add(id(t))
            layout.append((t.dtype, tuple(t.shape)))
            nbytes += _align(t.numel() * t.element_size())
        return tuple(layout), nbytes

    def stage(self, owner: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> StagedArgs:
        """Copy the tensors of ``args``/``kwargs`` into a free arena leased to ``owner``.

        Raises ``LookupError`` when every arena is leased (release one, then call again).
        """
        layout, nbytes = self.plan(args, kwargs)
        arena = self._acquire(owner, layout, nbytes) if layout else None
        try:
            return self._copy(arena, layout, args, kwargs)
        except BaseException:
            if arena is not None:
                self.release(owner)
            raise

    def _acquire(self, owner: int, layout: tuple[Any, ...], nbytes: int) -> StagingArena:
        with self._lock:
            free = [a for a in self._arenas if a.owner is None]
            fitting = [a for a in free if a.nbytes >= nbytes]
            # Prefer the arena that already holds this layout: its views are reused as-is.
            fitting.sort(key=lambda a: (a.layout != layout, a.nbytes))
            if fitting:
                arena = fitting[0]
            elif free or len(self._arenas) < self.max_copies:
                if free:  # too small: replace it rather than hold two copies
                    self._drop(free[0])
                arena = StagingArena(nbytes, pin=self._pin)
                self._arenas.append(arena)
                self.allocations += 1
            else:
                raise LookupError("every staging buffer is leased")
            arena.owner = owner
            return arena

    def _copy(
        self,
        arena: StagingArena | None,
        layout: tuple[Any, ...],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> StagedArgs:
        if arena is not None and arena.layout != layout:
            arena.views, offset = [], 0
            for dtype, shape in layout:
                arena.views.append(arena.view(offset, dtype, shape))
                size = 1
                for dim in shape:
                    size *= dim
                offset += _align(size * torch.empty((), dtype=dtype).element_size())
            arena.layout = layout
        views = iter(arena.views if arena is not None else ())
        staged: dict[int, torch.Tensor] = {}
        devices: set[torch.device] = set()
        nbytes = 0

        def copy_one(t: torch.Tensor) -> torch.Tensor:
            nonlocal nbytes
            if id(t) in staged:  # tied weights stay tied
                return staged[id(t)]
            src = t.detach()
            if arena_stageable(t):
                dst = next(views)
                if self.single_threaded and _memmove_ok(src, dst):
                    ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size())
                else:
                    dst.copy_(src, non_blocking=bool(arena and arena.pinned and src.is_cuda))
            else:
                dst = src.to("cpu", copy=True)
            if src.is_cuda:
                devices.add(src.device)
            nbytes += dst.numel() * dst.element_size()
            staged[id(t)] = dst
            return dst

        new_args, new_kwargs = map_tensors((tuple(args), dict(kwargs)), copy_one)
        for device in devices:
            torch.cuda.synchronize(device)
        return StagedArgs(new_args, new_kwargs, nbytes, arena)

    def release(self, owner: int) -> None:
        """Give back the arena leased to ``owner`` (no-op if it holds none)."""
        with self._lock:
            for arena in self._arenas:
                if arena.owner == owner:
                    arena.owner = None

    def locate(self, t: torch.Tensor) -> tuple[int, int] | None:
        """``(arena id, offset)`` of a staged tensor, or None if ``t`` is not in an arena."""
        for arena in self._arenas:
            offset = arena.offset_of(t)
            if offset is not None:
                return arena.id, offset
        return None

    def _drop(self, arena: StagingArena) -> None:
        self._arenas.remove(arena)
        self.dropped.append(arena.id)
        arena.free()

    def close(self) -> None:
        """Free every arena (leased or not): call only when no worker reads them any more."""
        with self._lock:
            for arena in list(self._arenas):
                self._drop(arena)

"""``TorchCheckpoint``: ``torch.save`` in the background, behind the blocking queue
(NVRx's name for it: ``TorchAsyncCheckpoint``)."""

from __future__ import annotations

import os
from typing import Any

import torch
from typing_extensions import Unpack

from ._exceptions import InvalidRequestError
from ._options import QueueFacadeKeywords
from ._queue import CheckpointQueue
from ._request import AsyncRequest
from ._sharded import sharded_request
from ._tracebacks import releasing
from .storage._files import local_path
from .storage._local import save_file
from .utils import wrap_for_async

# The worker's function for single-file saves: atomic, fsync'd, checksummed torch.save.
save_file_async = wrap_for_async(save_file)


# torch.save's parameters after (obj, f), for arguments passed by position.
_TORCH_SAVE_ARGS = (
    "pickle_module",
    "pickle_protocol",
    "_use_new_zipfile_serialization",
    "_disable_byteorder_record",
)


def checked_path(f: Any) -> str:
    """``f`` as a path string, refused at the call if it cannot be written from a worker."""
    if not isinstance(f, str | os.PathLike):
        raise InvalidRequestError(
            f"async saves write from another process and need a file path, not "
            f"{type(f).__name__}; use torch.save for in-memory buffers"
        )
    path = os.fspath(f)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    local_path(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InvalidRequestError(
            f"cannot save to {path!r}: directory {parent!r} does not exist; create it first"
        )
    return path


class TorchCheckpoint:
    """``torch.save`` that returns as soon as the tensors are staged; the blocking twin of
    :class:`AsyncTorchCheckpoint` (whose ``save`` is awaited).

    ``async_save(state_dict, path, **torch_save_kwargs)`` has ``torch.save``'s signature;
    the file it writes loads with ``torch.load``. It is written under a temporary name,
    fsync'd and renamed, so ``path`` holds either the previous file or the new one.
    Call ``finalize_async_save`` regularly (``blocking=False`` each step) and
    ``finalize_async_save(blocking=True)`` at the end.
    One persistent worker process serves every save (it starts at the first save, or at
    :meth:`reserve`); ``persistent=False`` forks a process per save instead
    (``persistent_queue=``, NVRx's keyword, is the same). ``queue_options`` are
    :class:`QueueOptions`' keywords. After
    ``finalize_async_save(terminate=True)`` or :meth:`close` the next save starts a
    fresh worker.
    """

    def __init__(
        self,
        persistent: bool = True,
        *,
        persistent_queue: bool | None = None,
        **queue_options: Unpack[QueueFacadeKeywords],
    ) -> None:
        if persistent_queue is not None:
            persistent = persistent_queue
        self._queue = CheckpointQueue(persistent, **queue_options)

    @property
    def queue(self) -> CheckpointQueue:
        """The :class:`CheckpointQueue` that runs the saves (for custom requests beside
        them, or its :attr:`~CheckpointQueue.staging_buffers`)."""
        return self._queue

    @releasing
    def reserve(self, state_dict: Any) -> None:
        """Prepare for saving state dicts shaped like ``state_dict``: allocate the staging
        memory and wait for the persistent worker to start, so the first ``async_save``
        is as fast as later ones. Optional; call it before the training loop.

        Args:
            state_dict: a state dict with the shapes and dtypes of those you will save
                (its values are not read).

        Raises:
            StagingError: the staging memory could not be allocated.
            WorkerCrashedError: the worker could not start (its stderr says why).
        """
        self._queue.reserve(state_dict)

    def save(self, obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        """``torch.save(obj, f, ...)`` now, in this process. A path is written atomically
        (temporary name, fsync, rename, with a checksum trailer, like ``async_save``); a
        file object is handed to ``torch.save`` as is."""
        if isinstance(f, str | os.PathLike):
            kwargs.update(zip(_TORCH_SAVE_ARGS, args, strict=False))
            save_file(obj, checked_path(f), **kwargs)
        else:
            torch.save(obj, f, *args, **kwargs)

    @releasing
    def async_save(self, state_dict: Any, *args: Any, **kwargs: Any) -> int:
        """Schedule ``torch.save(state_dict, *args, **kwargs)`` in the worker; return once
        the tensors are staged (copied to host buffers): they may change from then on.

        Args:
            state_dict: what to save; tensors anywhere in it are staged, other values
                pickled as they are.
            *args: ``torch.save``'s arguments after the object: the path first (its
                directory must exist), then ``pickle_module`` and so on.
            **kwargs: ``torch.save``'s keyword arguments.

        Returns:
            The call index, which ``finalize_async_save`` returns once the file is
            durable.

        Raises:
            InvalidRequestError: no path, or its directory does not exist (nothing is
                scheduled).
            StagingError: copying a tensor failed (nothing is written).
            QueueBrokenError: an earlier failure left the queue unusable.

        Example:
            ```python
            ckpt = TorchCheckpoint()
            ckpt.async_save(model.state_dict(), "step100.pt")
            ckpt.finalize_async_save(blocking=True, terminate=True)
            ```
        """
        if not args:
            raise InvalidRequestError("async_save needs a path to save to: async_save(sd, path)")
        path = checked_path(args[0])
        request = AsyncRequest(save_file_async, (state_dict, path, *args[1:]), [], kwargs)
        return self._queue.schedule_async_request(request)

    @releasing
    def async_save_sharded(
        self, state_dict: Any, directory: Any, extra: dict[str, Any] | None = None
    ) -> int:
        """Schedule this rank's part of a sharded checkpoint in ``directory`` (call it on
        every rank). Rank 0 writes ``metadata.json`` (with ``extra``) once every rank's file
        is durable; that happens in ``finalize_async_save``, which settles this request
        across all ranks whatever its ``no_dist``."""
        request = sharded_request(state_dict, directory, extra, self._queue.completion)
        return self._queue.schedule_async_request(request, needs_global=True)

    def finalize_async_save(
        self, blocking: bool = False, no_dist: bool = True, terminate: bool = False
    ) -> list[int]:
        """Finalize finished saves (all of them with ``blocking=True``); return their call
        indices. ``terminate=True`` then stops the worker.

        Args:
            blocking: wait for every save in flight (at the end of training); ``False``
                (each step) never waits for a worker.
            no_dist: settle each save on this rank alone; ``False`` agrees on completion
                with every rank (one small collective per call).
            terminate: stop the worker afterwards (the next save starts a fresh one).

        Returns:
            The call indices finalized by this call, oldest first.

        Raises:
            CheckpointError: a save failed (:class:`WorkerError`,
                :class:`WorkerCrashedError`, :class:`SaveTimeoutError`,
                :class:`DistributedCheckpointError`, ...), naming the call, the rank and
                the cause. Saves finalized before it are in ``err.finalized_call_idxs``;
                later ones stay queued.
        """
        try:
            return self._queue.maybe_finalize_async_calls(blocking, no_dist=no_dist)
        finally:
            if terminate:
                self._queue.close(no_dist=no_dist)

    def close(self, abort: bool = False) -> None:
        """Finalize pending saves and stop the worker. Idempotent. ``abort=True`` stops
        the worker at once and drops pending saves (see :meth:`CheckpointQueue.close`)."""
        self._queue.close(abort, no_dist=True)


class TorchAsyncCheckpoint(TorchCheckpoint):
    """NVRx's name and signature for :class:`TorchCheckpoint` (``persistent_queue`` first):
    ``nvidia_resiliency_ext.checkpointing.async_ckpt.torch_ckpt.TorchAsyncCheckpoint``.
    ``save`` writes synchronously, ``async_save`` in the background, as in NVRx."""

    def __init__(
        self, persistent_queue: bool = True, **queue_options: Unpack[QueueFacadeKeywords]
    ) -> None:
        super().__init__(persistent_queue, **queue_options)

    def _get_async_calls_queue(self) -> CheckpointQueue:
        """The queue that runs the saves (NVRx's name, for its unit tests of in-process
        restarts); :attr:`queue` is the public name."""
        return self._queue

"""The blocking queue, :class:`CheckpointQueue`: NVRx's ``AsyncCallsQueue`` (same class,
same signature), whose finalize calls wait or poll instead of being awaited."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, ClassVar

from typing_extensions import Unpack

from ._core._callers import AsyncCaller
from ._core._engine import CallsEngine
from ._core._persistent import PersistentAsyncCaller
from ._dist import CompletionGroup
from ._exceptions import CheckpointError
from ._options import ExtraQueueKeywords, QueueOptions, build_options
from ._request import AsyncRequest, as_request
from ._tracebacks import releasing

logger = logging.getLogger("aiockpt")


class CheckpointQueue:
    """Schedules :class:`AsyncRequest` objects and finalizes them in FIFO order; the
    blocking twin of :class:`AsyncCheckpointQueue`. ``AsyncCallsQueue``, NVRx's name, is
    this class.

    Args:
        persistent: one long-lived worker process (True, the default) or a forked process
            per request (False). The worker starts at the first request, or earlier with
            :meth:`warm_up`, :meth:`reserve` or :meth:`warmup_persistent_caller`.
        is_daemon: accepted for compatibility with the reference and ignored (see
            :class:`QueueOptions`).
        cpu_priority: the nice value (0-19) the worker raises itself to; the default, 10,
            is the reference's. None leaves it unchanged.
        io_priority: the I/O scheduling class the worker sets for itself (1 realtime,
            2 best-effort, 3 idle); 0 or None leaves it unchanged.
        sigterm_timeout: seconds a worker that must stop gets after SIGTERM before SIGKILL.
        cpu_shm_mode: accepted for compatibility with the reference; changes nothing.
        options: a whole :class:`QueueOptions` instead of keywords (then pass none).
        **keywords: the other fields of :class:`QueueOptions` (``start_method``,
            ``max_staging_copies``, ``save_timeout``, ``start_timeout``, ...).

    In a torch.distributed job every rank must schedule the same requests and call
    ``maybe_finalize_async_calls`` with ``no_dist=False`` the same number of times.
    After :meth:`close` (or an abort) the queue can be used again: the next request
    starts a fresh worker and call indices start again from 0, as in the reference.
    """

    _instances: ClassVar[weakref.WeakSet[CheckpointQueue]] = weakref.WeakSet()
    _warm_caller: ClassVar[PersistentAsyncCaller | None] = None

    def __init__(
        self,
        persistent: bool = True,
        is_daemon: bool = True,
        cpu_priority: int | None = 10,
        io_priority: int | None = None,
        sigterm_timeout: float = 30.0,
        cpu_shm_mode: bool = False,
        *,
        options: QueueOptions | None = None,
        **keywords: Unpack[ExtraQueueKeywords],
    ) -> None:
        if options is None:
            options = QueueOptions(
                persistent,
                is_daemon=is_daemon,
                cpu_priority=cpu_priority,
                io_priority=io_priority,
                sigterm_timeout=sigterm_timeout,
                cpu_shm_mode=cpu_shm_mode,
                **keywords,  # type: ignore[arg-type]  # a timeout in seconds is converted
            )
        else:
            options = build_options(persistent, options, keywords)
        self._engine = CallsEngine(options=options)
        # One thread finalizes at a time, so requests finalize in order and each failure is
        # raised once; a non-blocking poll that finds another thread finalizing returns.
        self._finalizing = threading.Lock()
        CheckpointQueue._instances.add(self)

    @classmethod
    def get_instances(cls) -> list[CheckpointQueue]:
        """The queues alive in this process (what :func:`abort_nvrx_checkpoint` aborts)."""
        return list(cls._instances)

    @classmethod
    def warmup_persistent_caller(
        cls,
        rank: int,
        is_daemon: bool = True,
        cpu_priority: int | None = 10,
        io_priority: int | None = None,
        sigterm_timeout: float = 30.0,
        cpu_shm_mode: bool = False,
    ) -> None:
        """Start a persistent worker now, for the first persistent queue of this process
        to take over at its first request, so the first save does not wait for the worker
        to import torch. Call it from the training script's main code (under
        ``if __name__ == "__main__":``), never at module level. ``rank`` is accepted for
        compatibility with the reference; the options are those of :class:`QueueOptions`.
        """
        if cls._warm_caller is None:
            opts = QueueOptions(
                is_daemon=is_daemon,
                cpu_priority=cpu_priority,
                io_priority=io_priority,
                sigterm_timeout=sigterm_timeout,
                cpu_shm_mode=cpu_shm_mode,
            )
            caller = PersistentAsyncCaller(opts.start_method, settings=opts.worker_settings())
            caller.start()
            cls._warm_caller = caller

    def _open_engine(self) -> CallsEngine:
        """The engine, a fresh one if the last was closed or aborted; a persistent queue
        whose worker has not started takes over a worker warmed up for the process."""
        engine = self._engine
        if engine.closed:
            engine = self._engine = CallsEngine(
                options=engine.options, completion=engine.completion
            )
        warm = CheckpointQueue._warm_caller
        if warm is not None and engine.adopt_worker(warm):
            CheckpointQueue._warm_caller = None
        return engine

    def _get_async_caller(self) -> AsyncCaller:
        """The caller that runs this queue's next request (NVRx's name, for its unit tests
        of in-process restarts): the queue's persistent caller (one that was warmed up
        for the process, if the queue has not started its own; after :meth:`close` or an
        abort, the fresh one the next request will use), or, for a fork-per-request
        queue, a new :class:`TemporalAsyncCaller` that has not forked. Ask it
        ``_debug_is_async_process_running()``."""
        engine = self._open_engine()
        return engine.next_caller()

    def warm_up(self) -> None:
        """Start the persistent worker now rather than at the first request. Optional."""
        self._open_engine().warm_up()

    @property
    def options(self) -> QueueOptions:
        """The options the queue was made with."""
        return self._engine.options

    @property
    def completion(self) -> CompletionGroup:
        """The group this queue's requests settle over: a finalize step that must agree
        across ranks (a commit) reduces over it, in step with the queue."""
        return self._engine.completion

    @property
    def persistent(self) -> bool:
        """Whether one long-lived worker serves every request (else a fork per request)."""
        return self._engine.persistent

    @property
    def call_idx(self) -> int:
        """Index of the last scheduled request (-1 before the first)."""
        return self._engine.call_idx

    @property
    def staging_buffers(self) -> Any:
        """The :class:`StagingBuffers` this queue copies tensors into."""
        return self._engine.buffers

    @releasing
    def reserve(self, state_dict: Any) -> None:
        """Prepare staging memory for saves of ``state_dict`` (and wait for the persistent
        worker to start), so the first save is as fast as a warm one. Optional."""
        self._open_engine().reserve((state_dict,))

    @releasing
    def schedule_async_request(
        self, async_request: AsyncRequest | Any, *, needs_global: bool = False
    ) -> int:
        """Stage the request's tensors, start it in the background, return its call index.

        Returns once every tensor in the request's arguments is copied to host staging
        buffers: the caller may modify its tensors from then on.
        Another library's ``AsyncRequest`` (the reference's) is accepted by its fields.

        Args:
            async_request: what to run: ``async_fn(*async_fn_args, **async_fn_kwargs)``
                in the worker, then ``finalize_fns`` here, in order, once it succeeded.
            needs_global: settle the request across all ranks even when finalizing with
                ``no_dist=True`` (for requests whose finalize steps commit shared state).

        Returns:
            The request's call index (0, 1, 2, ... in scheduling order).

        Raises:
            InvalidRequestError: a malformed request; nothing is scheduled.
            StagingError: copying a tensor failed; nothing is written (the call index
                is used up all the same, on every rank alike).
            QueueBrokenError: an earlier failure left the queue unusable.

        Example:
            ```python
            queue = CheckpointQueue()
            idx = queue.schedule_async_request(
                AsyncRequest(torch.save, (state_dict, "ckpt.pt"), finalize_fns=[on_done])
            )
            assert queue.maybe_finalize_async_calls(blocking=True) == [idx]
            queue.close()
            ```
        """
        request = as_request(async_request)
        return self._open_engine().schedule(request, needs_global=needs_global).call_idx

    def maybe_finalize_async_calls(
        self, blocking: bool = False, no_dist: bool = False, finalize_timeout: float | None = None
    ) -> list[int]:
        """Finalize the requests that are done, oldest first; return their call indices.

        Never waits for a worker with ``blocking=False``; ``blocking=True`` waits for every
        request in flight. A request that failed (on any rank) raises its
        :class:`CheckpointError` once settled, its finalize steps skipped;
        ``error.finalized_call_idxs`` lists the requests finalized before it in this call.
        Requests after it stay queued for the next call. A request whose scheduling already
        raised is settled silently. ``finalize_timeout`` bounds how long ``blocking=True``
        waits for this rank's workers: what is not done by then stays queued.

        Args:
            blocking: wait for every request in flight; ``False`` never waits for a worker
                (and returns at once if another thread is finalizing).
            no_dist: settle each request on this rank alone; ``False`` agrees with every
                rank (one small collective per request; every rank must call it).
            finalize_timeout: with ``blocking=True``, seconds to wait for this rank's
                workers at most.

        Returns:
            The call indices finalized by this call, oldest first.

        Raises:
            CheckpointError: the oldest failed request's error (a subclass naming the
                call, the rank and the cause), with ``finalized_call_idxs`` set.
        """
        if not self._finalizing.acquire(blocking=blocking):
            return []
        try:
            return self._finalize_locked(blocking, no_dist, finalize_timeout)
        finally:
            self._finalizing.release()

    def _finalize_locked(
        self, blocking: bool, no_dist: bool, finalize_timeout: float | None
    ) -> list[int]:
        engine = self._engine
        if blocking and finalize_timeout is not None:
            deadline = time.monotonic() + finalize_timeout
            blocking = engine.wait_until(
                lambda: all(c.local_outcome() is not None for c in engine.active),
                max(0.0, deadline - time.monotonic()),
            )
        finalized: list[int] = []
        while engine.active:
            settled = engine.settle_front(blocking, no_dist)
            if settled is None:
                break
            if settled.call.error_raised:
                continue
            try:
                if settled.error is not None:
                    raise settled.error
                engine.finalize(settled)
            except CheckpointError as err:
                err.finalized_call_idxs = finalized
                if isinstance(err.__cause__, KeyboardInterrupt | SystemExit):
                    # Raised while its result was unpickled (a Ctrl-C, or the result's
                    # own code): the call failed; the interrupt goes on to the program.
                    raise err.__cause__ from err
                raise
            finalized.append(settled.call.call_idx)
        return finalized

    def get_num_unfinalized_calls(self) -> int:
        """How many scheduled requests are not finalized yet (those whose scheduling raised
        do not count)."""
        return sum(not call.error_raised for call in self._engine.active)

    def close(self, abort: bool = False, *, no_dist: bool = False) -> None:
        """Finalize every pending request, then stop the worker. Idempotent; the next
        request starts a fresh worker.

        Raises the first :class:`CheckpointError` met while finalizing, after the worker
        has been stopped either way. With a ``save_timeout``, a worker that does not answer
        is killed after it and its request fails.

        ``abort=True`` (for in-process restarts) waits for nothing: the workers get SIGTERM
        (SIGKILL after ``sigterm_timeout``) and every pending request is dropped, its
        finalize steps never run and its failure never raised. A worker warmed up by
        :meth:`warmup_persistent_caller` and not taken over yet is stopped too.
        """
        warm, CheckpointQueue._warm_caller = CheckpointQueue._warm_caller, None
        if warm is not None:
            warm.close(abort=abort)
        if abort:  # also while a close() runs in another thread: that close then ends
            self._engine.abort()
            return
        engine = self._engine
        if engine.closed:
            return
        # From here a schedule on another thread either registered its request (and this
        # close finalizes it) or starts a fresh engine; none is stranded on this one.
        engine.refuse_new()
        first: CheckpointError | None = None
        try:
            while engine.active:
                try:
                    self.maybe_finalize_async_calls(blocking=True, no_dist=no_dist)
                except CheckpointError as err:
                    first = first or err
        finally:
            engine.stop_workers()
        if first is not None:
            raise first

    def __enter__(self) -> CheckpointQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None and not engine.closed and not engine.active:
            engine.stop_workers()


def abort_nvrx_checkpoint() -> None:
    """Abort every :class:`CheckpointQueue` of this process (``close(abort=True)``): their
    workers are stopped at once and pending saves dropped. For in-process restarts: the
    queues stay usable, and their next request starts a fresh worker. A worker started by
    :meth:`CheckpointQueue.warmup_persistent_caller` and not taken over is stopped too."""
    for queue in CheckpointQueue.get_instances():
        queue.close(abort=True)
    # A worker warmed up for a queue that was never created (or already dropped).
    warm, CheckpointQueue._warm_caller = CheckpointQueue._warm_caller, None
    if warm is not None:
        warm.close(abort=True)


AsyncCallsQueue = CheckpointQueue
"""NVRx's name for :class:`CheckpointQueue` (``nvidia_resiliency_ext``'s
``AsyncCallsQueue``): the same class."""

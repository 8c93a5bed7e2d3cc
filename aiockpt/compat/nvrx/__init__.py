"""``nvidia_resiliency_ext.checkpointing``'s import paths, served by aiockpt.

Replace the prefix ``nvidia_resiliency_ext.checkpointing`` with ``aiockpt.compat.nvrx``::

    from aiockpt.compat.nvrx.async_ckpt.core import AsyncCallsQueue, AsyncRequest
    from aiockpt.compat.nvrx.async_ckpt.torch_ckpt import TorchAsyncCheckpoint
    from aiockpt.compat.nvrx.utils import preload_tensors, wrap_for_async

The async checkpointing modules are also here directly (``aiockpt.compat.nvrx.core``,
``.torch_ckpt``, ``.filesystem_async``, ``.state_dict_saver``,
``.cached_metadata_filesystem_reader``). One behaviour differs on purpose: a failed save
raises a :class:`aiockpt.CheckpointError` from ``maybe_finalize_async_calls`` instead of
counting as finalized (docs/how-to/migrate-from-nvrx.md).
"""

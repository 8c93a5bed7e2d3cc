"""Sharded checkpoints in the ``torch.distributed.checkpoint`` (DCP) format, saved in the
background by aiockpt's engine and read back by ``dcp.load`` at any world size.

``DCPCheckpoint`` (blocking, NVRx-style) and ``AsyncDCPCheckpoint`` (awaited) save;
``load`` reads any DCP checkpoint (aiockpt's or ``dcp.save``'s) with checked checksums and
a metadata unpickler that builds nothing but DCP's metadata classes. NVRx's names for this
path (``FileSystemWriterAsync``, ``save_state_dict_async_plan``,
``save_state_dict_async_finalize``) work with :class:`aiockpt.CheckpointQueue`.
"""

from ._checkpoint import AsyncDCPCheckpoint as AsyncDCPCheckpoint
from ._checkpoint import DCPAsyncCheckpoint as DCPAsyncCheckpoint  # deprecated name
from ._checkpoint import DCPCheckpoint as DCPCheckpoint
from ._commit import CHECKSUMS as CHECKSUMS
from ._commit import CommitDCP as CommitDCP
from ._commit import dcp_save_request as dcp_save_request
from ._load import SafeLoadPlanner as SafeLoadPlanner
from ._load import load as load
from ._load import verify_dcp as verify_dcp
from ._meta import read_dcp_metadata as read_dcp_metadata
from ._nvrx import FileSystemWriterAsync as FileSystemWriterAsync
from ._nvrx import save_state_dict_async_finalize as save_state_dict_async_finalize
from ._nvrx import save_state_dict_async_plan as save_state_dict_async_plan
from ._plan import SavePlanCache as SavePlanCache
from ._reader import CheckedFileSystemReader as CheckedFileSystemReader

__all__ = [
    "CHECKSUMS",
    "AsyncDCPCheckpoint",
    "CheckedFileSystemReader",
    "CommitDCP",
    "DCPCheckpoint",
    "FileSystemWriterAsync",
    "SafeLoadPlanner",
    "SavePlanCache",
    "dcp_save_request",
    "load",
    "read_dcp_metadata",
    "save_state_dict_async_finalize",
    "save_state_dict_async_plan",
    "verify_dcp",
]

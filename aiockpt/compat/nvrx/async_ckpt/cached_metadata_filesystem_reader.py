"""NVRx's ``checkpointing.async_ckpt.cached_metadata_filesystem_reader`` path; the names live in ``aiockpt.compat.nvrx.cached_metadata_filesystem_reader``."""

from ..cached_metadata_filesystem_reader import *  # noqa: F403
from ..cached_metadata_filesystem_reader import __all__ as __all__

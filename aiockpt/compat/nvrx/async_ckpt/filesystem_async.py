"""NVRx's ``checkpointing.async_ckpt.filesystem_async`` path; the names live in ``aiockpt.compat.nvrx.filesystem_async``."""

from ..filesystem_async import *  # noqa: F403
from ..filesystem_async import __all__ as __all__

"""NVRx's ``checkpointing.async_ckpt.core`` path; the names live in ``aiockpt.compat.nvrx.core``."""

from ..core import *  # noqa: F403
from ..core import __all__ as __all__

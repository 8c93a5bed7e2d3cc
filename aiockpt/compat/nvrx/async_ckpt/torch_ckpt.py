"""NVRx's ``checkpointing.async_ckpt.torch_ckpt`` path; the names live in ``aiockpt.compat.nvrx.torch_ckpt``."""

from ..torch_ckpt import *  # noqa: F403
from ..torch_ckpt import __all__ as __all__

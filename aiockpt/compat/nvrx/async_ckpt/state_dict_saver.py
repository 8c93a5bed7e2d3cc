"""NVRx's ``checkpointing.async_ckpt.state_dict_saver`` path; the names live in ``aiockpt.compat.nvrx.state_dict_saver``."""

from ..state_dict_saver import *  # noqa: F403
from ..state_dict_saver import __all__ as __all__

"""NVRx's ``async_ckpt.state_dict_saver``: plan a DCP save, finalize it after the write."""

from ...dcp._nvrx import save_state_dict_async_finalize as save_state_dict_async_finalize
from ...dcp._nvrx import save_state_dict_async_plan as save_state_dict_async_plan

__all__ = ["save_state_dict_async_finalize", "save_state_dict_async_plan"]

"""The public surface: exports, exceptions across processes, helpers."""

from __future__ import annotations

import gc
import pickle

import torch

import aiockpt
from aiockpt import WorkerCrashedError, WorkerError, preload_tensors, wrap_for_async


def test_all_matches_public_exports() -> None:
    public = {name for name in dir(aiockpt) if not name.startswith("_")}
    public -= {"utils", "annotations", "dcp", "compat"}  # subpackages
    assert set(aiockpt.__all__) == public
    for name in aiockpt.__all__:
        assert getattr(aiockpt, name).__module__.startswith("aiockpt")


def test_errors_survive_pickling_with_their_attributes() -> None:
    err = WorkerError(
        "boom", call_idx=4, rank=2, exc_type="OSError", exc_message="no", worker_traceback="tb"
    )
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is WorkerError and str(back) == "boom"
    assert (back.call_idx, back.rank, back.exc_type, back.exc_message, back.worker_traceback) == (
        4,
        2,
        "OSError",
        "no",
        "tb",
    )
    crash = pickle.loads(pickle.dumps(WorkerCrashedError("dead", call_idx=1, exitcode=-9)))
    assert crash.exitcode == -9 and crash.call_idx == 1


def test_wrap_for_async_disables_gc_only_during_the_call() -> None:
    seen: list[bool] = []
    wrapped = wrap_for_async(lambda sd, x: seen.append(gc.isenabled()) or x * 2)
    assert wrapped({}, 21) == 42
    assert seen == [False] and gc.isenabled()
    assert pickle.loads(pickle.dumps(wrap_for_async(torch.save))).fn is torch.save


def test_preload_tensors_copies_never_aliases() -> None:
    sd = {"a": torch.ones(3), "b": [torch.zeros(2, 2)], "n": 5}
    out = preload_tensors(sd)
    sd["a"].fill_(7)
    assert torch.equal(out["a"], torch.ones(3)) and out["n"] == 5
    assert out["b"][0].data_ptr() != sd["b"][0].data_ptr()

"""The public surface: exports, exceptions across processes, helpers."""

from __future__ import annotations

import gc
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

import aiockpt
from aiockpt import WorkerCrashedError, WorkerError, preload_tensors, wrap_for_async


def test_all_matches_public_exports() -> None:
    public = {name for name in dir(aiockpt) if not name.startswith("_")}
    public -= {"utils", "annotations", "dcp", "compat", "storage"}  # subpackages
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


# -- names: one rule for twins, NVRx's names kept, our old names deprecated -------------


def test_nvrx_names_are_the_blocking_twins_without_a_warning() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert aiockpt.AsyncCallsQueue is aiockpt.CheckpointQueue
        ckpt = aiockpt.TorchAsyncCheckpoint(False)  # NVRx's persistent_queue, by position
    assert isinstance(ckpt, aiockpt.TorchCheckpoint)
    assert not ckpt.queue.persistent
    ckpt.close()


def test_twins_take_persistent_and_the_same_option_keywords() -> None:
    blocking = aiockpt.TorchCheckpoint(persistent=False, save_timeout=7.0)
    also = aiockpt.TorchCheckpoint(persistent_queue=False)  # NVRx's keyword, an alias
    awaited = aiockpt.AsyncTorchCheckpoint(persistent=False, save_timeout=7.0)
    try:
        assert not blocking.queue.persistent and not also.queue.persistent
        assert blocking.queue.options == awaited.queue.options
        assert blocking.queue.options == aiockpt.QueueOptions(persistent=False, save_timeout=7.0)
    finally:
        blocking.close()
        also.close()


def test_one_default_for_every_queue() -> None:
    queue = aiockpt.CheckpointQueue()
    try:
        assert queue.options == aiockpt.AsyncCheckpointQueue().options == aiockpt.QueueOptions()
    finally:
        queue.close()


def test_queue_keywords_name_every_option_but_persistent() -> None:
    import dataclasses

    from aiockpt._options import QueueKeywords

    fields = {f.name for f in dataclasses.fields(aiockpt.QueueOptions)}
    assert set(QueueKeywords.__annotations__) == fields - {"persistent"}


def test_options_object_or_keywords_not_both() -> None:
    opts = aiockpt.QueueOptions(persistent=False, max_staging_copies=2)
    queue = aiockpt.CheckpointQueue(options=opts)
    try:
        assert queue.options is opts
    finally:
        queue.close()
    for make in (aiockpt.CheckpointQueue, aiockpt.AsyncCheckpointQueue):
        with pytest.raises(aiockpt.InvalidRequestError, match=r"not both \(got \['save_timeout'\]"):
            make(options=opts, save_timeout=3.0)


def test_the_group_timeout_takes_seconds_or_a_timedelta() -> None:
    from datetime import timedelta

    assert aiockpt.QueueOptions(timeout=20).timeout == timedelta(seconds=20)
    assert aiockpt.AsyncCheckpointQueue(timeout=2.5)._timeout == 2.5
    for bad in (0, -1, "20"):
        with pytest.raises(aiockpt.InvalidRequestError, match=rf"timeout must be .*not {bad!r}"):
            aiockpt.QueueOptions(timeout=bad)  # type: ignore[arg-type]


def test_load_blocks_and_aload_is_awaited(tmp_path: Path) -> None:
    import anyio

    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(3.0)}, path)
    assert aiockpt.load(path)["w"].tolist() == [0.0, 1.0, 2.0]

    async def main() -> list[float]:
        state = await aiockpt.aload(path)
        return list(state["w"].tolist())

    assert anyio.run(main) == [0.0, 1.0, 2.0]
    assert anyio.run(main, backend="trio") == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_load_on_an_event_loop_warns_that_it_blocks(tmp_path: Path, backend: str) -> None:
    import anyio

    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(1)}, path)

    async def main() -> Any:
        return aiockpt.load(path)

    with pytest.warns(DeprecationWarning, match=r"use `await aiockpt.aload"):
        state = anyio.run(main, backend=backend)
    assert state["w"].tolist() == [1.0]


def test_our_renamed_names_still_work_with_a_warning(tmp_path: Path) -> None:
    import aiockpt.dcp

    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.warns(
        DeprecationWarning, match=r"aiockpt.load_sync is deprecated: use aiockpt.load"
    ):
        load_sync = aiockpt.load_sync
    assert load_sync(path)["w"].tolist() == [1.0, 1.0]
    with pytest.warns(DeprecationWarning, match=r"use aiockpt.dcp.DCPCheckpoint"):
        old = aiockpt.dcp.DCPAsyncCheckpoint(persistent_queue=False)
    assert isinstance(old, aiockpt.dcp.DCPCheckpoint) and not old.queue.persistent
    old.close()
    assert "load_sync" not in aiockpt.__all__ and "DCPAsyncCheckpoint" not in aiockpt.dcp.__all__

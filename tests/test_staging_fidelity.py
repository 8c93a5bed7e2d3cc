"""Staging keeps what ``torch.save`` keeps: what a checkpoint holds is compared with a
``torch.save`` of the same object taken when the save was scheduled (classes,
attributes, requires_grad, conjugate/negative bits, strides, shared storages, shared and
cyclic containers), for the forked and the persistent worker."""

from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt_helpers import (
    alias_then_save,
    change_kept_then_save,
    grad_and_hook_then_save,
    keep_then_save,
    make_gate,
    mark_then_save,
    mark_then_wait_then_write,
    move_then_save,
    open_gate,
    post_hook_then_save,
    report_grad_then_save,
    sleep_then_save,
    tamper_then_save,
    torch_save,
    wait_gate,
    wait_then_write,
)
from fidelity import as_saved, as_torch_saves

from aiockpt import (
    AsyncRequest,
    CheckpointQueue,
    SaveTimeoutError,
    TorchCheckpoint,
    WorkerCrashedError,
)
from aiockpt.utils import wrap_for_async


class FlaggedParameter(torch.nn.Parameter):
    """A Parameter subclass, as Megatron-style code makes them."""


class TaggedTensor(torch.Tensor):
    """A plain Python tensor subclass (no ``__torch_dispatch__``)."""


class Pair(tuple):
    """A tuple subclass whose ``__new__`` does not take an iterable."""

    def __new__(cls, a: Any, b: Any) -> Pair:
        return super().__new__(cls, (a, b))

    def __getnewargs__(self) -> tuple[Any, ...]:
        return tuple(self)


class OldPickle:
    """Pickles with protocol 2 (torch.save's) and refuses newer protocols."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce_ex__(self, protocol: Any) -> Any:
        if protocol > 2:
            raise TypeError("only protocol 2")
        return (OldPickle, (self.value,))


class Holder:
    """A plain object holding a tensor: the staging walk does not open it."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class Scaled(torch.Tensor):
    """A tensor subclass that pickles its attributes through __getstate__/__setstate__."""

    def __getstate__(self) -> Any:
        return ({"scale": self.scale}, None) if self.tuple_state else {"scale": self.scale}

    def __setstate__(self, state: Any) -> None:
        self.scale = (state[0] if isinstance(state, tuple) else state)["scale"]
        self.tuple_state = isinstance(state, tuple)


class StrictParameter(torch.nn.Parameter):
    """A Parameter subclass whose __setstate__ needs a key torch.load never passes it
    (torch rebuilds Parameters without calling it)."""

    def __setstate__(self, state: Any) -> None:
        self.version = state["version"]


class Counted(torch.Tensor):
    """A tensor subclass whose __setstate__ counts its calls: one per load, none before."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state)
        self.loads = self.__dict__.get("loads", 0) + 1


@dataclasses.dataclass(frozen=True)
class Frozen:
    """An immutable record whose copies are itself (a common idiom)."""

    w: torch.Tensor

    def __copy__(self) -> Frozen:
        return self

    def __deepcopy__(self, memo: Any) -> Frozen:
        return self


class SelfCopyingDict(dict):  # type: ignore[type-arg]
    """A dict subclass whose shallow copy is itself."""

    def __copy__(self) -> SelfCopyingDict:
        return self


class NoCopies(list):  # type: ignore[type-arg]
    """A list subclass that refuses to be copied (pickling it is fine)."""

    def __copy__(self) -> NoCopies:
        raise RuntimeError("no copies")


class Cached:
    """An attribute value whose deepcopy drops its cache; pickling keeps it."""

    def __init__(self) -> None:
        self.cache = {"k": 1}

    def __deepcopy__(self, memo: Any) -> Cached:
        out = Cached()
        out.cache = {}
        return out


class WriteOnce(dict):  # type: ignore[type-arg]
    """A dict subclass whose keys cannot be set twice."""

    def __setitem__(self, key: Any, value: Any) -> None:
        if key in self:
            raise KeyError(f"{key} already set")
        super().__setitem__(key, value)


class Notes(list):  # type: ignore[type-arg]
    """A list subclass with attributes."""


class Record:
    """A plain object holding a non-leaf tensor (deepcopy refuses those)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


def _attributes() -> dict[str, Any]:
    t = torch.randn(3)
    t.note = "x"
    p = torch.nn.Parameter(torch.randn(4))
    p.tensor_model_parallel = True
    p.partition_dim = 0
    fp = FlaggedParameter(torch.randn(2))
    fp.flag = 7
    tagged = torch.randn(5).as_subclass(TaggedTensor)
    tagged.tag = "sub"
    tagged.scale = torch.full((2,), 0.5)  # a tensor-valued attribute
    return {"t": t, "p": p, "fp": fp, "tagged": tagged}


def _empty() -> dict[str, Any]:
    return {
        "param0": torch.nn.Parameter(torch.empty(0)),
        "grad0": torch.empty(0, 3, requires_grad=True),
        "plain0": torch.empty(2, 0).t(),
    }


def _shared_containers() -> dict[str, Any]:
    shared = {"w": torch.ones(2)}
    listed = [torch.zeros(1), shared]
    return {"x": shared, "y": shared, "l": listed, "again": listed}


def _cyclic() -> dict[str, Any]:
    cyc: dict[str, Any] = {"w": torch.ones(1)}
    cyc["self"] = cyc
    loop: list[Any] = [torch.arange(3)]
    loop.append(loop)
    return {"c": cyc, "loop": loop}


def _bits() -> dict[str, Any]:
    x = torch.randn(4, 3, dtype=torch.complex64)
    r = torch.randn(6)
    return {"x": x, "conj": x.conj(), "conj_t": x.t().conj(), "r": r, "neg": torch._neg_view(r)}


def _expanded() -> dict[str, Any]:
    return {
        "e": torch.randn(1).expand(1 << 22),
        "tagged": torch.randn(1).as_subclass(TaggedTensor).expand(1 << 22),
        "conj": torch.randn(1, dtype=torch.complex64).conj().expand(1 << 20),
    }


def _refused_before() -> dict[str, Any]:
    return {
        "storage": torch.arange(3, dtype=torch.float32).untyped_storage(),
        "q4": torch.quantize_per_tensor(torch.rand(8), 0.1, 0, torch.quint4x2),
        "pair": Pair(torch.ones(1), 2),
    }


def _unusual_classes() -> dict[str, Any]:
    scaled = []
    for tuple_state in (False, True):
        t = torch.randn(3).as_subclass(Scaled)
        t.scale, t.tuple_state = 2.5, tuple_state
        scaled.append(t)
    once = WriteOnce()
    once["w"] = torch.ones(2)
    notes = Notes([torch.zeros(2), 3])
    notes.note = "x"
    p = torch.nn.Parameter(torch.randn(2))
    p.record = Record(torch.randn(2, requires_grad=True) * 2)  # a non-leaf
    cached = torch.nn.Parameter(torch.randn(2))
    cached.h = Cached()
    strict = StrictParameter(torch.randn(2))
    strict.note = "x"
    counted = torch.randn(2).as_subclass(Counted)
    counted.loads = 0
    return {
        "strict": strict,
        "cached": cached,
        "nocopies": NoCopies([torch.ones(2)]),
        "counted": counted,
        "lazy": torch.nn.LazyLinear(4).state_dict(),
        "scaled": scaled,
        "once": once,
        "notes": notes,
        "p": p,
    }


CASES = {
    "attributes_parameters_and_subclasses": _attributes,
    "empty_tensors_keep_class_and_requires_grad": _empty,
    "containers_referenced_twice_stay_one_object": _shared_containers,
    "cyclic_containers": _cyclic,
    "conjugate_and_negative_views_share_their_base": _bits,
    "expanded_tensors_stay_small": _expanded,
    "storages_quint4x2_and_tuple_subclasses": _refused_before,
    "lazy_parameters_setstate_subclasses_strict_dicts_list_subclasses": _unusual_classes,
}


@pytest.fixture(params=[False, True], ids=["fork", "persistent"])
def ckpt(request: pytest.FixtureRequest) -> Iterator[TorchCheckpoint]:
    c = TorchCheckpoint(persistent=request.param)
    yield c
    c.close()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpoint_holds_what_torch_save_keeps(
    ckpt: TorchCheckpoint, tmp_path: Path, case: str
) -> None:
    sd = CASES[case]()
    want = as_torch_saves(sd)
    ckpt.async_save(sd, tmp_path / "ckpt.pt")
    assert ckpt.finalize_async_save(blocking=True) == [0]
    assert as_saved(str(tmp_path / "ckpt.pt")) == want
    if case == "expanded_tensors_stay_small":
        assert os.path.getsize(tmp_path / "ckpt.pt") < 64 << 10  # not 16 MiB materialised


def test_attributes_changed_after_the_save_is_scheduled_are_not_saved(
    ckpt: TorchCheckpoint, tmp_path: Path
) -> None:
    sd = _attributes()
    want = as_torch_saves(sd)
    ckpt.async_save(sd, tmp_path / "ckpt.pt")
    sd["t"].note = "changed"
    sd["p"].partition_dim = 1
    sd["tagged"].scale.fill_(9.0)
    sd["fp"].requires_grad_(False)
    ckpt.finalize_async_save(blocking=True)
    assert as_saved(str(tmp_path / "ckpt.pt")) == want


def test_staging_never_changes_objects_whose_copy_is_themselves(
    ckpt: TorchCheckpoint, tmp_path: Path
) -> None:
    w, v = torch.full((4,), 5.0), torch.full((2,), 6.0)
    frozen, selfish = Frozen(w), SelfCopyingDict(v=v)
    sd = {"frozen": frozen, "selfish": selfish}
    want = as_torch_saves(sd)
    ckpt.async_save(sd, tmp_path / "a.pt")
    ckpt.async_save({"other": torch.full((4,), 7.0), "more": torch.zeros(2)}, tmp_path / "b.pt")
    assert ckpt.finalize_async_save(blocking=True) == [0, 1]
    assert frozen.w is w and selfish["v"] is v  # the caller's objects are untouched
    assert w.tolist() == [5.0] * 4 and v.tolist() == [6.0] * 2
    assert as_saved(str(tmp_path / "a.pt")) == want


def test_a_persistent_worker_request_never_sees_what_an_earlier_one_did_to_its_tensors(
    tmp_path: Path,
) -> None:
    with CheckpointQueue(persistent=True) as queue:
        first = {"a": torch.full((4,), 1.25), "b": torch.full((3,), 2.0)}
        queue.schedule_async_request(
            AsyncRequest(tamper_then_save, (first, str(tmp_path / "1")), [])
        )
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]
        second = {"a": torch.full((4,), 3.125), "b": torch.full((3,), 4.0)}
        want = as_torch_saves(second)
        queue.schedule_async_request(AsyncRequest(torch_save, (second, str(tmp_path / "2")), []))
        assert queue.maybe_finalize_async_calls(blocking=True) == [1]
    tampered = torch.load(tmp_path / "1", weights_only=False)
    assert tampered["a"].dtype == torch.bfloat16 and tampered["b"].requires_grad  # it did
    assert as_saved(str(tmp_path / "2")) == want


@pytest.mark.parametrize(
    "tamper", ["move_storage", "grad_and_hook", "post_hook", "alias", "wrapped_function"]
)
def test_a_persistent_worker_restores_views_however_a_request_changed_them(
    tmp_path: Path, tamper: str
) -> None:
    fn: Any = {
        "move_storage": move_then_save,
        "grad_and_hook": grad_and_hook_then_save,
        "post_hook": post_hook_then_save,
        "alias": alias_then_save,
        "wrapped_function": wrap_for_async(tamper_then_save),
    }[tamper]
    with CheckpointQueue(persistent=True) as queue:
        base = torch.full((4,), 1.25)
        first = {"a": base, "b": torch.full((3,), 2.0), "v": base[1:3]}
        queue.schedule_async_request(AsyncRequest(fn, (first, str(tmp_path / "1")), []))
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]
        for step in (2, 3):
            base = torch.full((4,), float(step))
            state = {"a": base, "b": torch.full((3,), step * 10.0), "v": base[1:3]}
            want = as_torch_saves(state)
            request = AsyncRequest(report_grad_then_save, (state, str(tmp_path / f"{step}")), [])
            queue.schedule_async_request(request)
            assert queue.maybe_finalize_async_calls(blocking=True) == [step - 1]
            assert as_saved(str(tmp_path / f"{step}")) == want
            with open(tmp_path / f"{step}.seen", "rb") as f:
                assert pickle.load(f) == {
                    "a": (None, False),
                    "b": (None, False),
                    "v": (None, False),
                }


def test_views_a_request_kept_and_a_later_one_changed_are_restored(tmp_path: Path) -> None:
    with CheckpointQueue(persistent=True, max_staging_copies=2) as queue:
        for i, fn in enumerate((keep_then_save, change_kept_then_save)):  # two arenas
            state = {"w": torch.full((4,), float(i + 1))}
            queue.schedule_async_request(AsyncRequest(fn, (state, str(tmp_path / f"{i}")), []))
        assert queue.maybe_finalize_async_calls(blocking=True) == [0, 1]
        for i in range(2, 6):  # every later save, on either arena, holds its own values
            state = {"w": torch.full((4,), float(i + 1))}
            queue.schedule_async_request(
                AsyncRequest(torch_save, (state, str(tmp_path / f"{i}")), [])
            )
            assert queue.maybe_finalize_async_calls(blocking=True) == [i]
            assert torch.load(tmp_path / f"{i}")["w"].tolist() == [float(i + 1)] * 4


def test_a_forked_child_stopped_while_waiting_still_meets_its_deadline(tmp_path: Path) -> None:
    path = str(tmp_path / "latest.pt")
    with CheckpointQueue(persistent=False, max_staging_copies=2, save_timeout=3.0) as queue:
        args = ({"tag": "A"}, 1.0, path)
        queue.schedule_async_request(AsyncRequest(sleep_then_save, args, []))
        queue.schedule_async_request(AsyncRequest(torch_save, ({"tag": "B"}, path), []))
        os.kill(queue._engine._running[1].caller.process.pid, signal.SIGSTOP)  # while waiting
        with pytest.raises(SaveTimeoutError, match=r"call 1 .* save_timeout=3.0s"):
            queue.maybe_finalize_async_calls(blocking=True)  # A finalized, B timed out
    assert torch.load(path, weights_only=True) == {"tag": "A"}


def test_a_fork_that_fails_before_the_child_exists_leaves_no_phantom_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiockpt import StagingError
    from aiockpt._core._fork import ForkOrder

    real = ForkOrder.predecessors
    failures = [OSError(errno.EMFILE, "Too many open files")]

    def once(self: ForkOrder) -> tuple[int, ...]:
        if failures:
            raise failures.pop()
        return real(self)

    monkeypatch.setattr(ForkOrder, "predecessors", once)
    with CheckpointQueue(persistent=False, save_timeout=30.0) as queue:
        with pytest.raises(StagingError, match="Too many open files"):
            queue.schedule_async_request(
                AsyncRequest(torch_save, ({"n": 0, "w": torch.ones(4)}, str(tmp_path / "a")), [])
            )
        # The failed call holds no staging copy and no place in line: the next one runs.
        queue.schedule_async_request(
            AsyncRequest(torch_save, ({"n": 1, "w": torch.ones(4)}, str(tmp_path / "b")), [])
        )
        assert queue.maybe_finalize_async_calls(blocking=True) == [1]
    assert torch.load(tmp_path / "b", weights_only=True)["n"] == 1


@pytest.mark.parametrize("persistent", [False, True], ids=["fork", "persistent"])
def test_descriptors_past_1024_do_not_break_ordering_or_close(
    tmp_path: Path, persistent: bool
) -> None:
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2048:
        pytest.skip("needs a descriptor limit of 2048 or more")
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # a busy program
    try:
        path = str(tmp_path / "latest.pt")
        with CheckpointQueue(persistent=persistent, max_staging_copies=3) as queue:
            for tag in "ABC":
                state = {"tag": tag, "w": torch.ones(2)}
                queue.schedule_async_request(AsyncRequest(torch_save, (state, path), []))
            assert queue.maybe_finalize_async_calls(blocking=True) == [0, 1, 2]
        assert torch.load(path, weights_only=True)["tag"] == "C"
    finally:
        for fd in spare:
            os.close(fd)


def test_forked_saves_to_one_path_land_in_scheduling_order(tmp_path: Path) -> None:
    path = str(tmp_path / "latest.pt")
    gate, marker = make_gate(str(tmp_path), "gate"), str(tmp_path / "second-started")
    with CheckpointQueue(persistent=False, max_staging_copies=2) as queue:
        # The older save is held back; the newer one is ready to write at once.
        older = {"step": 1, "w": torch.ones(4)}
        queue.schedule_async_request(AsyncRequest(wait_then_write, (older, gate, path), []))
        newer = {"step": 2, "w": torch.full((2,), 2.0)}
        queue.schedule_async_request(AsyncRequest(mark_then_save, (newer, marker, path), []))
        try:
            # The newer one must not start while the older one runs: give it every chance.
            with pytest.raises(TimeoutError):
                wait_gate(marker, timeout=2.0)
        finally:
            open_gate(gate)
        assert queue.maybe_finalize_async_calls(blocking=True) == [0, 1]
    assert os.path.exists(marker)
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 2 and torch.equal(saved["w"], newer["w"])


def test_a_forked_child_waiting_for_the_one_before_is_not_charged_for_the_wait(
    tmp_path: Path,
) -> None:
    # Each save fits its deadline; the second one's wait for the first does not count.
    with CheckpointQueue(persistent=False, max_staging_copies=2, save_timeout=3.0) as queue:
        for name, seconds in (("a", 2.0), ("b", 1.5)):
            args = ({"w": torch.ones(2)}, seconds, str(tmp_path / name))
            queue.schedule_async_request(AsyncRequest(sleep_then_save, args, []))
        assert queue.maybe_finalize_async_calls(blocking=True) == [0, 1]
    assert (tmp_path / "a").exists() and (tmp_path / "b").exists()


def test_a_forked_save_killed_while_waiting_keeps_the_rest_of_the_chain_in_order(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "latest.pt")
    gate = make_gate(str(tmp_path), "gate")
    with CheckpointQueue(persistent=False, max_staging_copies=3) as queue:
        queue.schedule_async_request(AsyncRequest(wait_then_write, ({"tag": "A"}, gate, path), []))
        queue.schedule_async_request(AsyncRequest(torch_save, ({"tag": "B"}, path), []))
        queue.schedule_async_request(AsyncRequest(torch_save, ({"tag": "C"}, path), []))
        waiting = queue._engine._running[1].caller.process
        os.kill(waiting.pid, signal.SIGKILL)  # B dies while it waits for A (an OOM kill)
        waiting.join(30)
        open_gate(gate)
        with pytest.raises(WorkerCrashedError, match=r"call 1 .* before it started it"):
            queue.maybe_finalize_async_calls(blocking=True)  # 0 finalized, then 1 raises
        assert queue.maybe_finalize_async_calls(blocking=True) == [2]
    assert torch.load(path, weights_only=True) == {"tag": "C"}  # C ran after A, not before


def test_objects_that_pickle_only_with_protocol_2_are_saved_by_either_worker(
    ckpt: TorchCheckpoint, tmp_path: Path
) -> None:
    sd = {"old": OldPickle(3), "w": torch.ones(2)}
    want = as_torch_saves(sd)
    ckpt.async_save(sd, tmp_path / "a.pt")
    assert ckpt.finalize_async_save(blocking=True) == [0]
    assert as_saved(str(tmp_path / "a.pt")) == want


def test_a_forked_save_snapshots_tensors_over_memory_torch_did_not_allocate(
    tmp_path: Path,
) -> None:
    from multiprocessing import shared_memory

    import numpy

    block = shared_memory.SharedMemory(create=True, size=16)
    try:
        t = torch.from_numpy(numpy.ndarray((4,), dtype=numpy.float32, buffer=block.buf))
        t.zero_()
        gate = make_gate(str(tmp_path), "gate")
        path = str(tmp_path / "held.pt")
        with CheckpointQueue(persistent=False) as queue:
            sd = {"holder": Holder(t)}
            queue.schedule_async_request(AsyncRequest(wait_then_write, (sd, gate, path), []))
            t.add_(100.0)  # after the save was scheduled: must not reach the file
            open_gate(gate)
            assert queue.maybe_finalize_async_calls(blocking=True) == [0]
        assert torch.load(path, weights_only=False)["holder"].t.tolist() == [0.0] * 4
        del t
    finally:
        block.close()
        block.unlink()


def test_a_forked_save_snapshots_numpy_views_of_shared_memory(tmp_path: Path) -> None:
    shared = torch.zeros(4).share_memory_()
    gate = make_gate(str(tmp_path), "gate")
    path = str(tmp_path / "held.pt")
    with CheckpointQueue(persistent=False) as queue:
        sd = {"array": shared.numpy(), "holder": Holder(shared.numpy())}
        queue.schedule_async_request(AsyncRequest(wait_then_write, (sd, gate, path), []))
        shared.fill_(7.0)  # after the save was scheduled: must not reach the file
        open_gate(gate)
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]
    saved = torch.load(path, weights_only=False)
    assert saved["array"].tolist() == [0.0] * 4
    assert saved["holder"].t.tolist() == [0.0] * 4


def test_a_forked_save_snapshots_shared_memory_the_walk_cannot_reach(tmp_path: Path) -> None:
    shared = torch.zeros(4).share_memory_()
    gate = make_gate(str(tmp_path), "gate")
    path = str(tmp_path / "held.pt")
    with CheckpointQueue(persistent=False) as queue:
        sd = {"holder": Holder(shared), "plain": torch.ones(2)}
        queue.schedule_async_request(AsyncRequest(wait_then_write, (sd, gate, path), []))
        shared.fill_(7.0)  # after the save was scheduled: must not reach the file
        open_gate(gate)
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]
    saved = torch.load(path, weights_only=False)
    assert torch.equal(saved["holder"].t, torch.zeros(4))
    assert torch.equal(shared, torch.full((4,), 7.0))


def test_waiting_on_a_later_forked_save_never_watches_a_descriptor_that_is_always_ready(
    tmp_path: Path,
) -> None:
    from aiockpt._core._process import readable

    gate = make_gate(str(tmp_path), "gate")
    marker = str(tmp_path / "second-started")
    with CheckpointQueue(persistent=False, max_staging_copies=2) as queue:
        queue.schedule_async_request(AsyncRequest(torch_save, ({"n": 0}, str(tmp_path / "a")), []))
        args = ({"n": 1}, gate, str(tmp_path / "b"))
        queue.schedule_async_request(AsyncRequest(mark_then_wait_then_write, (*args, marker), []))
        finalized: list[int] = []
        try:
            wait_gate(marker)  # the second child runs: the first has exited
            for _ in range(3):
                finalized += queue.maybe_finalize_async_calls(blocking=False)
                handles = queue._engine.wait_handles()[1:]  # the engine's own pipe aside
                # A blocking wait over these must sleep, not return at once (a busy loop).
                assert readable(handles, 0) == []
        finally:
            open_gate(gate)
        finalized += queue.maybe_finalize_async_calls(blocking=True)
        assert finalized == [0, 1]


def test_a_stale_relayout_never_undoes_a_newer_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    # In the persistent worker, after a request moved a storage (share_memory_), the main
    # thread lays the arena out again from the plan it read, while the reader thread may
    # already have installed the next request's plan: that newer plan must stay. Here the
    # reader's lay-out is run exactly inside the window (as the first view building of the
    # stale re-layout). Before, every later save wrote bytes through the stale views.
    from aiockpt._core import _transport
    from aiockpt._staging import _arena
    from aiockpt._staging._scan import StagingPlan

    arena = 987_654
    fd = os.memfd_create("aiockpt-test-arena")
    os.ftruncate(fd, 4096)
    _transport.map_arena(arena, fd, 4096)
    try:
        old = StagingPlan(((0, 64),), ((0, torch.float32, (16,), (1,), 0),), 64)
        new = StagingPlan(((0, 48),), ((0, torch.int64, (2, 3), (3, 1), 0),), 48)
        _transport.lay_out(arena, old)
        _transport._VIEWS[arena][0].share_memory_()  # a request moved its storage
        real = _arena.build_views
        raced: list[bool] = []

        def reader_lays_out_first(slots: list[torch.Tensor], plan: Any) -> list[torch.Tensor]:
            if not raced:
                raced.append(True)
                _transport.lay_out(arena, new)  # the reader thread, in the window
            return real(slots, plan)

        monkeypatch.setattr(_transport, "build_views", reader_lays_out_first)
        _transport.restore_views()
        assert raced == [True]
        [view] = _transport._VIEWS[arena]
        assert (view.dtype, tuple(view.shape), view.stride()) == (torch.int64, (2, 3), (3, 1))
        assert _transport._LAYOUTS[arena][0] is new
    finally:
        _transport.unmap_arena(arena)


@pytest.mark.parametrize("persistent", [False, True], ids=["fork", "persistent"])
def test_a_storage_that_changes_its_tensors_before_writing_saves_what_it_changed(
    tmp_path: Path, persistent: bool
) -> None:
    # A user's storage changes the staged tensors in place, then writes with the stock
    # writer: the file holds the changed tensors, as under fork. Before, the persistent
    # worker pickled them as they had been staged (float32, 8 elements).
    from ckpt_helpers import HalvingStorage, TrimmingStorage

    from aiockpt import CheckpointManager

    for storage, dtype, numel in (
        (HalvingStorage(), torch.float16, 8),
        (TrimmingStorage(), torch.float32, 4),
    ):
        directory = tmp_path / type(storage).__name__
        with CheckpointManager(directory, storage=storage, persistent=persistent) as mgr:
            for step in (1, 2):  # the second save reuses the worker's registered views
                mgr.save(step, {"w": torch.arange(8, dtype=torch.float32) + step})
                mgr.poll(blocking=True)
            for step in (1, 2):
                w = mgr.restore(step)["w"]
                assert (w.dtype, w.numel()) == (dtype, numel)
                assert torch.equal(w, (torch.arange(numel, dtype=torch.float32) + step).to(dtype))

"""NVRx compatibility: the reference's public names, signatures and behaviours, run with
real worker processes (and real gloo ranks for ``execute_sync``)."""

from __future__ import annotations

import gc
import importlib
import inspect
import io
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import pytest
import torch
from ckpt_helpers import make_gate, open_gate, read_pid, report_pid, write_value
from dist_harness import run_ranks, values

from aiockpt import CheckpointError, InvalidRequestError, TorchAsyncCheckpoint
from aiockpt._core._engine import _live_engines
from aiockpt._core._priority import get_io_priority
from aiockpt.compat.nvrx.async_ckpt.core import (
    AsyncCallsQueue,
    AsyncRequest,
    abort_nvrx_checkpoint,
)

NVRX = "aiockpt.compat.nvrx"
REQUIRED = inspect.Parameter.empty

# NVRx's public names on the async checkpointing path, with the parameters (and defaults)
# of nvidia_resiliency_ext.checkpointing.{async_ckpt.core, async_ckpt.torch_ckpt,
# async_ckpt.filesystem_async, async_ckpt.state_dict_saver,
# async_ckpt.cached_metadata_filesystem_reader, utils}. None: the name must exist and be
# callable, its parameters are aiockpt's own (see docs/how-to/migrate-from-nvrx.md).
SIGNATURES: list[tuple[str, str, list[tuple[str, Any]] | None]] = [
    ("async_ckpt.core", "AsyncRequest.add_finalize_fn", [("self", REQUIRED), ("fn", REQUIRED)]),
    ("async_ckpt.core", "AsyncRequest.execute_sync", [("self", REQUIRED)]),
    ("async_ckpt.core", "AsyncRequest.freeze", [("self", REQUIRED)]),
    (
        "async_ckpt.core",
        "AsyncRequest.execute_finalize_fns",
        [("self", REQUIRED), ("validate_matching_call_idx", True)],
    ),
    (
        "async_ckpt.core",
        "AsyncCallsQueue.__init__",
        [
            ("self", REQUIRED),
            ("persistent", True),
            ("is_daemon", True),
            ("cpu_priority", 10),
            ("io_priority", None),
            ("sigterm_timeout", 30.0),
            ("cpu_shm_mode", False),
        ],
    ),
    (
        "async_ckpt.core",
        "AsyncCallsQueue.warmup_persistent_caller",
        [
            ("rank", REQUIRED),
            ("is_daemon", True),
            ("cpu_priority", 10),
            ("io_priority", None),
            ("sigterm_timeout", 30.0),
            ("cpu_shm_mode", False),
        ],
    ),
    (
        "async_ckpt.core",
        "AsyncCallsQueue.schedule_async_request",
        [("self", REQUIRED), ("async_request", REQUIRED)],
    ),
    (
        "async_ckpt.core",
        "AsyncCallsQueue.maybe_finalize_async_calls",
        [("self", REQUIRED), ("blocking", False), ("no_dist", False), ("finalize_timeout", None)],
    ),
    ("async_ckpt.core", "AsyncCallsQueue.get_num_unfinalized_calls", [("self", REQUIRED)]),
    ("async_ckpt.core", "AsyncCallsQueue.close", [("self", REQUIRED), ("abort", False)]),
    ("async_ckpt.core", "AsyncCallsQueue.get_instances", []),
    ("async_ckpt.core", "abort_nvrx_checkpoint", []),
    (
        "async_ckpt.core",
        "AsyncCaller.schedule_async_call",
        [("self", REQUIRED), ("async_req", REQUIRED)],
    ),
    (
        "async_ckpt.core",
        "AsyncCaller.is_current_async_call_done",
        [("self", REQUIRED), ("blocking", False), ("no_dist", False), ("finalize_timeout", None)],
    ),
    ("async_ckpt.core", "AsyncCaller.close", [("self", REQUIRED), ("abort", False)]),
    ("async_ckpt.core", "TemporalAsyncCaller.close", [("self", REQUIRED), ("abort", False)]),
    ("async_ckpt.core", "PersistentAsyncCaller.close", [("self", REQUIRED), ("abort", False)]),
    (
        "async_ckpt.torch_ckpt",
        "TorchAsyncCheckpoint.async_save",
        [("self", REQUIRED), ("state_dict", REQUIRED)],
    ),
    (
        "async_ckpt.torch_ckpt",
        "TorchAsyncCheckpoint.finalize_async_save",
        [("self", REQUIRED), ("blocking", False), ("no_dist", True), ("terminate", False)],
    ),
    ("async_ckpt.torch_ckpt", "TorchAsyncCheckpoint.save", None),
    ("async_ckpt.filesystem_async", "FileSystemWriterAsync", None),
    (
        "async_ckpt.filesystem_async",
        "FileSystemWriterAsync.get_save_function_and_args",
        [("self", REQUIRED)],
    ),
    (
        "async_ckpt.filesystem_async",
        "FileSystemWriterAsync.retrieve_write_results",
        [("self", REQUIRED)],
    ),
    (
        "async_ckpt.state_dict_saver",
        "save_state_dict_async_plan",
        [
            ("state_dict", REQUIRED),
            ("storage_writer", REQUIRED),
            ("process_group", None),
            ("coordinator_rank", 0),
            ("planner", None),
            ("enable_cache", False),
            ("metadata_cache", None),
        ],
    ),
    (
        "async_ckpt.state_dict_saver",
        "save_state_dict_async_finalize",
        [("storage_writer", REQUIRED), ("global_metadata", REQUIRED), ("dist_wrapper", REQUIRED)],
    ),
    (
        "async_ckpt.cached_metadata_filesystem_reader",
        "CachedMetadataFileSystemReader.__init__",
        [("self", REQUIRED), ("path", REQUIRED), ("cache_metadata", True)],
    ),
    (
        "async_ckpt.cached_metadata_filesystem_reader",
        "CachedMetadataFileSystemReader.clear_metadata_cache",
        [],
    ),
    ("utils", "preload_tensors", [("state_dict", REQUIRED), ("non_blocking", True)]),
    ("utils", "wrap_for_async", [("fn", REQUIRED)]),
    ("utils", "dict_list_map_outplace", [("f", REQUIRED), ("x", REQUIRED)]),
]

# NVRx's AsyncRequest fields and defaults, in order (its node-local staging field
# ``flush_dst`` is refused when set; see the migration page).
REQUEST_FIELDS = [
    ("async_fn", REQUIRED),
    ("async_fn_args", REQUIRED),
    ("finalize_fns", REQUIRED),
    ("async_fn_kwargs", None),
    ("preload_fn", None),
    ("is_frozen", False),
    ("call_idx", 0),
]


def load(path: Path) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


def _resolve(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(f"{NVRX}.{module}")
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize(("module", "qualname", "expected"), SIGNATURES)
def test_nvrx_name_has_the_reference_signature(
    module: str, qualname: str, expected: list[tuple[str, Any]] | None
) -> None:
    obj = _resolve(module, qualname)
    assert callable(obj), f"{module}.{qualname} is not callable"
    if expected is None:
        return
    params = list(inspect.signature(obj).parameters.values())
    got = [(p.name, p.default) for p in params[: len(expected)]]
    assert got == expected, f"{module}.{qualname}: {got} != {expected}"
    for extra in params[len(expected) :]:
        # aiockpt's own parameters come after the reference's and never need a value.
        assert extra.kind in (extra.VAR_POSITIONAL, extra.VAR_KEYWORD) or (
            extra.default is not REQUIRED
        ), f"{module}.{qualname}: extra parameter {extra.name} is required"


def test_async_request_has_the_reference_fields_in_order() -> None:
    fields = AsyncRequest._fields[: len(REQUEST_FIELDS)]
    defaults = AsyncRequest._field_defaults
    assert [(f, defaults.get(f, REQUIRED)) for f in fields] == REQUEST_FIELDS


def test_torch_async_checkpoint_defaults_to_the_persistent_worker() -> None:
    # The one deliberate default change (see the migration page): NVRx's torch_ckpt.py
    # still says persistent_queue=False while its queue defaults to the persistent worker.
    sig = inspect.signature(TorchAsyncCheckpoint.__init__)
    assert sig.parameters["persistent_queue"].default is True
    ckpt = TorchAsyncCheckpoint()
    try:
        assert ckpt.queue.persistent
    finally:
        ckpt.close()


def test_import_paths_mirror_the_reference_tree() -> None:
    from aiockpt.compat.nvrx import core
    from aiockpt.compat.nvrx.async_ckpt import TorchAsyncCheckpoint as Nested
    from aiockpt.compat.nvrx.async_ckpt import core as nested_core
    from aiockpt.compat.nvrx.async_ckpt.torch_ckpt import TorchAsyncCheckpoint as Deep

    assert Nested is Deep is TorchAsyncCheckpoint
    assert nested_core.AsyncCallsQueue is core.AsyncCallsQueue is AsyncCallsQueue


# -- requests ---------------------------------------------------------------------------


def test_request_without_kwargs_runs_and_frozen_refuses_with_runtime_error(
    tmp_path: Path,
) -> None:
    ran: list[str] = []
    request = AsyncRequest(write_value, (1, str(tmp_path / "a")), [lambda: ran.append("first")])
    assert request.async_fn_kwargs is None
    request.add_finalize_fn(lambda: ran.append("second"))
    with AsyncCallsQueue(persistent=False) as queue:
        assert queue.schedule_async_request(request) == 0
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]
    assert ran == ["first", "second"]
    assert load(tmp_path / "a") == 1
    frozen = request.freeze()
    with pytest.raises(RuntimeError, match="frozen") as info:
        frozen.add_finalize_fn(print)
    assert isinstance(info.value, CheckpointError)


def test_execute_finalize_fns_runs_in_order_and_returns_call_idx() -> None:
    ran: list[int] = []
    request = AsyncRequest(None, (), [lambda: ran.append(1), lambda: ran.append(2)], call_idx=5)
    assert request.execute_finalize_fns() == 5
    assert request.execute_finalize_fns(validate_matching_call_idx=False) == 5
    assert ran == [1, 2, 1, 2]


class ForeignRequest(NamedTuple):
    """A request shaped like NVRx's own (another class, the same fields)."""

    async_fn: Any
    async_fn_args: tuple[Any, ...]
    finalize_fns: list[Any]
    async_fn_kwargs: dict[str, Any] | None = None
    preload_fn: Any = None
    is_frozen: bool = False
    call_idx: int = 0
    flush_dst: str | None = None


def test_schedule_accepts_a_request_shaped_like_the_reference(tmp_path: Path) -> None:
    ran: list[int] = []
    with AsyncCallsQueue() as queue:
        idx = queue.schedule_async_request(
            ForeignRequest(
                write_value, ({"w": torch.ones(2)}, str(tmp_path / "f")), [lambda: ran.append(1)]
            )
        )
        assert queue.maybe_finalize_async_calls(blocking=True) == [idx]
        with pytest.raises(InvalidRequestError, match="flush_dst"):
            queue.schedule_async_request(ForeignRequest(None, (), [], flush_dst="/durable"))
        with pytest.raises(InvalidRequestError, match="AsyncRequest"):
            queue.schedule_async_request(object())
    assert ran == [1]
    assert torch.equal(load(tmp_path / "f")["w"], torch.ones(2))


def test_execute_sync_waits_for_every_rank_before_finalizing(tmp_path: Path) -> None:
    out = values(run_ranks("nvrx_scenarios:execute_sync_barrier", 2, str(tmp_path)))
    assert out[0] == {"seen": [["part-0", "part-1"]], "finalized": 3}
    assert out[1] == {"seen": [], "finalized": 3}


def test_execute_finalize_fns_across_ranks_detects_mismatched_calls(tmp_path: Path) -> None:
    out = values(run_ranks("nvrx_scenarios:execute_finalize_fns_mismatch", 2, str(tmp_path)))
    assert out[0].startswith("DistributedCheckpointError: rank 0 finalized call 0")
    assert "another rank finalized call 1" in out[0]
    assert out[1] == "no error"


# -- TorchAsyncCheckpoint.save ----------------------------------------------------------


def test_torch_async_checkpoint_save_writes_now(tmp_path: Path) -> None:
    ckpt = TorchAsyncCheckpoint()
    try:
        ckpt.save({"w": torch.arange(4)}, tmp_path / "sync.pt")
        assert torch.equal(
            torch.load(tmp_path / "sync.pt", weights_only=True)["w"], torch.arange(4)
        )
        buffer = io.BytesIO()
        ckpt.save({"b": 1}, buffer)
        buffer.seek(0)
        assert torch.load(buffer, weights_only=True) == {"b": 1}
        assert ckpt.queue._engine._persistent_caller is not None
        assert ckpt.queue._engine._persistent_caller.process is None  # no worker for save()
        with pytest.raises(InvalidRequestError, match="does not exist"):
            ckpt.save({}, tmp_path / "missing" / "x.pt")
    finally:
        ckpt.close()


# -- abort, close and reuse -------------------------------------------------------------


@pytest.mark.parametrize("persistent", [False, True], ids=["fork", "persistent"])
def test_abort_drops_the_pending_save_and_the_next_one_succeeds(
    tmp_path: Path, persistent: bool
) -> None:
    gate = make_gate(str(tmp_path), "gate")
    pid_file = str(tmp_path / "pid")
    ran: list[int] = []
    queue = AsyncCallsQueue(persistent=persistent)
    try:
        queue.schedule_async_request(
            AsyncRequest(report_pid, (None, gate, pid_file), [lambda: ran.append(0)])
        )
        pid = read_pid(pid_file)
        old_engine = queue._engine
        abort_nvrx_checkpoint()
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert old_engine not in _live_engines  # nothing is reported about it at exit
        assert queue.get_num_unfinalized_calls() == 0
        assert queue.maybe_finalize_async_calls(blocking=True) == []
        idx = queue.schedule_async_request(
            AsyncRequest(write_value, ("after", str(tmp_path / "after")), [lambda: ran.append(1)])
        )
        assert idx == 0  # indices start again after an abort, as in the reference
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]
        assert ran == [1]
        assert load(tmp_path / "after") == "after"
    finally:
        open_gate(gate)
        queue.close()


def test_torch_async_checkpoint_close_abort_then_save_again(tmp_path: Path) -> None:
    gate = make_gate(str(tmp_path), "gate")
    pid_file = str(tmp_path / "pid")
    ckpt = TorchAsyncCheckpoint()
    try:
        ckpt.queue.schedule_async_request(AsyncRequest(report_pid, (None, gate, pid_file), []))
        read_pid(pid_file)
        ckpt.close(abort=True)
        ckpt.async_save({"w": torch.ones(3)}, tmp_path / "next.pt")
        assert ckpt.finalize_async_save(blocking=True) == [0]
        assert torch.equal(torch.load(tmp_path / "next.pt", weights_only=True)["w"], torch.ones(3))
    finally:
        open_gate(gate)
        ckpt.close()


def install_sigterm_marker(state: Any, marker: str, gate: str, pid_path: str) -> None:
    """Worker side: on SIGTERM, leave ``marker`` and exit; then wait on the gate."""

    def on_term(signum: int, frame: Any) -> None:
        with open(marker, "w") as f:
            f.write("sigterm")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    report_pid(state, gate, pid_path)


def test_abort_sends_sigterm_before_sigkill(tmp_path: Path) -> None:
    gate = make_gate(str(tmp_path), "gate")
    marker, pid_file = str(tmp_path / "marker"), str(tmp_path / "pid")
    queue = AsyncCallsQueue(sigterm_timeout=30.0)
    try:
        queue.schedule_async_request(
            AsyncRequest(install_sigterm_marker, (None, marker, gate, pid_file), [])
        )
        read_pid(pid_file)
        queue.close(abort=True)
        with open(marker) as f:
            assert f.read() == "sigterm"
    finally:
        open_gate(gate)
        queue.close()


def ignore_sigterm(state: Any, gate: str, pid_path: str) -> None:
    """Worker side: ignore SIGTERM, then wait on the gate."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    report_pid(state, gate, pid_path)


def test_abort_kills_a_worker_that_ignores_sigterm_after_the_grace(tmp_path: Path) -> None:
    gate = make_gate(str(tmp_path), "gate")
    pid_file = str(tmp_path / "pid")
    queue = AsyncCallsQueue(sigterm_timeout=0.5)
    try:
        queue.schedule_async_request(AsyncRequest(ignore_sigterm, (None, gate, pid_file), []))
        pid = read_pid(pid_file)
        queue.close(abort=True)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        open_gate(gate)
        queue.close()


def test_abort_stops_a_warmed_up_worker_nobody_took_over() -> None:
    AsyncCallsQueue.warmup_persistent_caller(0)
    warm = AsyncCallsQueue._warm_caller
    assert warm is not None and warm.process is not None
    pid = warm.process.pid
    assert pid is not None
    gc.collect()  # no queue is alive to take it over or to close it
    assert not AsyncCallsQueue.get_instances()
    abort_nvrx_checkpoint()
    assert AsyncCallsQueue._warm_caller is None and warm.process is None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_queue_and_checkpoint_are_usable_after_close_and_terminate(tmp_path: Path) -> None:
    queue = AsyncCallsQueue()
    queue.schedule_async_request(AsyncRequest(write_value, (1, str(tmp_path / "q1")), []))
    queue.close()
    assert (
        queue.schedule_async_request(AsyncRequest(write_value, (2, str(tmp_path / "q2")), [])) == 0
    )
    assert queue.maybe_finalize_async_calls(blocking=True) == [0]
    queue.close()
    assert load(tmp_path / "q2") == 2

    ckpt = TorchAsyncCheckpoint()
    ckpt.async_save({"step": torch.tensor(1)}, tmp_path / "c1.pt")
    ckpt.finalize_async_save(blocking=True, terminate=True)
    ckpt.async_save({"step": torch.tensor(2)}, tmp_path / "c2.pt")
    ckpt.finalize_async_save(blocking=True, terminate=True)
    for step in (1, 2):
        assert torch.load(tmp_path / f"c{step}.pt", weights_only=True)["step"].item() == step


MODULE_LEVEL_SCRIPT = """
import sys

import torch

from aiockpt.compat.nvrx.async_ckpt.core import AsyncCallsQueue, AsyncRequest
from aiockpt.compat.nvrx.async_ckpt.torch_ckpt import TorchAsyncCheckpoint

# Module-level singletons, as Megatron-style trainers keep them: the spawned worker
# imports this module again, and must not start a process while doing so.
QUEUE = AsyncCallsQueue()
CKPT = TorchAsyncCheckpoint()

if __name__ == "__main__":
    out = sys.argv[1]
    CKPT.async_save({"w": torch.full((3,), 7.0)}, out + "/ckpt.pt")
    print("finalized", CKPT.finalize_async_save(blocking=True))
    QUEUE.schedule_async_request(AsyncRequest(torch.save, ({"x": torch.ones(2)}, out + "/q.pt"), []))
    print("finalized", QUEUE.maybe_finalize_async_calls(blocking=True))
    QUEUE.close()
    CKPT.close()
"""


def test_module_level_queue_works_with_the_spawned_worker(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(MODULE_LEVEL_SCRIPT))
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["finalized [0]", "finalized [0]"], proc.stderr
    assert torch.equal(
        torch.load(tmp_path / "ckpt.pt", weights_only=True)["w"], torch.full((3,), 7.0)
    )
    assert torch.equal(torch.load(tmp_path / "q.pt", weights_only=True)["x"], torch.ones(2))


def test_warmed_up_worker_is_taken_over_by_the_first_queue(tmp_path: Path) -> None:
    AsyncCallsQueue.warmup_persistent_caller(0, cpu_priority=4)
    warm = AsyncCallsQueue._warm_caller
    assert warm is not None and warm.process is not None
    pid = warm.process.pid
    queue = AsyncCallsQueue()
    try:
        queue.schedule_async_request(
            AsyncRequest(report_priorities, (None, str(tmp_path / "p")), [])
        )
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]
        assert AsyncCallsQueue._warm_caller is None
        assert queue._engine._persistent_caller is warm
        with open(tmp_path / "p") as f:
            assert f.read().split()[:2] == [str(pid), "4"]
    finally:
        queue.close()


# -- worker priorities ------------------------------------------------------------------


def report_priorities(state: Any, path: str) -> None:
    """Worker side: write this process's pid, nice value and I/O class."""
    io = get_io_priority()
    with open(path, "w") as f:
        f.write(f"{os.getpid()} {os.nice(0)} {io[0] if io else 'unsupported'}")


def _proc_nice(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[16])  # field 19 of stat(5); the split dropped pid and comm


def _io_supported() -> bool:
    try:
        return get_io_priority() is not None
    except OSError:
        return False


@pytest.mark.skipif(not _io_supported(), reason="ioprio_get is not available on this machine")
@pytest.mark.parametrize("persistent", [False, True], ids=["fork", "persistent"])
def test_worker_runs_with_the_requested_cpu_and_io_priority(
    tmp_path: Path, persistent: bool
) -> None:
    base = os.nice(0)
    queue = AsyncCallsQueue(persistent=persistent, cpu_priority=min(base + 6, 19), io_priority=3)
    try:
        if persistent:
            queue.reserve({"w": torch.zeros(1)})  # starts the worker and waits until ready
            caller = queue._engine._persistent_caller
            assert caller is not None and caller.process is not None
            pid = caller.process.pid
            assert pid is not None
            assert _proc_nice(pid) == min(base + 6, 19)
            assert get_io_priority(pid) == (3, 0)
        queue.schedule_async_request(
            AsyncRequest(report_priorities, (None, str(tmp_path / "p")), [])
        )
        queue.maybe_finalize_async_calls(blocking=True)
        with open(tmp_path / "p") as f:
            _, nice, io_class = f.read().split()
        assert (int(nice), io_class) == (min(base + 6, 19), "3")
    finally:
        queue.close()
    assert os.nice(0) == base and get_io_priority() != (3, 0)  # the caller is untouched


def test_priority_options_are_checked() -> None:
    with pytest.raises(InvalidRequestError, match="cpu_priority"):
        AsyncCallsQueue(cpu_priority=25)
    with pytest.raises(InvalidRequestError, match="io_priority"):
        AsyncCallsQueue(io_priority=7)
    with pytest.raises(InvalidRequestError, match="sigterm_timeout"):
        AsyncCallsQueue(sigterm_timeout=-1)


# -- the one behavioural difference -----------------------------------------------------


def test_failed_save_raises_and_the_loop_keeps_training(tmp_path: Path) -> None:
    ckpt = TorchAsyncCheckpoint()
    logged: list[str] = []
    try:
        ckpt.async_save({"w": torch.ones(1)}, tmp_path / "ok.pt")
        ckpt.queue.schedule_async_request(AsyncRequest(write_value, (1, "/proc/no/such/file"), []))
        ckpt.async_save({"w": torch.ones(1)}, tmp_path / "after.pt")
        finalized: list[int] = []
        while len(finalized) + len(logged) < 3:
            try:  # the two-line pattern of docs/how-to/migrate-from-nvrx.md
                finalized += ckpt.finalize_async_save(blocking=True)
            except CheckpointError as err:
                logged.append(str(err))
                finalized += err.finalized_call_idxs
    finally:
        ckpt.close()
    assert finalized == [0, 2] and len(logged) == 1 and "call 1" in logged[0]


# -- the DCP path -----------------------------------------------------------------------


def test_cached_metadata_reader_shares_metadata_until_the_checkpoint_changes(
    tmp_path: Path,
) -> None:
    import torch.distributed.checkpoint as dcp

    from aiockpt.compat.nvrx.cached_metadata_filesystem_reader import (
        CachedMetadataFileSystemReader,
    )

    CachedMetadataFileSystemReader.clear_metadata_cache()
    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(tmp_path), no_dist=True)
    first = CachedMetadataFileSystemReader(tmp_path).read_metadata()
    assert CachedMetadataFileSystemReader(tmp_path).read_metadata() is first
    assert (
        CachedMetadataFileSystemReader(tmp_path, cache_metadata=False).read_metadata() is not first
    )
    dcp.save({"w": torch.ones(2), "v": torch.zeros(1)}, checkpoint_id=str(tmp_path), no_dist=True)
    again = CachedMetadataFileSystemReader(tmp_path).read_metadata()
    assert sorted(again.state_dict_metadata) == ["v", "w"]
    out = {"w": torch.zeros(2), "v": torch.ones(1)}
    dcp.load(out, storage_reader=CachedMetadataFileSystemReader(tmp_path), no_dist=True)
    assert torch.equal(out["w"], torch.ones(2)) and torch.equal(out["v"], torch.zeros(1))
    CachedMetadataFileSystemReader.clear_metadata_cache()


def test_a_reader_served_from_the_metadata_cache_still_checks_the_data(tmp_path: Path) -> None:
    # The second reader gets the metadata from the cache: it must still check each data
    # file against the checksum sidecar. Before, a cache hit loaded a damaged file as is.
    import torch.distributed.checkpoint as dcp
    from ckpt_helpers import data_file
    from torch.distributed.checkpoint.api import CheckpointException

    from aiockpt import CorruptCheckpointError
    from aiockpt.compat.nvrx.cached_metadata_filesystem_reader import (
        CachedMetadataFileSystemReader,
    )
    from aiockpt.dcp import DCPCheckpoint

    CachedMetadataFileSystemReader.clear_metadata_cache()
    ckpt = DCPCheckpoint(persistent=False)
    ckpt.async_save({"w": torch.arange(1024.0)}, tmp_path)
    ckpt.finalize_async_save(blocking=True, terminate=True)
    out = {"w": torch.zeros(1024)}
    dcp.load(out, storage_reader=CachedMetadataFileSystemReader(tmp_path), no_dist=True)
    assert torch.equal(out["w"], torch.arange(1024.0))
    shard = data_file(tmp_path, "__0_0.distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointException) as info:  # DCP wraps the reader's error
        dcp.load(out, storage_reader=CachedMetadataFileSystemReader(tmp_path), no_dist=True)
    assert "is corrupt" in str(info.value) and CorruptCheckpointError.__name__ in str(info.value)
    CachedMetadataFileSystemReader.clear_metadata_cache()

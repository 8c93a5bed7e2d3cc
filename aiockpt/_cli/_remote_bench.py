"""``aiockpt bench --remote [URL]``: saving to an object store, against DCP's fsspec writer.

For every contender, interleaved round by round on the same state dict (the first round
cold, the next ``--saves`` warm): the time from the save call until the checkpoint is
committed locally (two tiers only) and until it is committed in the store; the warm runs'
median and spread; throughput. The contenders:

- a floor: the state's raw bytes written as one object by obstore's writer (multipart,
  aiockpt's part size and concurrency): what the store and the link allow;
- aiockpt with two tiers (``CheckpointManager(local=DIR, remote=URL)``): committed locally,
  then uploaded from the committed files in the background;
- aiockpt with one tier straight to the store (``CheckpointManager(URL)``);
- ``torch.distributed.checkpoint.save`` through its ``FsspecWriter`` (s3fs), with the
  default thread and with 8 threads (``sync_files=False``: an object has nothing to fsync,
  and DCP's fallback, ``os.sync()`` of the whole machine, would only add noise).

Without a URL, an S3 server is started on loopback for the run (moto's server mode, in a
process of its own, stopped at the end); with one (``s3://bucket/prefix``), the run writes
under a fresh prefix below it, with the credentials and endpoint of the environment
(``AWS_*``), and deletes what it wrote. Each run's objects are deleted once measured.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any

import torch

from .._staging._tree import iter_tensors
from .._steps import step_name
from ._bench import parse_size, state_bytes, training_state

ACCESS_KEY = "aiockpt-bench-key"
SECRET_KEY = "aiockpt-bench-secret"
REGION = "us-east-1"
BUCKET = "aiockpt-bench"
UPLOAD_TIMEOUT = 3600.0  # seconds a save may take before it is reported as failed

FLOOR_PUT = "floor: raw bytes, obstore"
TWO_TIERS = "aiockpt (two tiers)"
ONE_TIER = "aiockpt (one tier)"
DCP_FSSPEC = "dcp.save (FsspecWriter)"
DCP_FSSPEC_8 = "dcp.save (FsspecWriter, 8 thr)"
REMOTE_NAMES = (FLOOR_PUT, TWO_TIERS, ONE_TIER, DCP_FSSPEC, DCP_FSSPEC_8)


# -- the loopback server -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackS3:
    """``python -m moto.server`` on ``127.0.0.1``, in a process (and session) of its own:
    :meth:`start` waits until it answers, :meth:`stop` kills it and reaps it. Its objects
    live in that process (those above 5 MiB spill to temporary files), gone when it stops.
    """

    def __init__(self) -> None:
        self.port = 0
        self.endpoint = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> LoopbackS3:
        if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
            raise SystemExit(
                "aiockpt bench --remote without a URL starts a loopback S3 server, which "
                "needs moto's server mode: pip install 'moto[server]' (or pass --remote URL)"
            )
        for _ in range(3):  # the free port may be taken before the server binds it
            self.port = _free_port()
            self.endpoint = f"http://127.0.0.1:{self.port}"
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C on the terminal reaches the bench only
            )
            if self._wait_answer(timeout):
                return self
            self.stop()
        raise RuntimeError("the loopback S3 server (moto) did not start")

    def _wait_answer(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                return True
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)

    def make_bucket(self, name: str) -> None:
        """Create the bucket ``name`` (moto's server takes an unsigned request)."""
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        urllib.request.urlopen(request, timeout=30).close()

    def options(self) -> dict[str, Any]:
        """aiockpt's ``storage_options`` (obstore) for this server."""
        return {
            "endpoint": self.endpoint,
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
            "region": REGION,
            "allow_http": True,
        }

    def fsspec_options(self) -> dict[str, Any]:
        """s3fs's options (``FsspecWriter(path, **options)``) for this server."""
        return {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "endpoint_url": self.endpoint,
            "client_kwargs": {"region_name": REGION},
        }

    def __enter__(self) -> LoopbackS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def _terminated_as_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit while the bench runs, so that its ``finally``
    blocks stop the server and delete what was written (a default SIGTERM skips them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


# -- where to write ----------------------------------------------------------------------


@dataclass
class Target:
    """A fresh prefix in a store, and how each client reaches it (None: the environment)."""

    url: str
    options: dict[str, Any] | None
    fsspec: dict[str, Any]
    where: str

    def storage(self) -> Any:
        from ..storage._object import ObjectStorage

        return ObjectStorage(self.options)

    def remove(self, url: str) -> None:
        """Delete every object under the prefix ``url``."""
        storage = self.storage()
        storage.delete([o["path"] for o in storage.list_objects(url)])


# -- the contenders ----------------------------------------------------------------------


@dataclass
class RemoteStats:
    """One contender's figures (seconds; ``local`` for two tiers only)."""

    name: str
    kind: str  # "floor", "aiockpt" or "peer"
    blocked: list[float] = field(default_factory=list)
    local: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)
    failed: str | None = None

    def summary(self, nbytes: int) -> dict[str, Any]:
        def spread(values: list[float]) -> dict[str, Any] | None:
            warm = values[1:] or values
            if not warm:
                return None
            return {
                "cold": values[0],
                "median": statistics.median(warm),
                "min": min(warm),
                "max": max(warm),
            }

        done = spread(self.done)
        return {
            "name": self.name,
            "kind": self.kind,
            "blocked_s": spread(self.blocked),
            "local_s": spread(self.local),
            "committed_s": done,
            "mib_per_s": nbytes / 2**20 / done["median"] if done and done["median"] else None,
            "failed": self.failed,
        }


# (blocked, to local commit or None, to committed in the store), seconds from the call
RemoteTiming = tuple[float, float | None, float]


class RemoteContender:
    """One way to put a state into the store, under ``self.url``."""

    name = ""
    kind = "peer"

    def __init__(self, target: Target, slug: str) -> None:
        self.target = target
        self.url = f"{target.url}/{slug}"

    def open(self) -> None:
        """Set up before the first save (not timed)."""

    def save(self, state: Any, step: int) -> RemoteTiming:
        raise NotImplementedError

    def remove(self, step: int) -> None:
        """Delete what the save of ``step`` wrote (after it was measured)."""
        self.target.remove(f"{self.url}/{step_name(step)}")

    def close(self) -> None:
        """Stop what :meth:`open` started; delete everything under :attr:`url`."""
        self.target.remove(self.url)


class PutFloor(RemoteContender):
    """The tensors' raw bytes written as one object by obstore's writer, with aiockpt's
    part size and concurrency: what the store and the link allow."""

    name, kind = FLOOR_PUT, "floor"

    def save(self, state: Any, step: int) -> RemoteTiming:
        import obstore

        storage = self.target.storage()
        store, key = storage.locate(f"{self.url}/{step_name(step)}/data")
        tensors = [t.contiguous().view(torch.uint8).numpy() for t in iter_tensors(state)]
        t = time.perf_counter()
        with obstore.open_writer(
            store, key, buffer_size=storage.part_size, max_concurrency=storage.concurrency
        ) as out:
            for array in tensors:
                out.write(memoryview(array.data).cast("B"))
        d = time.perf_counter() - t
        return d, None, d


class TwoTiers(RemoteContender):
    """``CheckpointManager(local=DIR, remote=URL)``: ``save``, ``poll(blocking=True)``
    (committed locally), ``wait_uploaded`` (committed in the store)."""

    name, kind = TWO_TIERS, "aiockpt"

    def __init__(self, target: Target, slug: str, local: str) -> None:
        super().__init__(target, slug)
        self.local = local
        self.mgr: Any = None

    def open(self) -> None:
        from .. import CheckpointManager

        self.mgr = CheckpointManager(
            local=self.local,
            remote=self.url,
            keep_local=1,
            storage_options=self.target.options,
        )

    def save(self, state: Any, step: int) -> RemoteTiming:
        t = time.perf_counter()
        self.mgr.save(step, state)
        blocked = time.perf_counter() - t
        self.mgr.poll(blocking=True)
        local = time.perf_counter() - t
        self.mgr.wait_uploaded(step, timeout=UPLOAD_TIMEOUT)
        return blocked, local, time.perf_counter() - t

    def close(self) -> None:
        try:
            if self.mgr is not None:
                self.mgr.close()
        finally:
            shutil.rmtree(self.local, ignore_errors=True)
            super().close()


class OneTier(RemoteContender):
    """``CheckpointManager(URL)``: ``save``, ``poll(blocking=True)`` (committed)."""

    name, kind = ONE_TIER, "aiockpt"

    def __init__(self, target: Target, slug: str) -> None:
        super().__init__(target, slug)
        self.mgr: Any = None

    def open(self) -> None:
        from .. import CheckpointManager

        self.mgr = CheckpointManager(self.url, storage_options=self.target.options)

    def save(self, state: Any, step: int) -> RemoteTiming:
        t = time.perf_counter()
        self.mgr.save(step, state)
        blocked = time.perf_counter() - t
        self.mgr.poll(blocking=True)
        d = time.perf_counter() - t
        return blocked, None, d

    def close(self) -> None:
        try:
            if self.mgr is not None:
                self.mgr.close()
        finally:
            super().close()


class DCPFsspec(RemoteContender):
    """``torch.distributed.checkpoint.save(state, storage_writer=FsspecWriter(URL, ...))``
    with s3fs configured for the store, blocking until done."""

    name = DCP_FSSPEC

    def __init__(self, target: Target, slug: str, threads: int) -> None:
        super().__init__(target, slug)
        self.threads = threads
        if threads != 1:
            self.name = DCP_FSSPEC_8

    def save(self, state: Any, step: int) -> RemoteTiming:
        # Not exported by torch.distributed.checkpoint in torch 2.13: its own module.
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
        from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

        writer = FsspecWriter(
            f"{self.url}/{step_name(step)}",
            sync_files=False,
            thread_count=self.threads,
            **self.target.fsspec,
        )
        t = time.perf_counter()
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp_save(state, storage_writer=writer)
        d = time.perf_counter() - t
        return d, None, d


def make_remote(name: str, target: Target, local_dir: str) -> RemoteContender:
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    if name == FLOOR_PUT:
        return PutFloor(target, slug)
    if name == TWO_TIERS:
        return TwoTiers(target, slug, tempfile.mkdtemp(prefix="two-tiers-", dir=local_dir))
    if name == ONE_TIER:
        return OneTier(target, slug)
    if name == DCP_FSSPEC:
        return DCPFsspec(target, slug, threads=1)
    if name == DCP_FSSPEC_8:
        return DCPFsspec(target, slug, threads=8)
    raise ValueError(f"no remote contender {name!r}")


def remote_selected(only: list[str] | None) -> list[str]:
    """The remote contenders whose name has one of ``only`` (all without), and the floor."""
    return [
        n for n in REMOTE_NAMES if only is None or n == FLOOR_PUT or any(word in n for word in only)
    ]


# -- the run -----------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def run_remote_bench(
    target: Target,
    size: int,
    saves: int,
    local_dir: str,
    names: list[str] | None = None,
    progress: Callable[[str], None] = lambda msg: None,
    *,
    state: Any = None,
) -> dict[str, Any]:
    """Run the contenders ``names`` (all by default) ``saves + 1`` times each, interleaved
    round by round (each round starting one contender further); returns the JSON-ready
    report. A contender that fails (to set up or to
    save) is reported as failed, with the reason, and not run again."""
    if state is None:
        state = training_state(size)
    nbytes = state_bytes(state)
    chosen = [make_remote(n, target, local_dir) for n in (names or REMOTE_NAMES)]
    stats = {c.name: RemoteStats(c.name, c.kind) for c in chosen}
    opened: list[RemoteContender] = []
    try:
        for contender in chosen:
            try:
                contender.open()
            except Exception as exc:
                stats[contender.name].failed = _reason(exc)
                progress(f"  {contender.name} failed to start: {stats[contender.name].failed}")
            opened.append(contender)  # closed in any case (it may hold a worker or a lease)
        for rnd in range(saves + 1):
            # Each round starts with the next contender: none always follows the same one
            # (a server still busy with the previous run's deletions slows who comes next).
            shift = rnd % len(chosen) if chosen else 0
            for contender in chosen[shift:] + chosen[:shift]:
                s = stats[contender.name]
                if s.failed is not None:
                    continue
                step = rnd + 1
                progress(f"[round {rnd + 1}/{saves + 1}] {contender.name}")
                try:
                    blocked, local, done = contender.save(state, step)
                except Exception as exc:
                    s.failed = _reason(exc)
                    progress(f"  {contender.name} failed: {s.failed}")
                else:
                    s.blocked.append(blocked)
                    if local is not None:
                        s.local.append(local)
                    s.done.append(done)
                    progress(f"  {done:.2f} s, {nbytes / 2**20 / done:.0f} MiB/s")
                finally:
                    with contextlib.suppress(Exception):
                        contender.remove(step)
    finally:
        for contender in reversed(opened):
            try:
                contender.close()
            except Exception as exc:
                progress(f"  closing {contender.name} failed: {_reason(exc)}")
    return {
        "store": target.where,
        "url": target.url,
        "state_bytes": nbytes,
        "tensors": len(iter_tensors(state)),
        "warm_saves": saves,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": list(os.getloadavg()),  # other work on the machine, at the end
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "contenders": [s.summary(nbytes) for s in stats.values()],
        "raw": {n: asdict(s) for n, s in stats.items()},
    }


def format_remote_table(report: dict[str, Any]) -> str:
    def med(v: dict[str, Any] | None) -> str:
        return "-" if v is None else f"{v['median']:.2f}"

    def rng(v: dict[str, Any] | None) -> str:
        return "" if v is None else f"{v['min']:.2f}-{v['max']:.2f}"

    def cold(v: dict[str, Any] | None) -> str:
        return "-" if v is None else f"{v['cold']:.2f}"

    lines = [
        f"store: {report['store']}",
        f"machine: {report['machine']['cpus']} CPUs, load average "
        f"{report['machine']['load_average'][1]:.1f} over the last 5 min of the run",
        f"state dict: {report['state_bytes'] / 2**30:.2f} GiB in {report['tensors']} tensors; "
        f"{report['warm_saves']} warm run(s) per contender after a cold one, interleaved; "
        "times in s from the save call: warm median (min-max)",
        f"{'contender':32}{'blocked':>9}{'to local commit':>20}"
        f"{'to committed in store':>24}{'MiB/s':>8}{'cold':>8}",
    ]
    for r in report["contenders"]:
        if r["failed"]:
            lines.append(f"{r['name']:32}  failed: {r['failed']}")
            continue
        b = r["blocked_s"]  # dcp.save blocks throughout
        blocked = "-" if r["kind"] == "floor" or b is None else f"{b['median']:.3f}"
        local = r["local_s"]
        done = r["committed_s"]
        mibs = "-" if r["mib_per_s"] is None else f"{r['mib_per_s']:.0f}"
        local_text = "-" if local is None else f"{med(local)} ({rng(local)})"
        done_text = "-" if done is None else f"{med(done)} ({rng(done)})"
        lines.append(
            f"{r['name']:32}{blocked:>9}{local_text:>20}{done_text:>24}{mibs:>8}{cold(done):>8}"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def target_for(url: str) -> Iterator[Target]:
    """The store to write to: a fresh prefix under ``url``, or (``url`` empty) a bucket in
    a loopback server started for the run and stopped at the end."""
    token = secrets.token_hex(4)
    if url:
        from .._exceptions import InvalidRequestError
        from ..storage._urls import split_url

        try:
            split_url(url)
        except InvalidRequestError as exc:
            raise SystemExit(f"aiockpt bench --remote: {exc}") from None
        base = url.rstrip("/")
        target = Target(f"{base}/aiockpt-bench-{token}", None, {}, base)
        try:
            yield target
        finally:
            with contextlib.suppress(Exception):
                target.remove(target.url)
        return
    with LoopbackS3() as server:
        server.make_bucket(BUCKET)
        yield Target(
            f"s3://{BUCKET}/run-{token}",
            server.options(),
            server.fsspec_options(),
            f"loopback S3 server (moto {_version('moto')}, one process) at {server.endpoint}",
        )


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def main(args: Any) -> int:
    if args.sweep or args.tensors or args.plot:
        raise SystemExit("aiockpt bench --remote takes --size, --saves, --only, --dir, --json")
    size = parse_size(args.size or "1GiB")
    directory = tempfile.mkdtemp(prefix="aiockpt-bench-", dir=args.dir)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        with _terminated_as_exit(), target_for(args.remote) as target:
            progress(f"writing to {target.url} ({target.where})")
            report = run_remote_bench(
                target, size, args.saves, directory, remote_selected(args.only), progress
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(format_remote_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nJSON written to {args.json}")
    return 0

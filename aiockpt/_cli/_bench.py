"""``aiockpt bench``: aiockpt against what users would use instead, in one run.

For every contender, interleaved round by round on the same state dict: the caller's
blocked time per save (cold: the first; warm: the median of the rest), the time until the
checkpoint is durable, throughput, peak extra memory during a save, memory added across
saves, and the event loop's worst lag (async contender). Floors: an in-place ``copy_`` of
the same tensors (blocked time) and a raw write + fsync of the same bytes (durability).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
import torch

from .._staging._tree import iter_tensors
from ._contenders import NAMES, Contender, selected
from ._contenders import contenders as make_contenders

_SIZE = re.compile(r"^\s*([\d.]+)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _psutil() -> Any:
    """psutil, which the memory figures need (an optional dependency)."""
    try:
        import psutil
    except ImportError as exc:
        raise SystemExit(
            "aiockpt bench measures memory with psutil: pip install 'aiockpt[bench]'"
        ) from exc
    return psutil


def parse_size(text: str) -> int:
    """``"1GiB"``, ``"512MiB"``, ``"64M"``, ``"1000"`` -> bytes."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"cannot read size {text!r}; write it like 1GiB or 256MiB")
    unit = match.group(2).upper()[:1]
    return int(float(match.group(1)) * _UNITS[unit])


def training_state(nbytes: int) -> dict[str, Any]:
    """A training-like state dict of about ``nbytes``: a few large float32 weights, many
    small bfloat16 norms and int64 buffers, optimizer-like moments, non-tensor entries."""
    big = max(nbytes * 6 // 10 // 8 // 4, 1)
    moments = max(nbytes * 3 // 10 // 8 // 4, 1)
    small = max(nbytes // 10 // 300 // 2, 1)
    return {
        "model": {
            **{f"layers.{i}.weight": torch.randn(big) for i in range(8)},
            **{f"norms.{i}.weight": torch.randn(small).to(torch.bfloat16) for i in range(200)},
            **{f"buffers.{i}": torch.arange(small // 4 + 1) for i in range(100)},
        },
        "optim": {
            "state": {i: {"exp_avg": torch.zeros(moments)} for i in range(8)},
            "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "params": list(range(8))}],
        },
        "step": 1000,
        "meta": {"run": "bench", "schedule": [1, 2, 3]},
    }


def uniform_state(nbytes: int, tensors: int) -> dict[str, Any]:
    """``tensors`` float32 tensors of ``nbytes`` in total, split evenly, each with its own
    storage: the many-tensor shape of optimizer states and per-layer parameters."""
    numel = max(nbytes // 4 // tensors, 1)
    return {f"layers.{i}.weight": torch.empty(numel).uniform_() for i in range(tensors)}


def state_bytes(state: Any) -> int:
    return sum(t.numel() * t.element_size() for t in iter_tensors(state))


class MemorySampler:
    """Samples this process's RSS plus its children's private memory every few ms."""

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self._psutil = _psutil()
        self._proc = self._psutil.Process()
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aiockpt-bench-rss", daemon=True)
        self._thread.start()

    def current(self) -> int:
        total = self._proc.memory_info().rss
        for child in self._proc.children(recursive=True):
            try:
                info = child.memory_info()
                total += max(info.rss - info.shared, 0)
            except self._psutil.Error:
                continue
        return int(total)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._peak = max(self._peak, self.current())

    def reset_peak(self) -> int:
        now = self.current()
        self._peak = now
        return now

    @property
    def peak(self) -> int:
        return max(self._peak, self.current())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Stats:
    """One contender's figures (seconds, bytes)."""

    name: str
    kind: str  # "peer", "aiockpt" or "floor"
    blocked: list[float] = field(default_factory=list)
    durable: list[float] = field(default_factory=list)
    peak_extra: list[int] = field(default_factory=list)
    rss_after: list[int] = field(default_factory=list)
    loop_lag: list[float] = field(default_factory=list)
    failed: str | None = None  # why a save raised; the contender is then left out

    def summary(self, nbytes: int) -> dict[str, Any]:
        warm_b = self.blocked[1:] or self.blocked
        warm_d = self.durable[1:] or self.durable
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        out["blocked_cold_s"] = self.blocked[0] if self.blocked else None
        out["blocked_warm_s"] = statistics.median(warm_b) if warm_b else None
        out["durable_s"] = statistics.median(warm_d) if warm_d else None
        out["throughput_gbps"] = nbytes / out["durable_s"] / 1e9 if out["durable_s"] else None
        out["peak_extra_bytes"] = max(self.peak_extra) if self.peak_extra else None
        # From the second save on, every contender has allocated what it keeps (buffers,
        # workers); what a later save adds is growth.
        grow = self.rss_after[-1] - self.rss_after[1] if len(self.rss_after) > 2 else None
        out["rss_growth_bytes"] = grow
        out["loop_lag_max_s"] = max(self.loop_lag) if self.loop_lag else None
        out["failed"] = self.failed
        return out


class Heartbeat:
    """A task ticking every millisecond; records how late each tick was."""

    def __init__(self) -> None:
        self.ticks: list[tuple[float, float]] = []

    async def run(self) -> None:
        while True:
            t = time.perf_counter()
            await anyio.sleep(0.001)
            now = time.perf_counter()
            self.ticks.append((now, now - t - 0.001))
            if len(self.ticks) > 200_000:
                del self.ticks[:100_000]

    def worst(self, start: float, end: float) -> float:
        return max((lag for t, lag in self.ticks if start <= t <= end), default=0.0)


def _ensure_process_group() -> str | None:
    """DCP's async_save needs torch.distributed: a one-rank gloo group if none exists,
    met through a file store (no port to race for); returns the store's directory."""
    import torch.distributed as dist

    if dist.is_initialized():
        return None
    meeting = tempfile.mkdtemp(prefix="aiockpt-bench-")
    store = os.path.join(meeting, "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    return meeting


async def run_bench(
    size: int,
    saves: int,
    directory: str,
    names: list[str] | None = None,
    progress: Callable[[str], None] = lambda msg: None,
    *,
    tensors: int | None = None,
    state: Any = None,
) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-ready report.

    The state dict is ``state`` if given, else ``tensors`` float32 tensors of ``size`` bytes
    in total, else a training-like state of ``size`` bytes. ``names`` are the contenders
    to run, exactly (all by default; :func:`selected` turns ``--only`` words into names).
    A contender whose save raises is reported as failed, with the reason, and not run
    again.
    """
    if state is None:
        state = uniform_state(size, tensors) if tensors else training_state(size)
    if names is None:
        names = list(NAMES)
    created_pg = _ensure_process_group()
    sampler = MemorySampler()
    beat = Heartbeat()
    try:
        async with (
            make_contenders(names, state, beat.worst) as chosen,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(beat.run)
            stats = {c.name: Stats(c.name, c.kind) for c in chosen}
            for rnd in range(saves + 1):
                for contender in chosen:
                    progress(f"[round {rnd + 1}/{saves + 1}] {contender.name}")
                    await _measure(
                        contender, stats[contender.name], state, directory, rnd, sampler, progress
                    )
            tg.cancel_scope.cancel()
    finally:
        sampler.close()
        if created_pg is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
            shutil.rmtree(created_pg, ignore_errors=True)
    return _report(stats, state_bytes(state), saves, len(iter_tensors(state)))


async def _measure(
    contender: Contender,
    s: Stats,
    state: Any,
    directory: str,
    rnd: int,
    sampler: MemorySampler,
    progress: Callable[[str], None],
) -> None:
    """One save of ``state`` by ``contender``, recorded in ``s`` (or its failure: a peer
    that cannot save this state is not run again)."""
    if s.failed is not None:
        return
    path = os.path.join(directory, f"r{rnd}-{re.sub(r'[^a-z]+', '-', contender.name)}")
    await anyio.to_thread.run_sync(os.sync)
    before = sampler.reset_peak()
    try:
        blocked, durable, lag = await contender.save(state, path)
    except Exception as exc:  # a peer that cannot save this state
        s.failed = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        progress(f"  {contender.name} failed: {s.failed}")
    else:
        s.blocked.append(blocked)
        s.durable.append(durable)
        s.peak_extra.append(sampler.peak - before)
        s.rss_after.append(sampler.current())
        if lag is not None:
            s.loop_lag.append(lag)
    finally:
        await anyio.to_thread.run_sync(_remove, path)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def _clean(values: list[float]) -> list[float]:
    return [v for v in values if v == v]  # drop NaN (a floor measures one side only)


def _report(stats: dict[str, Stats], nbytes: int, saves: int, tensors: int) -> dict[str, Any]:
    for s in stats.values():
        s.blocked, s.durable = _clean(s.blocked), _clean(s.durable)
    rows = [s.summary(nbytes) for s in stats.values()]
    by = {r["name"]: r for r in rows}
    copy_floor = by.get("floor: in-place copy_", {}).get("blocked_warm_s")
    write_floor = by.get("floor: raw write+fsync", {}).get("durable_s")
    for r in rows:
        r["blocked_vs_copy_floor"] = (
            r["blocked_warm_s"] / copy_floor if r["blocked_warm_s"] and copy_floor else None
        )
        r["durable_vs_write_floor"] = (
            r["durable_s"] / write_floor if r["durable_s"] and write_floor else None
        )
        b = r["blocked_warm_s"]
        r["us_per_tensor_over_copy"] = (
            (b - copy_floor) / tensors * 1e6 if b is not None and copy_floor else None
        )
    dcp = [r for r in rows if r["name"].startswith("dcp") and r["durable_s"]]
    mine = [r for r in rows if r["kind"] == "aiockpt" and r["durable_s"]]
    verdict: dict[str, Any] = {}
    if dcp and mine and copy_floor and write_floor:
        best_dcp_b = min(r["blocked_warm_s"] for r in dcp)
        best_dcp_d = min(r["durable_s"] for r in dcp)
        best_b = min(mine, key=lambda r: r["blocked_warm_s"])
        best_d = min(mine, key=lambda r: r["durable_s"])
        verdict = {
            "best_aiockpt_blocked": best_b["name"],
            "blocked_vs_copy_floor": best_b["blocked_warm_s"] / copy_floor,
            "blocked_vs_best_dcp": best_b["blocked_warm_s"] / best_dcp_b,
            "best_aiockpt_durable": best_d["name"],
            "durable_vs_write_floor": best_d["durable_s"] / write_floor,
            "durable_vs_best_dcp": best_d["durable_s"] / best_dcp_d,
        }
    return {
        "state_bytes": nbytes,
        "tensors": tensors,
        "warm_saves": saves,
        "floors": {"copy_s": copy_floor, "write_s": write_floor},
        "machine": {
            "cpus": os.cpu_count(),
            "memory_bytes": _psutil().virtual_memory().total,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "contenders": rows,
        "verdict": verdict,
        "raw": {n: asdict(s) for n, s in stats.items()},
    }


def format_table(report: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1e3:.1f}"

    def mib(v: int | None) -> str:
        return "-" if v is None else f"{v / 2**20:.0f}"

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    def us(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [
        f"state dict: {report['state_bytes'] / 2**30:.2f} GiB in {report['tensors']} tensors, "
        f"{report['warm_saves']} warm save(s) per contender, interleaved; times in ms, "
        "memory in MiB, per tensor in us",
        f"{'contender':26}{'blocked':>9}{'blocked':>9}{'vs copy':>9}{'us/t':>7}{'durable':>9}"
        f"{'vs write':>9}{'GB/s':>7}{'peak+':>7}{'growth':>7}{'loop lag':>9}",
        f"{'':26}{'cold':>9}{'warm':>9}{'floor':>9}{'+copy':>7}{'':>9}{'floor':>9}",
    ]
    for r in report["contenders"]:
        if r["failed"]:
            lines.append(f"{r['name']:26}  failed: {r['failed']}")
            continue
        gbps = "-" if r["throughput_gbps"] is None else f"{r['throughput_gbps']:.2f}"
        lines.append(
            f"{r['name']:26}{ms(r['blocked_cold_s']):>9}{ms(r['blocked_warm_s']):>9}"
            f"{x(r['blocked_vs_copy_floor']):>9}{us(r['us_per_tensor_over_copy']):>7}"
            f"{ms(r['durable_s']):>9}"
            f"{x(r['durable_vs_write_floor']):>9}{gbps:>7}{mib(r['peak_extra_bytes']):>7}"
            f"{mib(r['rss_growth_bytes']):>7}{ms(r['loop_lag_max_s']):>9}"
        )
    v = report["verdict"]
    if v:
        lines.append("")
        lines.append(
            f"warm blocked: {v['best_aiockpt_blocked']} at {v['blocked_vs_copy_floor']:.2f}x "
            f"the copy floor, {v['blocked_vs_best_dcp']:.2f}x the best DCP variant"
        )
        lines.append(
            f"to durable:   {v['best_aiockpt_durable']} at {v['durable_vs_write_floor']:.2f}x "
            f"the write floor, {v['durable_vs_best_dcp']:.2f}x the best DCP variant"
        )
    return "\n".join(lines)


def pyplot() -> Any:
    """matplotlib's pyplot drawing to files; SystemExit saying how to install it if missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'aiockpt[plot]'") from exc
    return plt


def plot(report: dict[str, Any], path: str) -> None:
    """Bar chart of warm blocked time and time to durable (needs matplotlib)."""
    plt = pyplot()
    rows = report["contenders"]
    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in (
        (axes[0], "blocked_warm_s", "training loop blocked per save (warm), ms"),
        (axes[1], "durable_s", "time until durable, ms"),
    ):
        vals = [(r[key] or 0) * 1e3 for r in rows]
        colors = [
            "#2a7" if r["kind"] == "aiockpt" else "#999" if r["kind"] == "floor" else "#c63"
            for r in rows
        ]
        ax.barh(names, vals, color=colors)
        ax.set_title(title)
        ax.invert_yaxis()
    fig.suptitle(f"aiockpt bench, {report['state_bytes'] / 2**30:.2f} GiB state dict")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args: Any) -> int:
    size = parse_size(args.size or "1GiB")
    directory = tempfile.mkdtemp(prefix="aiockpt-bench-", dir=args.dir)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        report = anyio.run(
            lambda: run_bench(
                size,
                args.saves,
                directory,
                selected(args.only, floors=True),
                progress,
                tensors=args.tensors,
            )
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(format_table(report))
    write_outputs(report, args, plot)
    return 0


def write_outputs(report: dict[str, Any], args: Any, draw: Any) -> None:
    """The report as JSON (``--json``) and as a chart drawn by ``draw`` (``--plot``)."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nJSON written to {args.json}")
    if args.plot:
        draw(report, args.plot)
        print(f"chart written to {args.plot}")

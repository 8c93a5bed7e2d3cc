"""``aiockpt bench --sweep``: how every contender scales with the tensor count and the size.

Each point of the sweep is a state dict of float32 tensors split evenly (every tensor its
own storage). At each point every contender runs on its own, one after the other, with the
memory of the previous one freed first: at 8 GiB two staging copies at once would not fit
a 24 GiB machine. Floors and contenders are those of ``aiockpt bench``.
"""

from __future__ import annotations

import functools
import gc
import shutil
import sys
import tempfile
from typing import Any

import anyio

from ._bench import parse_size, pyplot, run_bench, uniform_state, write_outputs
from ._contenders import CopyFloor, WriteFloor, selected

COUNTS = "100,1000,10000,100000"
SIZES = "256MiB,1GiB,2GiB,4GiB,8GiB"
COUNT_SIZE = "256MiB"  # the size of the tensor-count points
SIZE_COUNT = 100  # the tensor count of the size points
MAIN = "aiockpt (persistent)"  # the aiockpt contender of the summary table


def sweep_points(
    counts: str, sizes: str, count_size: int, max_size: int | None, max_tensors: int | None
) -> list[tuple[int, int]]:
    """``(tensors, bytes)`` of every point: the counts at ``count_size``, then the sizes at
    100 tensors, without repeats, within the limits."""
    points = [(int(c), count_size) for c in counts.split(",") if c.strip()]
    points += [(SIZE_COUNT, parse_size(s)) for s in sizes.split(",") if s.strip()]
    out: list[tuple[int, int]] = []
    for n, size in points:
        if (n, size) in out:
            continue
        if (max_size is None or size <= max_size) and (max_tensors is None or n <= max_tensors):
            out.append((n, size))
    return out


def run_point(
    tensors: int,
    size: int,
    saves: int,
    directory: str,
    names: list[str],
    progress: Any,
) -> dict[str, Any]:
    """Every contender of ``names`` at one point, one at a time; the point's report."""
    state = uniform_state(size, tensors)
    rows: dict[str, Any] = {}
    nbytes = 0
    # The two floors together (they hold at most one copy of the state), then each
    # contender on its own.
    floors = [n for n in names if n.startswith("floor")]
    groups = ([floors] if floors else []) + [[n] for n in names if n not in floors]
    for group in groups:
        progress(f"== {tensors} tensors, {size / 2**20:.0f} MiB: {', '.join(group)}")
        report = anyio.run(
            functools.partial(run_bench, size, saves, directory, group, progress, state=state)
        )
        nbytes = report["state_bytes"]
        rows.update({r["name"]: r for r in report["contenders"]})
        gc.collect()  # the contender's staging memory goes before the next one starts
    copy = rows.get(CopyFloor.name, {}).get("blocked_warm_s")
    write = rows.get(WriteFloor.name, {}).get("durable_s")
    plain = rows.get("torch.save", {}).get("durable_s")
    for r in rows.values():
        b, d = r.get("blocked_warm_s"), r.get("durable_s")
        r["blocked_vs_copy_floor"] = b / copy if b and copy else None
        r["us_per_tensor_over_copy"] = (b - copy) / tensors * 1e6 if b and copy else None
        r["durable_vs_write_floor"] = d / write if d and write else None
        r["durable_vs_torch_save"] = d / plain if d and plain else None
        peak = r.get("peak_extra_bytes")
        r["peak_extra_vs_state"] = peak / nbytes if peak is not None and nbytes else None
    return {"tensors": tensors, "size": size, "state_bytes": nbytes, "contenders": rows}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_point(point: dict[str, Any]) -> str:
    """One point's figures, a row per contender."""
    lines = [
        f"{point['state_bytes'] / 2**20:.0f} MiB in {point['tensors']} tensors "
        "(times in ms; us/t: blocked minus the copy floor, per tensor; peak+ / state)",
        f"{'contender':40}{'blocked':>9}{'vs copy':>9}{'us/t':>8}{'durable':>9}"
        f"{'vs write':>9}{'vs t.save':>10}{'peak+':>7}",
    ]
    for name, r in point["contenders"].items():
        if r.get("failed"):
            lines.append(f"{name:40}  failed: {r['failed']}")
            continue
        us = r["us_per_tensor_over_copy"]
        lines.append(
            f"{name:40}{_ms(r['blocked_warm_s']):>9}{_x(r['blocked_vs_copy_floor']):>9}"
            f"{'-' if us is None else f'{us:.2f}':>8}{_ms(r['durable_s']):>9}"
            f"{_x(r['durable_vs_write_floor']):>9}{_x(r['durable_vs_torch_save']):>10}"
            f"{_x(r['peak_extra_vs_state']):>7}"
        )
    return "\n".join(lines)


def _best(rows: dict[str, Any], prefix: str, key: str) -> float | None:
    values = [r[key] for n, r in rows.items() if n.startswith(prefix) and r.get(key)]
    return min(values) if values else None


def summary_table(points: list[dict[str, Any]]) -> str:
    """The scaling table (markdown): floors, aiockpt, torch.save and the best DCP variant."""
    lines = [
        "| tensors | size | copy floor | write floor | aiockpt blocked | per tensor over copy "
        "| aiockpt durable | torch.save | best DCP blocked | best DCP durable |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        rows = p["contenders"]
        main = rows.get(MAIN, {})
        us = main.get("us_per_tensor_over_copy")
        cells = [
            f"{p['tensors']:,}",
            f"{p['state_bytes'] / 2**20:.0f} MiB",
            _ms(rows.get(CopyFloor.name, {}).get("blocked_warm_s")) + " ms",
            _ms(rows.get(WriteFloor.name, {}).get("durable_s")) + " ms",
            _ms(main.get("blocked_warm_s")) + " ms",
            "-" if us is None else f"{us:.2f} µs",
            _ms(main.get("durable_s")) + " ms",
            _ms(rows.get("torch.save", {}).get("durable_s")) + " ms",
            _ms(_best(rows, "dcp", "blocked_warm_s")) + " ms",
            _ms(_best(rows, "dcp", "durable_s")) + " ms",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(report: dict[str, Any], path: str) -> None:
    """Blocked and durable time against tensor count and against size (needs matplotlib)."""
    plt = pyplot()
    points = report["points"]
    by_count = [p for p in points if p["size"] == parse_size(COUNT_SIZE)]
    by_size = [p for p in points if p["tensors"] == SIZE_COUNT]
    series = [
        ("aiockpt blocked", MAIN, "blocked_warm_s", "#2a7", "-"),
        ("aiockpt durable", MAIN, "durable_s", "#2a7", "--"),
        ("torch.save", "torch.save", "durable_s", "#c63", "--"),
        ("best DCP blocked", "dcp", "blocked_warm_s", "#36c", "-"),
        ("best DCP durable", "dcp", "durable_s", "#36c", "--"),
        ("copy floor", CopyFloor.name, "blocked_warm_s", "#999", "-"),
        ("write floor", WriteFloor.name, "durable_s", "#999", "--"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, pts, xkey, xlabel in (
        (axes[0], by_count, "tensors", f"tensors (total {COUNT_SIZE})"),
        (axes[1], by_size, "state_bytes", f"state size, GiB ({SIZE_COUNT} tensors)"),
    ):
        for label, name, key, color, style in series:
            xs, ys = [], []
            for p in pts:
                rows = p["contenders"]
                value = _best(rows, "dcp", key) if name == "dcp" else rows.get(name, {}).get(key)
                if value:
                    x = p[xkey] / 2**30 if xkey == "state_bytes" else p[xkey]
                    xs.append(x)
                    ys.append(value)
            if xs:
                ax.plot(xs, ys, style, color=color, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("aiockpt bench --sweep: blocked (solid) and durable (dashed) time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args: Any) -> int:
    """Run the sweep as the command line asked; print every point and the summary."""
    names = selected(args.only, floors=True)
    max_size = parse_size(args.max_size) if args.max_size else None
    count_size = parse_size(args.size) if args.size else parse_size(COUNT_SIZE)
    points = sweep_points(args.counts, args.sizes, count_size, max_size, args.max_tensors)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    results = []
    directory = tempfile.mkdtemp(prefix="aiockpt-sweep-", dir=args.dir)
    try:
        for tensors, size in points:
            point = run_point(tensors, size, args.saves, directory, names, progress)
            gc.collect()  # the point's state dict goes before the next one is built
            results.append(point)
            print(format_point(point) + "\n", flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(summary_table(results))
    report = {"points": results, "warm_saves": args.saves}
    write_outputs(report, args, plot_sweep)
    return 0

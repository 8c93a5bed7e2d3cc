"""Command line: ``aiockpt demo | bench | verify PATH | ls DIR | cp SRC DST`` (or
``python -m aiockpt``); PATH and DIR may be object-store URLs (``s3://bucket/run``)."""

from __future__ import annotations

import argparse
import datetime
import os
import stat
import sys
from typing import Any

from .._exceptions import CheckpointError, CheckpointNotFoundError
from ._text import clean as _clean


def _read_listing(path: str) -> dict[str, Any]:
    """What ``ls`` shows of a checkpoint: its metadata.json, or a DCP checkpoint's checksum
    sidecar (both record files, extra, created and world size)."""
    from ..dcp import CHECKSUMS
    from ..dcp._meta import read_checksums
    from ..storage._metadata import read_metadata

    try:
        marker = os.lstat(os.path.join(path, ".metadata"))
    except FileNotFoundError:
        return read_metadata(path)
    if not stat.S_ISREG(marker.st_mode):
        raise CheckpointError(".metadata is not a regular file: not a checkpoint")
    sidecar = read_checksums(path)
    if sidecar is None:
        raise CheckpointError(
            f"a DCP checkpoint without {CHECKSUMS} (removed, or not written by aiockpt): "
            "it cannot be checked, and a manager does not count it as committed"
        )
    return sidecar


def _ls_row(directory: str, name: str) -> str:
    try:
        meta = _read_listing(os.path.join(directory, name))
    except CheckpointNotFoundError:
        return f"{_clean(name, 24):24}{'':>20}{'':>7}{'':>12}  no (incomplete or in progress)"
    except CheckpointError as err:
        return f"{_clean(name, 24):24}  BAD: {_clean(err, 200)}"
    size = sum(f["nbytes"] for f in meta["files"])
    step = meta["extra"].get("step", "") if isinstance(meta.get("extra"), dict) else ""
    created = meta.get("created", 0)
    try:
        when = datetime.datetime.fromtimestamp(float(created)).isoformat(" ", "seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        when = _clean(created, 20)
    return (
        f"{_clean(name, 24):24}{_clean(step, 20):>20}{meta['world_size']:>7}"
        f"{size / 2**20:>9.1f} MiB  {when}"
    )


def _ls(directory: str) -> int:
    from .._steps import parse_step_name
    from ..storage._files import local_path
    from ..storage._metadata import METADATA

    try:
        local_path(directory)
    except CheckpointError as exc:
        print(f"aiockpt ls: {exc}", file=sys.stderr)
        return 2
    if any(os.path.isfile(os.path.join(directory, m)) for m in (METADATA, ".metadata")):
        names = [os.path.basename(os.path.normpath(directory))]
        directory = os.path.dirname(os.path.normpath(directory)) or "."
    elif os.path.isdir(directory):
        named = {n: parse_step_name(n) for n in os.listdir(directory)}
        names = sorted(named, key=lambda n: (named[n] is None, named[n] or 0, n))  # numeric
    else:
        print(f"aiockpt ls: {_clean(directory, 200)!r} is not a directory", file=sys.stderr)
        return 2
    print(f"{'checkpoint':24}{'step':>20}{'ranks':>7}{'size':>12}  committed")
    for name in names:
        path = os.path.join(directory, name)
        if os.path.islink(path) or not os.path.isdir(path):
            if name.startswith("step-"):
                kind = "a link" if os.path.islink(path) else "not a directory"
                print(f"{_clean(name, 24):24}  BAD: {kind}, not a checkpoint (ignored)")
            continue
        print(_ls_row(directory, name))
    return 0


def _verify(path: str) -> int:
    from ..dcp import verify_dcp
    from ..storage._local import verify

    # A directory with a DCP ".metadata" is a checkpoint in the DCP format.
    is_dcp = os.path.isdir(path) and os.path.lexists(os.path.join(path, ".metadata"))
    try:
        checked = verify_dcp(path) if is_dcp else verify(path)
    except CheckpointError as err:
        print(f"FAILED: {_clean(err, 500)}", file=sys.stderr)
        return 1
    for file in checked:
        print(f"ok  {_clean(file, 200)}")
    what = "file(s) match their checksums" if os.path.isdir(path) else "file matches its checksum"
    print(f"{_clean(path, 200)}: {len(checked)} {what}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aiockpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a small CPU training loop with async checkpoints")
    demo.add_argument("--steps", type=int, default=40)
    demo.add_argument("--every", type=int, default=10)
    demo.add_argument("--width", type=int, default=1536)
    demo.add_argument("--depth", type=int, default=4)
    bench = sub.add_parser("bench", help="aiockpt against torch.save and DCP, with floors")
    bench.add_argument(
        "--size",
        default=None,
        help="state dict size, e.g. 1GiB, 256MiB (default 1GiB; with --sweep, the size of "
        "the tensor-count points, default 256MiB)",
    )
    bench.add_argument(
        "--tensors",
        type=int,
        default=None,
        help="a state dict of this many float32 tensors of --size in total, split evenly",
    )
    bench.add_argument(
        "--sweep",
        action="store_true",
        help="run every contender at each tensor count (--counts, at --size) and each "
        "size (--sizes, at 100 tensors), one contender at a time",
    )
    bench.add_argument("--counts", default="100,1000,10000,100000", help="sweep tensor counts")
    bench.add_argument("--sizes", default="256MiB,1GiB,2GiB,4GiB,8GiB", help="sweep sizes")
    bench.add_argument("--max-size", default=None, help="sweep: leave out larger points")
    bench.add_argument(
        "--max-tensors", type=int, default=None, help="sweep: leave out points with more tensors"
    )
    bench.add_argument("--saves", type=int, default=3, help="warm saves per contender")
    bench.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    bench.add_argument("--only", nargs="*", default=None, help="contenders whose name has this")
    bench.add_argument("--json", default=None, help="also write the report as JSON here")
    bench.add_argument("--plot", default=None, help="also draw a PNG chart (needs matplotlib)")
    bench.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    bench.add_argument(
        "--remote",
        nargs="?",
        const="",
        default=None,
        metavar="URL",
        help="save to an object store instead: s3://bucket/prefix (credentials from AWS_*), "
        "or without URL a loopback S3 server (moto) started for the run",
    )
    verify = sub.add_parser(
        "verify",
        help="check a committed checkpoint (directory, single file or DCP format) against its checksums",
    )
    verify.add_argument("path")
    ls = sub.add_parser("ls", help="list the checkpoints in a directory (or s3://... prefix)")
    ls.add_argument("directory")
    cp = sub.add_parser(
        "cp", help="copy a committed step between a directory and an object store (s3://...)"
    )
    cp.add_argument("src")
    cp.add_argument("dst")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        return run_demo(args.steps, args.every, args.width, args.depth)
    if args.command == "bench" and args.remote is not None:
        from ._remote_bench import main as remote_main

        return remote_main(args)
    if args.command == "bench" and args.sweep:
        from ._sweep import main as sweep_main

        return sweep_main(args)
    if args.command == "bench":
        from ._bench import main as bench_main

        return bench_main(args)
    if args.command in ("verify", "ls", "cp"):
        from ..storage._urls import is_url

        target = {"verify": "path", "ls": "directory", "cp": "src"}[args.command]
        if args.command == "cp" or is_url(getattr(args, target)):
            from . import _remote

            if args.command == "cp":
                return _remote.cp(args.src, args.dst)
            if args.command == "ls":
                return _remote.ls_url(args.directory)
            return _remote.verify_url(args.path)
    if args.command == "verify":
        return _verify(args.path)
    return _ls(args.directory)

"""Command line: ``aiockpt demo | bench | verify PATH | ls DIR`` (or ``python -m aiockpt``)."""

from __future__ import annotations

import argparse
import datetime
import os
import sys

from ._exceptions import CheckpointError


def _ls(directory: str) -> int:
    from ._storage import METADATA, read_metadata

    entries = []
    if os.path.exists(os.path.join(directory, METADATA)):
        entries = [os.path.basename(os.path.normpath(directory))]
        directory = os.path.dirname(os.path.normpath(directory)) or "."
    elif os.path.isdir(directory):
        entries = sorted(os.listdir(directory))
    else:
        print(f"aiockpt ls: {directory!r} is not a directory", file=sys.stderr)
        return 2
    print(f"{'checkpoint':24}{'step':>10}{'ranks':>7}{'size':>12}  committed")
    for name in entries:
        path = os.path.join(directory, name)
        if not os.path.isdir(path):
            continue
        try:
            meta = read_metadata(path)
        except CheckpointError:
            if name.startswith("step-"):
                print(f"{name:24}{'':>10}{'':>7}{'':>12}  no (incomplete or in progress)")
            continue
        size = sum(int(f.get("nbytes", 0)) for f in meta["files"])
        step = meta.get("extra", {}).get("step", "")
        when = datetime.datetime.fromtimestamp(meta.get("created", 0)).isoformat(" ", "seconds")
        print(f"{name:24}{step!s:>10}{meta['world_size']:>7}{size / 2**20:>9.1f} MiB  {when}")
    return 0


def _verify(path: str) -> int:
    from ._storage import verify

    if os.path.exists(os.path.join(path, ".metadata")):  # a DCP-format checkpoint
        from .dcp import verify_dcp as verify
    try:
        checked = verify(path)
    except CheckpointError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    for file in checked:
        print(f"ok  {file}")
    print(f"{path}: {len(checked)} file(s) match their checksums")
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
    bench.add_argument("--size", default="1GiB", help="state dict size, e.g. 1GiB, 256MiB")
    bench.add_argument("--saves", type=int, default=3, help="warm saves per contender")
    bench.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    bench.add_argument("--only", nargs="*", default=None, help="contenders whose name has this")
    bench.add_argument("--json", default=None, help="also write the report as JSON here")
    bench.add_argument("--plot", default=None, help="also draw a PNG chart (needs matplotlib)")
    bench.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    verify = sub.add_parser(
        "verify", help="check a committed checkpoint's checksums (aiockpt or DCP format)"
    )
    verify.add_argument("path")
    ls = sub.add_parser("ls", help="list the checkpoints in a directory")
    ls.add_argument("directory")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        return run_demo(args.steps, args.every, args.width, args.depth)
    if args.command == "bench":
        from ._bench import main as bench_main

        return bench_main(args)
    if args.command == "verify":
        return _verify(args.path)
    return _ls(args.directory)


if __name__ == "__main__":
    sys.exit(main())

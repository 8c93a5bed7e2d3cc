"""Command line: ``python -m aiockpt demo`` (also installed as ``aiockpt``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aiockpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a small CPU training loop with async checkpoints")
    demo.add_argument("--steps", type=int, default=40)
    demo.add_argument("--every", type=int, default=10)
    demo.add_argument("--width", type=int, default=1536)
    demo.add_argument("--depth", type=int, default=4)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        return run_demo(args.steps, args.every, args.width, args.depth)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())

"""``python -m aiockpt``: the command line (:mod:`aiockpt._cli`)."""

from __future__ import annotations

import sys

from ._cli._main import main as main

if __name__ == "__main__":
    sys.exit(main())

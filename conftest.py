"""Runs the code blocks of README.md and of every page in docs/ as tests (with sybil).

Each document runs in a fresh temporary directory (its blocks share it, and share one
namespace, top to bottom). What runs, by the block's language:

- ``python``: executed; a block fails if it raises.
- ``bash``: run with ``bash -euo pipefail`` and this interpreter's ``bin`` directory first on
  ``PATH`` (so ``aiockpt`` and ``python`` are the installed ones); fails on a non-zero exit.
- ``json``: parsed; fails if it is not JSON.
- ``diff``: the new side (added ``+`` and context lines) is executed as Python, and must
  add something: a migration diff's new imports must import.
- ``python title="NAME"``: written to the file NAME (a script a later ``bash`` block runs,
  e.g. under torchrun), not executed in place.
- ``text``: diagrams and program output; nothing to run.

``<!-- skip: next "reason" -->`` before a block skips it, with the reason shown in the test
report; it is for blocks that need torchrun, a GPU, or minutes of machine time, and each
says in the page which test runs its runnable version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from typing import Any

from sybil import Document, Example, Region, Sybil
from sybil.parsers.abstract.lexers import LexerCollection
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser
from sybil.parsers.markdown.lexers import FencedCodeBlockLexer

BIN = os.path.dirname(sys.executable)
SHELL_TIMEOUT_S = 300


def run_shell(example: Example) -> None:
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", example.parsed],
        capture_output=True,
        text=True,
        env=env,
        timeout=SHELL_TIMEOUT_S,
    )
    if out.returncode != 0:
        raise AssertionError(
            f"shell block exited with {out.returncode}\n"
            f"--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"
        )
    example.namespace["shell_output"] = out.stdout


def parse_json(example: Example) -> None:
    json.loads(example.parsed)


def run_diff(example: Example) -> None:
    lines = example.parsed.splitlines()
    assert any(line.startswith("+") for line in lines), "a diff block adds nothing"
    new_side = [line[1:] for line in lines if line.startswith(("+", " "))]
    exec(compile("\n".join(new_side), example.path, "exec"), example.namespace)


TITLED = re.compile(r'^python title="([\w.-]+)"$')


def write_file(example: Example) -> None:
    name, source = example.parsed
    with open(name, "w") as f:
        f.write(source)


class FileBlockParser:
    """```python title="train.py"``` blocks: their source is written to that file."""

    def __init__(self) -> None:
        self.lexers = LexerCollection(
            [
                FencedCodeBlockLexer(
                    language=r".+", mapping={"language": "arguments", "source": "source"}
                )
            ]
        )

    def __call__(self, document: Document) -> Iterable[Region]:
        for region in self.lexers(document):
            match = TITLED.match(region.lexemes["arguments"])
            if match:
                region.parsed = (match.group(1), str(region.lexemes["source"]))
                region.evaluator = write_file
                yield region


def setup(namespace: dict[str, Any]) -> None:
    # Snippets are scripts: their `if __name__ == "__main__":` guard is true.
    namespace["__name__"] = "__main__"
    namespace["_cwd"] = os.getcwd()
    namespace["_tmp"] = tempfile.mkdtemp(prefix="aiockpt-doc-")
    os.chdir(namespace["_tmp"])


def teardown(namespace: dict[str, Any]) -> None:
    os.chdir(namespace["_cwd"])
    shutil.rmtree(namespace["_tmp"], ignore_errors=True)


pytest_collect_file = Sybil(
    parsers=[
        PythonCodeBlockParser(),
        CodeBlockParser(language="bash", evaluator=run_shell),
        CodeBlockParser(language="json", evaluator=parse_json),
        CodeBlockParser(language="diff", evaluator=run_diff),
        FileBlockParser(),
        SkipParser(),
    ],
    patterns=["README.md", "docs/*.md", "docs/**/*.md"],
    setup=setup,
    teardown=teardown,
).pytest()

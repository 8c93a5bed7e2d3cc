"""The documentation cannot rot: the site builds strictly, the reference lists exactly the
public names, every code block is of a kind the doc tests run, and every test the
reliability page cites as evidence exists."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import aiockpt
import aiockpt.dcp

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
DIRECTIVE = re.compile(r"^::: (\S+)\s*$", re.MULTILINE)
FENCE = re.compile(r"^```(.*)$", re.MULTILINE)
# python, bash, json and diff blocks run (see the root conftest.py); text is output or a diagram.
RUN_LANGUAGES = {"python", "bash", "json", "diff", "python title"}
LANGUAGES = RUN_LANGUAGES | {"text"}


def directives(page: str) -> list[str]:
    return DIRECTIVE.findall((DOCS / "reference" / page).read_text())


def test_site_builds_strictly(tmp_path: Path) -> None:
    try:
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError as err:  # a clear message, never a silent skip
        pytest.fail(f"the site build needs the docs extra: pip install -e '.[docs]' ({err})")
    site = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert out.returncode == 0, out.stderr
    reference = (site / "reference" / "aiockpt" / "index.html").read_text()
    for name in aiockpt.__all__:
        assert f'id="aiockpt.{name}"' in reference, name
    assert (site / "getting-started" / "index.html").is_file()
    assert (site / "how-to" / "migrate-from-nvrx" / "index.html").is_file()


def test_reference_lists_exactly_aiockpt_all() -> None:
    listed = [d.removeprefix("aiockpt.") for d in directives("aiockpt.md")]
    assert len(listed) == len(set(listed)), "a name is listed twice"
    assert sorted(listed) == sorted(aiockpt.__all__)


def test_reference_lists_exactly_aiockpt_dcp_all() -> None:
    listed = [d for d in directives("dcp.md") if d != "aiockpt.dcp"]
    assert all(d.startswith("aiockpt.dcp.") for d in listed), listed
    names = [d.removeprefix("aiockpt.dcp.") for d in listed]
    assert sorted(names) == sorted(aiockpt.dcp.__all__)


def test_reference_lists_exactly_aiockpt_storage_all() -> None:
    import aiockpt.storage

    listed = [d for d in directives("storage.md") if d != "aiockpt.storage"]
    names = [d.removeprefix("aiockpt.storage.") for d in listed]
    assert sorted(names) == sorted(aiockpt.storage.__all__)


def test_reference_covers_the_nvrx_compat_names() -> None:
    import importlib
    import pkgutil

    import aiockpt.compat.nvrx as nvrx

    documented = {id(getattr(aiockpt, n)) for n in aiockpt.__all__}
    documented |= {id(getattr(aiockpt.dcp, n)) for n in aiockpt.dcp.__all__}
    here = directives("compat-nvrx.md")
    for target in here:
        module, _, name = target.rpartition(".")
        if module:
            documented.add(id(getattr(importlib.import_module(module), name)))
    exported = 0
    for info in pkgutil.walk_packages(nvrx.__path__, nvrx.__name__ + "."):
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", []):
            exported += 1
            assert id(getattr(module, name)) in documented, f"{info.name}.{name}"
    assert exported > 20


def test_utils_reference_lists_its_public_names() -> None:
    import aiockpt.utils as utils

    public = {n for n in vars(utils) if not n.startswith("_") and callable(getattr(utils, n))}
    public = {n for n in public if getattr(getattr(utils, n), "__module__", "") == utils.__name__}
    listed = {d.removeprefix("aiockpt.utils.") for d in directives("utils.md")} - {"aiockpt.utils"}
    assert listed == public


def test_every_public_name_has_a_docstring() -> None:
    missing = [
        f"{mod.__name__}.{name}"
        for mod in (aiockpt, aiockpt.dcp)
        for name in mod.__all__
        if callable(getattr(mod, name)) and not (getattr(mod, name).__doc__ or "").strip()
    ]
    assert missing == []


def test_every_code_block_is_one_the_doc_tests_run() -> None:
    """A block with no language, or another one (``py``, ``sh``, ``console``), would be
    silently left out of the doc tests; output and diagrams say ``text``."""
    seen: dict[str, int] = {}
    for page in [ROOT / "README.md", *PAGES]:
        fences = FENCE.findall(page.read_text())
        openings = fences[::2]
        assert len(fences) % 2 == 0, f"{page}: unclosed code block"
        for lang in openings:
            lang = lang.strip()
            if re.fullmatch(r'python title="[\w.-]+"', lang):
                lang = "python title"  # written to a file a later block runs
            else:
                assert lang in LANGUAGES, f"{page.relative_to(ROOT)}: a ```{lang} block"
            seen[lang] = seen.get(lang, 0) + 1
    assert sum(seen.get(lang, 0) for lang in RUN_LANGUAGES) >= 40, seen


# ----------------------------------------------------------------------------- reliability

TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::([\w:]+)`")


def defined_tests(path: Path) -> set[str]:
    """``name`` and ``Class::name`` for every test function the file defines."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.add(node.name)
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                    found.add(f"{node.name}::{sub.name}")
    return found


def test_every_test_the_reliability_page_cites_exists() -> None:
    refs = TEST_REF.findall((DOCS / "reliability.md").read_text())
    assert len(refs) >= 30, "the reliability page cites its evidence as `tests/<file>.py::<test>`"
    missing = []
    for file, name in refs:
        path = ROOT / file
        if not path.is_file() or name not in defined_tests(path):
            missing.append(f"{file}::{name}")
    assert missing == []


def test_every_claim_of_the_readme_opening_is_backed_by_tests() -> None:
    """The README's first paragraph and bullets make promises; the reliability page's
    "Claims and evidence" table names, for each, the tests that back it."""
    readme = (ROOT / "README.md").read_text()
    assert "(docs/reliability.md)" in readme
    page = (DOCS / "reliability.md").read_text()
    table = page.split("## Claims and evidence", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in table.splitlines() if r.startswith("| ") and "`tests/" in r]
    claims = {r.split("|")[1].strip().strip("*"): TEST_REF.findall(r) for r in rows}
    for claim in (
        "never stalls the training loop",
        "never hangs",
        "never reports a failed save as a success",
        "never loses a checkpoint",
        "failures are errors",
        "runs without a GPU",
        "reuses its staging buffers",
        "drop-in for NVIDIA's resiliency extension",
    ):
        assert claim.lower() in " ".join(readme.split()).lower(), f"README lost {claim!r}"
        assert claims.get(claim), f"no test backs {claim!r} on docs/reliability.md"


def test_every_relative_link_of_the_readme_exists() -> None:
    """The site's links are checked by the strict build; the README is not part of it."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    relative = [link for link in links if "://" not in link]
    assert len(relative) >= 10
    missing = [link for link in relative if not (ROOT / link).exists()]
    assert missing == []

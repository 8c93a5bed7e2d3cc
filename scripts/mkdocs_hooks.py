"""MkDocs hook: the docstrings cross-reference with Sphinx roles (``:class:`X```), which
the reference pages would show literally; drop the role and keep the name as code."""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:class|meth|func|attr|exc|mod|data|obj):(?=<code)")


def on_page_content(html: str, **kwargs: Any) -> str:
    return ROLE.sub("", html)

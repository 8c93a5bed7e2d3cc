"""Text the command line prints of what it did not write itself."""

from __future__ import annotations


def clean(value: object, width: int = 40) -> str:
    """``value`` safe to print: control characters (terminal escapes) shown escaped."""
    text = str(value)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= width else text[: width - 3] + "..."

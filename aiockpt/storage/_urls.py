"""Where a path or a URL leads: the local filesystem, or an object store.

``s3://bucket/run`` (also ``s3a://``), ``gs://bucket/run`` and ``az://container/run``
(also ``azure://``, ``abfs://``, ``abfss://``, ``adl://``) name a prefix in an object
store; anything else with a ``scheme://`` is refused, and a plain path is a local one.
"""

from __future__ import annotations

import os
import re
from typing import Any

from .._exceptions import InvalidRequestError

OBJECT_SCHEMES = ("s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")


def is_url(path: Any) -> bool:
    """Whether ``path`` is a URL (``scheme://...``), of any scheme."""
    return isinstance(path, str) and _URL.match(path) is not None


def split_url(url: str) -> tuple[str, str, str]:
    """``(scheme, bucket, key)`` of an object-store URL, the key without a leading or
    trailing ``/``. :class:`InvalidRequestError` for another scheme, no bucket, or a key
    with empty, ``.`` or ``..`` parts (a prefix must name one place)."""
    match = _URL.match(url)
    if match is None:
        raise InvalidRequestError(f"{url!r} is not a URL")
    scheme = match.group(1).lower()
    if scheme not in OBJECT_SCHEMES:
        raise InvalidRequestError(
            f"{url!r}: aiockpt stores checkpoints on a local (or mounted) path or in an "
            f"object store ({', '.join(s + '://' for s in OBJECT_SCHEMES)}), not {scheme}://"
        )
    bucket, _, key = match.group(2).partition("/")
    key = key.strip("/")
    if not bucket or any(p in ("", ".", "..") for p in key.split("/") if key):
        raise InvalidRequestError(
            f"{url!r} does not name one place in a bucket: write {scheme}://BUCKET/PREFIX"
        )
    return scheme, bucket, key


def join(base: str, name: str) -> str:
    """``base/name`` for a URL or a local path."""
    if is_url(base):
        return f"{base.rstrip('/')}/{name}"
    return os.path.join(base, name)

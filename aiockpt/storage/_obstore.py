"""The obstore client, imported when the optional extra is installed, and its errors
turned into aiockpt's: what they mean and what to do."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .._exceptions import (
    CheckpointError,
    CheckpointNotFoundError,
    InvalidRequestError,
    StorageError,
)
from ._urls import split_url

obstore: Any = None  # the module, when the extra is installed
obs_errors: Any = None
try:
    import obstore as _obstore
    from obstore import exceptions as _obs_errors

    obstore, obs_errors = _obstore, _obs_errors
except ImportError:  # pragma: no cover - the extra is not installed
    pass


def require_obstore() -> Any:
    if obstore is None:
        raise InvalidRequestError(
            "object storage needs obstore: pip install 'aiockpt[object]' (or pip install obstore)"
        )
    return obstore


def describe(exc: BaseException, url: str) -> str:
    """What an obstore error means for ``url``, and what to do, in one sentence."""
    text = str(exc)
    bucket = split_url(url)[1]
    if "NoSuchBucket" in text:
        return f"the bucket {bucket!r} does not exist: create it, or fix the URL"
    if any(
        code in text
        for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403")
    ) or isinstance(exc, obs_errors.PermissionDeniedError | obs_errors.UnauthenticatedError):
        return (
            f"the store refused the credentials for bucket {bucket!r}: check "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the storage options) and the "
            "bucket's permissions"
        )
    if "builder error" in text:
        return (
            "the client could not be built for this endpoint (an http:// endpoint needs "
            "allow_http=True in the storage options, or AWS_ALLOW_HTTP=true)"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{type(exc).__name__}: {first[:300]}"


@contextlib.contextmanager
def translated(url: str, what: str) -> Iterator[None]:
    """Turn an obstore error in the block into a :class:`StorageError` about ``url``."""
    try:
        yield
    except CheckpointError:
        raise
    except FileNotFoundError as exc:  # obstore's NotFoundError is one
        raise CheckpointNotFoundError(f"{url!r} does not exist ({what})") from exc
    except Exception as exc:
        if obstore is None or not isinstance(exc, obs_errors.BaseError):
            raise
        raise StorageError(f"could not {what} {url!r}: {describe(exc, url)}", path=url) from exc

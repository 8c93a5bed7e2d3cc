"""``metadata.json``, the commit marker of a sharded checkpoint: written last, and read back
only after checking that it describes exactly the checkpoint it sits in."""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from .._exceptions import CheckpointNotFoundError, CorruptCheckpointError, InvalidRequestError
from ._files import open_dir, open_file, opened, read_at_most

METADATA = "metadata.json"
FORMAT_VERSION = 1
MAX_METADATA_BYTES = 64 * 2**20  # a million ranks' records fit; a hostile huge file does not
_HEX16 = re.compile(r"^[0-9a-f]{16}$")


_ATTEMPT = re.compile(r"^[0-9a-f]{8,32}$")


def shard_prefix(rank: int, world_size: int) -> str:
    """What every file name of ``rank``'s part of a sharded checkpoint starts with."""
    return f"shard-{rank:05d}-of-{world_size:05d}"


def shard_name(rank: int, world_size: int, attempt: str | None = None) -> str:
    """File name of ``rank``'s part of a sharded checkpoint, written by the save attempt
    ``attempt`` (a hex token): each attempt writes a name of its own, so a writer of an
    earlier attempt that is still alive can never replace a committed file."""
    if attempt is None:
        return f"{shard_prefix(rank, world_size)}.pt"
    return f"{shard_prefix(rank, world_size)}.{attempt}.pt"


def is_shard_name(name: str, rank: int, world_size: int) -> bool:
    """Whether ``name`` is a file name of ``rank``'s part (of any attempt)."""
    prefix = shard_prefix(rank, world_size)
    if name == f"{prefix}.pt":
        return True
    head, _, rest = name.partition(".")
    attempt, dot, ext = rest.partition(".")
    return head == prefix and bool(_ATTEMPT.match(attempt)) and dot == "." and ext == "pt"


def check_extra(extra: Any) -> dict[str, Any]:
    """``extra`` as it will be committed; :class:`InvalidRequestError` at the call if it is
    not a JSON object (a dict with str keys and JSON values)."""
    if extra is None:
        return {}
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise InvalidRequestError(f"extra must be a dict with str keys, not {extra!r}")
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(
            f"extra must hold JSON values only (str, int, float, bool, None, lists, dicts): {exc}"
        ) from exc
    return extra


def safe_join(directory: str, name: object) -> str:
    """``directory/name`` for a plain file name; anything that could leave ``directory``
    (a separator, ``..``, an absolute path, a NUL) is refused."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
    ):
        raise CorruptCheckpointError(
            f"refusing file name {name!r} in {directory!r}: it would leave the checkpoint "
            "directory",
            path=directory,
        )
    return os.path.join(directory, name)


def check_metadata(meta: Any, directory: str, path: str) -> dict[str, Any]:
    """``meta`` if it describes a whole checkpoint; :class:`CorruptCheckpointError` if not:
    wrong format or version, a world size that does not match its records, records that are
    missing, duplicated, swapped or malformed."""

    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path!r} is not valid aiockpt metadata: {why}", path=path)

    if not isinstance(meta, dict) or meta.get("format") != "aiockpt":
        raise bad('no "format": "aiockpt"')
    version = meta.get("version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise bad(
            f"format version {version!r}, this aiockpt reads version {FORMAT_VERSION}: "
            "load it with the aiockpt release that wrote it"
        )
    world_size, files = meta.get("world_size"), meta.get("files")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise bad(f"world_size is {world_size!r}")
    if not isinstance(files, list) or not all(isinstance(r, dict) for r in files):
        raise bad('"files" is not a list of records')
    if len(files) != world_size:  # checked first: nothing is built from world_size alone
        raise bad(f"it records {len(files)} shard file(s) for a world size of {world_size}")
    names = [record.get("name") for record in files]
    for name in names:
        safe_join(directory, name)
    if not all(is_shard_name(n, rank, world_size) for rank, n in enumerate(names)):
        raise bad(
            f"its file records {names!r} are not the {world_size} shards of a world size "
            f"{world_size} checkpoint, one per rank in rank order (missing, duplicated, "
            "swapped or foreign records)"
        )
    for record in files:
        nbytes, digest = record.get("nbytes"), record.get("xxh3_64")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise bad(f"record {record.get('name')!r} has size {nbytes!r}")
        if not isinstance(digest, str) or not _HEX16.match(digest):
            raise bad(f"record {record.get('name')!r} has checksum {digest!r}")
    if not isinstance(meta.get("extra", {}), dict):
        raise bad('"extra" is not an object')
    return meta


def _has_entry(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return True


def read_metadata(directory: str, *, dir_fd: int | None = None) -> dict[str, Any]:
    """The checked metadata of the committed checkpoint in ``directory``.

    Raises :class:`CheckpointNotFoundError` if there is none (never committed),
    :class:`CorruptCheckpointError` if it is damaged or inconsistent,
    :class:`UntrustedEntryError` if it is a link, FIFO or device."""
    path = os.path.join(directory, METADATA)
    if dir_fd is None:
        with opened(open_dir(directory)) as dfd:
            return read_metadata(directory, dir_fd=dfd)
    try:
        fd = open_file(path, dir_fd=dir_fd, name=METADATA)
    except CheckpointNotFoundError:
        if _has_entry(dir_fd, ".metadata"):
            raise CheckpointNotFoundError(
                f"{directory!r} is a torch.distributed.checkpoint (DCP) checkpoint, not a "
                f"torch-format one (it has .metadata, no {METADATA}): load it with "
                "aiockpt.dcp.load(state_dict, path), or torch.distributed.checkpoint.load"
            ) from None
        raise CheckpointNotFoundError(
            f"{directory!r} holds no committed checkpoint (no {METADATA}): its save failed, "
            "was interrupted or is still running"
        ) from None
    with opened(fd):
        data = read_at_most(fd, MAX_METADATA_BYTES, path)
    return parse_metadata(data, directory, path)


def parse_metadata(data: bytes, directory: str, path: str) -> dict[str, Any]:
    """The checked metadata of ``directory`` from the bytes of its ``metadata.json``
    (``path``); :class:`CorruptCheckpointError` if they are not."""
    if len(data) > MAX_METADATA_BYTES:
        raise CorruptCheckpointError(
            f"{path!r} is not valid metadata: over {MAX_METADATA_BYTES} bytes", path=path
        )
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{path!r} is not valid metadata: {exc}", path=path) from exc
    return check_metadata(meta, directory, path)


def metadata_bytes(files: list[dict[str, Any]], extra: dict[str, Any]) -> bytes:
    """The content of the ``metadata.json`` that commits a checkpoint of ``files`` (each
    rank's record, in rank order) with ``extra``."""
    meta = {
        "format": "aiockpt",
        "version": FORMAT_VERSION,
        "created": time.time(),
        "world_size": len(files),
        "files": files,
        "extra": extra,
    }
    return json.dumps(meta, indent=1, sort_keys=True, allow_nan=False).encode()

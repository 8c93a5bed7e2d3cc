"""The command line's object-store side: ``aiockpt ls URL``, ``aiockpt verify URL`` and
``aiockpt cp SRC DST`` (a committed step between a local directory and an object store),
with a progress bar on a terminal. Credentials and endpoint come from the environment
(``AWS_*``, ``GOOGLE_*``, ``AZURE_*``), as for any obstore client."""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from .._exceptions import CheckpointError, CheckpointNotFoundError
from ._text import clean as _clean

Progress = Callable[[int], object]


@contextlib.contextmanager
def progress_bar(total: int, what: str) -> Iterator[Progress]:
    """A tqdm bar on stderr for a terminal (and tqdm installed); silent otherwise."""
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:
        tqdm = None
    if tqdm is None or not sys.stderr.isatty():
        yield lambda n: None
        return
    with tqdm(total=total, unit="B", unit_scale=True, desc=what, file=sys.stderr) as bar:
        yield bar.update


def _storage() -> Any:
    from ..storage._object import ObjectStorage

    return ObjectStorage()


def ls_url(url: str) -> int:
    from .._steps import parse_step_name
    from ..storage._tiers import remote_records

    try:
        store = _storage()
        url = url.rstrip("/")
        names = store.list_dir(url)
    except CheckpointError as exc:
        print(f"aiockpt ls: {_clean(exc, 500)}", file=sys.stderr)
        return 2
    if "metadata.json" in names or ".metadata" in names:
        base, _, last = url.rpartition("/")
        url, names = base, [last]
    steps = {n: parse_step_name(n) for n in names}
    names = sorted(steps, key=lambda n: (steps[n] is None, steps[n] or 0, n))
    print(f"{'checkpoint':24}{'step':>20}{'ranks':>7}{'size':>12}  committed")
    for name in names:
        if steps[name] is None and not name.startswith("step-"):
            continue
        try:
            meta, records = remote_records(f"{url}/{name}", store)
        except CheckpointNotFoundError:
            print(f"{_clean(name, 24):24}{'':>39}  no (incomplete or in progress)")
            continue
        except CheckpointError as err:
            print(f"{_clean(name, 24):24}  BAD: {_clean(err, 200)}")
            continue
        size = sum(r["nbytes"] for r in records)
        extra: dict[str, Any] = meta["extra"] if isinstance(meta.get("extra"), dict) else {}
        try:
            when = datetime.datetime.fromtimestamp(float(meta.get("created", 0)))
            shown = when.isoformat(" ", "seconds")
        except (TypeError, ValueError, OverflowError, OSError):
            shown = _clean(meta.get("created"), 20)
        print(
            f"{_clean(name, 24):24}{_clean(extra.get('step', ''), 20):>20}"
            f"{_clean(meta.get('world_size', ''), 7):>7}{size / 2**20:>9.1f} MiB  {shown}"
        )
    return 0


def verify_url(url: str) -> int:
    from ..storage._tiers import remote_records, verify_remote

    url = url.rstrip("/")
    try:
        store = _storage()
        _, records = remote_records(url, store)
        total = sum(r["nbytes"] for r in records)
        with progress_bar(total, "verify") as progress:
            checked = verify_remote(url, store, progress)
    except CheckpointError as err:
        print(f"FAILED: {_clean(err, 500)}", file=sys.stderr)
        return 1
    for file in checked:
        print(f"ok  {_clean(file, 200)}")
    print(f"{_clean(url, 200)}: {len(checked)} file(s) match their checksums")
    return 0


def cp(src: str, dst: str) -> int:
    """Copy the committed step ``src`` to ``dst`` (one of them a URL), commit last."""
    from .._formats import commit_files, step_format
    from ..storage._local import LocalStorage
    from ..storage._tiers import download_step, remote_records, upload_step
    from ..storage._urls import is_url

    src, dst = src.rstrip("/"), dst.rstrip("/")
    try:
        store = _storage()
        if is_url(src) == is_url(dst):
            print("aiockpt cp: one of SRC and DST must be a URL", file=sys.stderr)
            return 2
        if is_url(dst):
            fmt = step_format(
                "dcp" if os.path.lexists(os.path.join(src, ".metadata")) else "torch", {}
            )
            records, commit_names = fmt.step_files(src)
            total = sum(r["nbytes"] for r in records)
            with progress_bar(total, "upload") as progress:
                upload_step(src, dst, store, records, commit_names, progress)
        else:
            _, records = remote_records(src, store)
            fmt = step_format("dcp" if ".metadata" in store.list_dir(src) else "torch", {})
            total = sum(r["nbytes"] for r in records)
            with progress_bar(total, "download") as progress:
                download_step(src, dst, store, commit_files(fmt.name), progress)
            fmt.verify(dst, LocalStorage())
    except CheckpointError as err:
        print(f"FAILED: {_clean(err, 500)}", file=sys.stderr)
        return 1
    print(f"{_clean(src, 200)} -> {_clean(dst, 200)}: {len(records)} file(s), committed")
    return 0

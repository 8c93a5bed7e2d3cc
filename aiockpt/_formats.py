"""The formats a checkpoint manager writes its steps in, found by name.

Each format knows its commit marker (the file whose presence makes a step exist), how to
build the request that saves a step, how to un-commit a step before it is deleted, and how
to restore one. The managers import no format: the registry below names each format's
module, imported the first time a manager uses it (as fsspec finds its backends), so the
managers do not depend on ``torch.distributed.checkpoint`` unless a ``format="dcp"``
manager is made.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ._dist import CompletionGroup
from ._exceptions import InvalidRequestError
from ._request import AsyncRequest

Hook = Callable[[], object]


@dataclass(frozen=True)
class StepHooks:
    """What the step directory asks of a save's commit: ``before_commit`` (the committing
    rank, may raise to refuse), ``on_committed`` (every rank, once the commit is known),
    ``after_commit`` (the committing rank, once the marker is durable: retention)."""

    before_commit: Hook
    on_committed: Hook
    after_commit: Hook


class StepFormat(Protocol):
    """One on-disk format of a manager's steps."""

    name: str
    marker: str  # its commit marker, a file in the step directory
    needs_local_storage: bool  # writes through the filesystem, not a Storage's methods
    unchecked_load: str  # how to read a damaged step anyway: a template of {path!r}

    def save_request(
        self,
        state_dict: Any,
        directory: str,
        extra: dict[str, Any],
        completion: CompletionGroup,
        storage: Any,
        hooks: StepHooks,
    ) -> AsyncRequest:
        """The request that saves this rank's part of a step into ``directory``."""
        ...

    def uncommit(self, directory: str) -> None:
        """Remove the commit marker durably (a step about to be deleted)."""
        ...

    def restore(self, directory: str, state_dict: Any, storage: Any, **load_options: Any) -> Any:
        """Load a committed step: a state dict, or ``state_dict`` filled in place."""
        ...

    def step_files(self, directory: str) -> tuple[list[dict[str, Any]], list[str]]:
        """The records (name, size, checksum) of the files of the committed local step
        ``directory`` (data files, and any commit file that has one), and its commit files
        in publishing order (the marker last)."""
        ...

    def verify(self, directory: str, storage: Any) -> None:
        """Check every file of a committed step against its recorded size and checksum;
        :class:`CorruptCheckpointError` (or :class:`CheckpointNotFoundError`) if one fails."""
        ...


# name -> (module, class, commit marker, needs local storage, companions): known without
# importing the module, so a directory holding steps of another format is recognised as
# such, and a manager made on an event loop imports nothing there
# (torch.distributed.checkpoint's import reads hundreds of files). The companions are the
# files a step is committed with beside its marker (the DCP format's checksum sidecar: DCP
# itself needs only .metadata, so a step that lost it would still load, unchecked).
_REGISTRY: dict[str, tuple[str, str, str, bool, tuple[str, ...]]] = {
    "torch": ("aiockpt._sharded", "TorchFormat", "metadata.json", False, ()),
    "dcp": ("aiockpt.dcp._format", "DCPFormat", ".metadata", True, (".metadata.checksums",)),
}
FORMATS = tuple(_REGISTRY)


def markers() -> dict[str, str]:
    """Every format's commit marker, by format name."""
    return {name: entry[2] for name, entry in _REGISTRY.items()}


def companions(name: str) -> tuple[str, ...]:
    """The files every step of format ``name`` is committed with beside its marker: a step
    with the marker and without one of them is damaged, not committed."""
    return _REGISTRY[name][4]


def commit_files(name: str) -> list[str]:
    """The files that commit a step of format ``name``, in publishing order: its
    companions, then its marker."""
    return [*companions(name), markers()[name]]


def needs_local_storage(name: str) -> bool:
    """Whether format ``name`` writes through the filesystem (see StepFormat)."""
    return _REGISTRY[name][3]


def step_format(name: str, options: dict[str, Any]) -> StepFormat:
    """A new format object (it may keep state across a manager's saves, e.g. a plan
    cache) for ``name``, configured with ``options``."""
    if name not in _REGISTRY:
        raise InvalidRequestError(f"format must be one of {FORMATS}, not {name!r}")
    module, cls = _REGISTRY[name][:2]
    made: StepFormat = getattr(importlib.import_module(module), cls)(**options)
    return made

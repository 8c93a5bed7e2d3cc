"""The storage protocol: what a checkpoint manager and the loaders need of the place where
checkpoints live."""

from __future__ import annotations

from typing import Any, Protocol


class WriterLock(Protocol):
    """One writer per checkpoint directory, held from :meth:`acquire` to :meth:`release`."""

    def acquire(self) -> None:
        """Take the lock, or raise :class:`DirectoryLockedError` naming its holder."""
        ...

    def release(self) -> None:
        """Give the lock up; idempotent."""
        ...


class Storage(Protocol):
    """Where checkpoints live: the protocol a checkpoint manager (and ``load``) writes and
    reads through, passed as ``storage=``.

    ``write_file`` runs in the worker process (the object is pickled to it), everything
    else in the caller's. :class:`LocalStorage`, the local filesystem, is the default; an
    object store can implement the same methods (through fsspec, say). Methods raise
    :class:`StorageError` (or another :class:`CheckpointError`) for a failure the caller
    should see as a failed checkpoint; any other exception in ``write_file`` fails the
    save with a :class:`WorkerError` carrying it.

    Example:
        A storage that reports the files it writes, for a manager:

        ```python
        class ReportingStorage(LocalStorage):
            def write_file(self, state_dict, path):
                record = super().write_file(state_dict, path)
                print("wrote", record["name"], record["nbytes"], "bytes")
                return record

        manager = CheckpointManager("ckpts", storage=ReportingStorage())
        ```
    """

    #: Paths are paths of this machine's filesystem: loads memory-map files, directory
    #: scans go through descriptors that follow no link, and formats that write through
    #: the filesystem (``format="dcp"``) may be used.
    is_local: bool

    def write_file(self, state_dict: Any, path: str) -> dict[str, Any]:
        """Write ``state_dict`` to ``path`` so that it is durable and atomic (the old file
        or the new one, never a torn one) once this returns.

        Args:
            state_dict: the staged state dict (host tensors) to serialize.
            path: the file to write, inside a step directory made by :meth:`makedirs`.

        Returns:
            The file's record, stored in the metadata: ``{"name": basename, "nbytes":
            size, "xxh3_64": hex checksum of the bytes}``.
        """
        ...

    def read_bytes(self, path: str) -> bytes:
        """Return the whole content of the file ``path`` (checked against its record
        by the caller). Raises :class:`CheckpointNotFoundError` if it does not exist."""
        ...

    def commit(self, directory: str, files: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        """Commit the checkpoint in ``directory``: write its metadata (``files``, the
        records :meth:`write_file` returned on every rank, and ``extra``, JSON), last
        and atomically, and only if it has none yet: a commit never replaces another (raise
        :class:`StorageError` then). Once this returns the checkpoint must survive a
        crash."""
        ...

    def read_metadata(self, directory: str) -> dict[str, Any]:
        """Return the metadata :meth:`commit` wrote. Raises
        :class:`CheckpointNotFoundError` if ``directory`` was never committed,
        :class:`CorruptCheckpointError` if its metadata is damaged."""
        ...

    def list_dir(self, directory: str) -> list[str]:
        """Return the names in ``directory``, sorted; an empty list if it does not
        exist."""
        ...

    def makedirs(self, directory: str) -> None:
        """Create ``directory`` (and its parents) if it does not exist, durably."""
        ...

    def remove_tree(self, path: str) -> None:
        """Delete the checkpoint directory ``path``, un-committing it first (its
        metadata goes before its files). A missing one is not an error; one that cannot
        be deleted raises :class:`StorageError`."""
        ...

    def remove_temporaries(self, directory: str, prefix: str) -> list[str]:
        """Remove the temporary files left in ``directory`` by killed writers of names
        starting with ``prefix``; never a live writer's. Returns the names removed."""
        ...

    def lock(self, directory: str) -> WriterLock:
        """The lock that makes one checkpoint manager the only writer of ``directory``."""
        ...

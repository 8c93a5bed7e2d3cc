"""Where checkpoints live and how they are written and read: the :class:`Storage` protocol,
the local filesystem backend, atomic writes, checksums, ``torch.save``'s zip format, the
metadata that commits a checkpoint, the directory lock and the loaders.

Nothing in here knows of queues, workers or event loops.
"""

from ._fsspec import FsspecStorage as FsspecStorage
from ._local import LocalStorage as LocalStorage
from ._local import verify as verify
from ._object import ObjectStorage as ObjectStorage
from ._protocol import Storage as Storage
from ._protocol import WriterLock as WriterLock

__all__ = ["FsspecStorage", "LocalStorage", "ObjectStorage", "Storage", "WriterLock", "verify"]

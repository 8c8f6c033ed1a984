"""One storage per layer, each implementing :class:`msstore.router.DataStorage`.

=================  ===============================  =========================================
layer              class                            ``search(query)`` means
=================  ===============================  =========================================
MEMORY_CACHE       :class:`MemoryCache`             keys starting with ``query``
DISTRIBUTED_KV     :class:`KVStore`                 keys starting with ``query`` (a listing)
RELATIONAL_DB      :class:`TaskStore`               ``str``: status; mapping: JSONB ``@>``
RELATIONAL_DB      :class:`MessageLogStore`         ``str``: channel; mapping: JSONB ``@>``
VECTOR_STORE       :class:`VectorStore`             free text, ranked by cosine (HNSW)
=================  ===============================  =========================================

Every layer but the in-process cache encodes values with :func:`msstore.codec.dumps` before
any I/O, so a value that is not JSON or is too large fails the same way (and writes nothing)
wherever it is routed.
"""

from __future__ import annotations

from ..errors import InvalidValueError
from .embedders import Embedder, HashingEmbedder, MiniLMEmbedder
from .kv import KVStore
from .memory import MemoryCache
from .messages import MessageLogStore
from .sql import SQLStore
from .tasks import TaskStore
from .vectors import VectorStore, pgvector_missing_message

__all__ = [
    "Embedder",
    "HashingEmbedder",
    "InvalidValueError",
    "KVStore",
    "MemoryCache",
    "MessageLogStore",
    "MiniLMEmbedder",
    "SQLStore",
    "TaskStore",
    "VectorStore",
    "pgvector_missing_message",
]

"""msstore: agent state in NATS JetStream KV and PostgreSQL JSONB, with the patterns between.

The public surface is small on purpose; everything else lives in the module named after its
pattern (``msstore.keys``, ``msstore.migrations``, ``msstore.services`` …).
"""

from importlib import metadata as _metadata

from .cache import CacheEntry, CacheSource, TieredCacheRepository
from .codec import dumps, loads
from .connection import Connection, connect
from .errors import (
    BackpressureError,
    ConflictError,
    DataRejectedError,
    IllegalTransitionError,
    InvalidAgentIdError,
    InvalidKeyError,
    InvalidOptionError,
    InvalidValueError,
    MigrationChecksumError,
    MigrationError,
    MsstoreError,
    NotFoundError,
    NotOpenError,
    NotSerializableError,
    PendingWritesError,
    RoutingError,
    ServiceError,
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
    ValueTooLargeError,
)
from .hybrid import HybridStateManager
from .keys import decode_key, encode_key, encode_token, join_key, split_key
from .layers import (
    Embedder,
    HashingEmbedder,
    KVStore,
    MemoryCache,
    MessageLogStore,
    SQLStore,
    TaskStore,
    VectorStore,
)
from .lifecycle import LifecycleState, StateLifecycleManager
from .merge import MergeResult
from .repository import Agent, AgentRepository, Repository
from .router import DataRouter, DataStorage, DataType, Hit, StorageLayer, Store

try:
    __version__ = _metadata.version("msstore")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "Agent",
    "AgentRepository",
    "BackpressureError",
    "CacheEntry",
    "CacheSource",
    "ConflictError",
    "Connection",
    "DataRejectedError",
    "DataRouter",
    "DataStorage",
    "DataType",
    "Embedder",
    "HashingEmbedder",
    "Hit",
    "HybridStateManager",
    "IllegalTransitionError",
    "InvalidAgentIdError",
    "InvalidKeyError",
    "InvalidOptionError",
    "InvalidValueError",
    "KVStore",
    "LifecycleState",
    "MemoryCache",
    "MergeResult",
    "MessageLogStore",
    "MigrationChecksumError",
    "MigrationError",
    "MsstoreError",
    "NotFoundError",
    "NotOpenError",
    "NotSerializableError",
    "PendingWritesError",
    "Repository",
    "RoutingError",
    "SQLStore",
    "ServiceError",
    "StateLifecycleManager",
    "StorageLayer",
    "Store",
    "StoreError",
    "StoreTimeoutError",
    "StoreUnavailableError",
    "TaskStore",
    "TieredCacheRepository",
    "ValueTooLargeError",
    "VectorStore",
    "__version__",
    "connect",
    "decode_key",
    "dumps",
    "encode_key",
    "encode_token",
    "join_key",
    "loads",
    "split_key",
]

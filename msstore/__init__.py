"""msstore: agent state in NATS JetStream KV and PostgreSQL JSONB, with the patterns between.

The public surface is small on purpose; everything else lives in the module named after its
pattern (``msstore.keys``, ``msstore.migrations``, ``msstore.services`` …).
"""

from .cache import CacheEntry, CacheSource, TieredCacheRepository
from .codec import dumps, loads
from .connection import Connection, connect
from .errors import (
    BackpressureError,
    ConflictError,
    IllegalTransitionError,
    InvalidAgentIdError,
    InvalidKeyError,
    InvalidValueError,
    MigrationChecksumError,
    MigrationError,
    MsstoreError,
    NotFoundError,
    NotSerializableError,
    PendingWritesError,
    RoutingError,
    ServiceError,
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
from .repository import Agent, AgentRepository, Repository
from .router import DataRouter, DataStorage, DataType, Hit, StorageLayer, Store

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentRepository",
    "BackpressureError",
    "CacheEntry",
    "CacheSource",
    "ConflictError",
    "Connection",
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
    "InvalidValueError",
    "KVStore",
    "LifecycleState",
    "MemoryCache",
    "MessageLogStore",
    "MigrationChecksumError",
    "MigrationError",
    "MsstoreError",
    "NotFoundError",
    "NotSerializableError",
    "PendingWritesError",
    "Repository",
    "RoutingError",
    "SQLStore",
    "ServiceError",
    "StateLifecycleManager",
    "StorageLayer",
    "Store",
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

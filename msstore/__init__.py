"""msstore: agent state in NATS JetStream KV and PostgreSQL JSONB, with the patterns between.

The public surface is small on purpose: the entry points (``connect`` and the managers and
stores it feeds), the errors, and the result types their methods return. Everything else
lives in the module named after its pattern: the codec in ``msstore.codec`` (``dumps``,
``loads``), key encoding in ``msstore.keys`` (``join_key``, ``encode_key`` …), then
``msstore.migrations``, ``msstore.services`` …
"""

import warnings as _warnings
from importlib import metadata as _metadata
from typing import Any as _Any

from . import errors as _errors
from .agent_io import HydrationResult
from .cache import CacheEntry, CacheSource, TieredCacheRepository
from .checkpoints import RestoreResult
from .connection import Connection, connect
from .errors import *  # noqa: F403 - the errors, listed once: msstore.errors.__all__
from .hybrid import HybridStateManager
from .layers import (
    Embedder,
    HashingEmbedder,
    KVStore,
    MemoryCache,
    MessageLogStore,
    MiniLMEmbedder,
    SQLStore,
    TaskStore,
    VectorStore,
)
from .lifecycle import StateLifecycleManager
from .merge import MergeResult
from .messages import Message, MessageLog, MessagePage
from .repository import Agent, AgentRepository, Repository
from .router import DataRouter, DataStorage, DataType, Hit, StorageLayer, Store
from .tasks import ClaimedTask, TaskQueue, TaskStatus
from .transitions import LifecycleState, TransitionEvent

try:
    __version__ = _metadata.version("msstore")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

#: Moved out of the top level (issue 10): still reachable as ``msstore.<name>`` with a
#: DeprecationWarning, importable without one from the module that owns it.
_MOVED = {"dumps": "codec", "loads": "codec", "join_key": "keys", "split_key": "keys",
          "encode_key": "keys", "decode_key": "keys", "encode_token": "keys"}


def __getattr__(name: str) -> _Any:
    if name in _MOVED:
        module = _MOVED[name]
        _warnings.warn(f"msstore.{name} is deprecated: use msstore.{module}.{name}",
                       DeprecationWarning, stacklevel=2)
        from importlib import import_module

        return getattr(import_module(f"msstore.{module}"), name)
    raise AttributeError(f"module 'msstore' has no attribute {name!r}")


#: the entry points
__all__ = [
    "Agent",
    "AgentRepository",
    "Connection",
    "DataRouter",
    "DataStorage",
    "DataType",
    "Embedder",
    "HashingEmbedder",
    "HybridStateManager",
    "KVStore",
    "MemoryCache",
    "MessageLog",
    "MessageLogStore",
    "MiniLMEmbedder",
    "Repository",
    "SQLStore",
    "StateLifecycleManager",
    "StorageLayer",
    "Store",
    "TaskQueue",
    "TaskStore",
    "TieredCacheRepository",
    "VectorStore",
    "__version__",
    "connect",
]
#: what their public methods return
__all__ += [
    "CacheEntry",
    "CacheSource",
    "ClaimedTask",
    "Hit",
    "HydrationResult",
    "LifecycleState",
    "MergeResult",
    "Message",
    "MessagePage",
    "RestoreResult",
    "TaskStatus",
    "TransitionEvent",
]
#: the errors, every MsstoreError subclass (listed once, in msstore.errors)
__all__ += _errors.__all__

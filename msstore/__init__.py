"""msstore: agent state in NATS JetStream KV and PostgreSQL JSONB, with the patterns between.

The public surface is small on purpose; everything else lives in the module named after its
pattern (``msstore.keys``, ``msstore.migrations``, ``msstore.services`` …).
"""

from .codec import dumps, loads
from .connection import Connection, connect
from .errors import (
    BackpressureError,
    ConflictError,
    InvalidAgentIdError,
    InvalidKeyError,
    MigrationChecksumError,
    MigrationError,
    MsstoreError,
    NotFoundError,
    NotSerializableError,
    ServiceError,
    StoreTimeoutError,
    StoreUnavailableError,
    ValueTooLargeError,
)
from .keys import decode_key, encode_key, encode_token, join_key, split_key

__version__ = "0.1.0"

__all__ = [
    "BackpressureError",
    "ConflictError",
    "Connection",
    "InvalidAgentIdError",
    "InvalidKeyError",
    "MigrationChecksumError",
    "MigrationError",
    "MsstoreError",
    "NotFoundError",
    "NotSerializableError",
    "ServiceError",
    "StoreTimeoutError",
    "StoreUnavailableError",
    "ValueTooLargeError",
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

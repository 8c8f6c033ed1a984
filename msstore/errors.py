"""One root error, small typed subclasses.

Callers catch ``MsstoreError`` for everything msstore raises on purpose; the subclasses also
mix in the stdlib type a caller would expect (``ValueError`` for bad input, ``TimeoutError``
for a store that did not answer in time), so generic handlers keep working.
"""

from __future__ import annotations


class MsstoreError(Exception):
    """Root of every error msstore raises on purpose."""


class InvalidKeyError(MsstoreError, ValueError):
    """A key or id cannot be stored: empty, wrong type, or too long once encoded."""


class InvalidAgentIdError(InvalidKeyError):
    """An agent id is not a UUID."""


class InvalidValueError(MsstoreError, ValueError):
    """A value or option has the wrong shape for the layer it is routed to."""


class RoutingError(MsstoreError, ValueError):
    """A data type or layer is unknown, unmapped, or routed to a layer that cannot hold it."""


class NotSerializableError(MsstoreError, TypeError):
    """A value cannot be encoded as JSON."""


class ValueTooLargeError(MsstoreError, ValueError):
    """An encoded value is larger than the store accepts."""


class StoreUnavailableError(MsstoreError, ConnectionError):
    """A server (PostgreSQL or NATS) could not be reached or did not answer."""


class StoreTimeoutError(StoreUnavailableError, TimeoutError):
    """A server did not answer in time."""


class NotFoundError(MsstoreError, LookupError):
    """The key, agent or row does not exist."""


class ConflictError(MsstoreError):
    """An optimistic-concurrency check failed: someone else wrote first."""


class BackpressureError(MsstoreError):
    """The unflushed backlog reached its bound; writes are refused until it drains."""


class MigrationError(MsstoreError):
    """The schema migrations cannot be applied as they are."""


class MigrationChecksumError(MigrationError):
    """An already applied migration file was changed afterwards."""


class ServiceError(MsstoreError):
    """An embedded server could not be started, found or stopped."""


__all__ = [
    "BackpressureError",
    "ConflictError",
    "InvalidAgentIdError",
    "InvalidKeyError",
    "InvalidValueError",
    "MigrationChecksumError",
    "MigrationError",
    "MsstoreError",
    "NotFoundError",
    "NotSerializableError",
    "RoutingError",
    "ServiceError",
    "StoreTimeoutError",
    "StoreUnavailableError",
    "ValueTooLargeError",
]

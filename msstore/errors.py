"""One root error, small typed subclasses.

Callers catch ``MsstoreError`` for everything msstore raises on purpose; the subclasses also
mix in the stdlib type a caller would expect (``ValueError`` for bad input, ``TimeoutError``
for a store that did not answer in time), so generic handlers keep working.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class MsstoreError(Exception):
    """Root of every error msstore raises on purpose."""


class InvalidKeyError(MsstoreError, ValueError):
    """A key or id cannot be stored: empty, wrong type, or too long once encoded."""


class InvalidAgentIdError(InvalidKeyError):
    """An agent id is not a UUID."""


class InvalidNamespaceError(InvalidKeyError):
    """A LangGraph store namespace is not a tuple of non-empty str labels without '.' or NUL
    (and an item's namespace is not empty and not rooted at 'langgraph')."""


class InvalidValueError(MsstoreError, ValueError):
    """A value or option has the wrong shape for the layer it is routed to."""


class InvalidCursorError(InvalidValueError):
    """A paging cursor is not a position (an int >= 0), or ``after`` is not below ``before``."""


class RoutingError(MsstoreError, ValueError):
    """A data type or layer is unknown, unmapped, or routed to a layer that cannot hold it."""


class NotSerializableError(MsstoreError, TypeError):
    """A value cannot be encoded as JSON."""


class ValueTooLargeError(MsstoreError, ValueError):
    """An encoded value is larger than the store accepts."""


class StoreUnavailableError(MsstoreError, ConnectionError):
    """A server (PostgreSQL or NATS) could not be reached or did not answer."""


class StoreTimeoutError(StoreUnavailableError, TimeoutError):
    """A server did not answer in time: a write that timed out may still have been applied."""


class NoLeaderError(StoreUnavailableError):
    """No NATS stream leader took a write within the retry budget (an election, or a lost
    quorum); nothing was written, so retrying later is safe."""


class NotOpenError(MsstoreError, RuntimeError):
    """A manager or store was used before it was opened, or after it was closed."""


class InvalidOptionError(MsstoreError, ValueError):
    """A constructor or method option is out of range or of the wrong type."""


class NotFoundError(MsstoreError, LookupError):
    """The key, agent or row does not exist."""


class ConflictError(MsstoreError):
    """An optimistic-concurrency check failed: someone else wrote first."""


class LeaseLostError(ConflictError):
    """A worker finished, failed or extended a task whose lease it no longer holds."""

    def __init__(self, message: str, task_ids: list[str]) -> None:
        super().__init__(message)
        self.task_ids = task_ids  # the refused tasks: each left exactly as it was


class CheckpointConflictError(ConflictError):
    """A LangGraph thread moved on since this checkpointer last saw it (another writer
    extended it): this checkpoint was not written, so the history did not fork."""


class SyncUnsupportedError(MsstoreError, RuntimeError):
    """A synchronous method was called on the event loop an async-only object runs on."""


class PendingWritesError(StoreUnavailableError):
    """Some SQL writes could not be committed within the retry budget; they are kept."""

    def __init__(self, message: str, agent_ids: list[Any],
                 last_error: BaseException | None) -> None:
        super().__init__(message)
        self.agent_ids = agent_ids
        self.last_error = last_error


class IllegalTransitionError(MsstoreError):
    """A lifecycle transition the state machine does not allow."""

    def __init__(self, agent_id: object, from_state: Any, to_state: Any,
                 legal: Iterable[Any]) -> None:
        self.agent_id, self.from_state, self.to_state = agent_id, from_state, to_state
        self.legal = frozenset(legal)
        targets = ", ".join(sorted(s.name for s in self.legal))
        super().__init__(
            f"agent {agent_id}: illegal lifecycle transition {from_state.name} → "
            f"{to_state.name}; from {from_state.name} only {targets} is legal "
            "(see msstore.lifecycle.TRANSITIONS)")


class BackpressureError(MsstoreError):
    """The unflushed backlog reached its bound; writes are refused until it drains."""


class MigrationError(MsstoreError):
    """The schema migrations cannot be applied as they are."""


class MigrationChecksumError(MigrationError):
    """An already applied migration file was changed afterwards."""


class UnderReplicatedWarning(UserWarning):
    """A bucket exists with fewer replicas than msstore would create it with on this NATS."""


class ServiceError(MsstoreError):
    """An embedded server could not be started, found or stopped."""


class MissingExtraError(MsstoreError, ImportError):
    """An optional feature needs a package from an extra that is not installed."""


class StoreError(MsstoreError):
    """PostgreSQL refused the statement itself (undefined table, syntax error, permission).

    Not an outage and not the caller's data: a bug or a missing migration. Retrying will
    fail the same way, so it is never reported as :class:`StoreUnavailableError`.
    """


class DataRejectedError(InvalidValueError):
    """PostgreSQL refused a value (a data exception or an integrity violation); not retried."""


__all__ = [
    "BackpressureError",
    "CheckpointConflictError",
    "ConflictError",
    "DataRejectedError",
    "IllegalTransitionError",
    "InvalidAgentIdError",
    "InvalidCursorError",
    "InvalidKeyError",
    "InvalidNamespaceError",
    "InvalidOptionError",
    "InvalidValueError",
    "LeaseLostError",
    "MigrationChecksumError",
    "MigrationError",
    "MissingExtraError",
    "MsstoreError",
    "NoLeaderError",
    "NotFoundError",
    "NotOpenError",
    "NotSerializableError",
    "PendingWritesError",
    "RoutingError",
    "ServiceError",
    "StoreError",
    "StoreTimeoutError",
    "StoreUnavailableError",
    "SyncUnsupportedError",
    "UnderReplicatedWarning",
    "ValueTooLargeError",
]

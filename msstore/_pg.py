"""The one PostgreSQL error policy: what each asyncpg/OS error means to a msstore caller.

=====================================================  ==========================  =========
raised by asyncpg / the OS                             msstore raises              retried
=====================================================  ==========================  =========
``OSError`` (refused, reset…), ``InterfaceError``      StoreUnavailableError       yes
(closed connection or pool), class 08 connection
errors (``ConnectionDoesNotExistError`` …),
``CannotConnectNowError``, ``AdminShutdownError``,
``CrashShutdownError``, class 53 (``TooManyConnections
Error``, disk full, out of memory), class 40
(serialization failure, deadlock)
``TimeoutError`` (client ``timeout=``),                StoreTimeoutError           yes
``QueryCanceledError`` (``statement_timeout``),        (the statement may still
``LockNotAvailableError`` (``lock_timeout``)           have been applied)
class 22 ``DataError``, class 23 integrity             DataRejectedError           no
violations, the client-side ``DataError`` (an          (an InvalidValueError)
argument asyncpg cannot encode)
any other ``PostgresError`` (undefined table,          StoreError                  no
syntax error, permission): a bug or a missing
migration, never reported as "unavailable"
a :class:`MsstoreError`                                itself, unchanged           its kind
anything else (a bug in msstore)                       not translated              no
=====================================================  ==========================  =========

``pg_errors(what)`` translates inside a ``with`` block, ``await pg_call(what, aw)`` around one
awaitable, ``pg_error(what, e)`` builds the error; ``retryable(e)`` tells a background writer
whether trying again can help. The original error is always kept as ``__cause__``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Iterator
from typing import TypeVar

import asyncpg
import asyncpg.exceptions
import asyncpg.exceptions._base

from .errors import (
    DataRejectedError,
    MsstoreError,
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
)

T = TypeVar("T")

#: Server errors that mean "cannot talk to PostgreSQL right now": retried.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,      # class 08, incl. ConnectionDoesNotExistError
    asyncpg.CannotConnectNowError,        # 57P03: starting up / shutting down
    asyncpg.AdminShutdownError,           # 57P01
    asyncpg.CrashShutdownError,           # 57P02
    asyncpg.InsufficientResourcesError,   # class 53, incl. TooManyConnectionsError
    asyncpg.TransactionRollbackError,     # class 40: serialization failure, deadlock
    asyncpg.InterfaceError,               # client side: connection or pool closed
    OSError,                              # refused, reset, unreachable
)
#: Errors that mean "it did not answer in time": the statement may have been applied.
TIMEOUT: tuple[type[BaseException], ...] = (
    TimeoutError,                         # the client's timeout= (before OSError: a subclass)
    asyncpg.QueryCanceledError,           # 57014: statement_timeout
    asyncpg.LockNotAvailableError,        # 55P03: lock_timeout
)
#: Errors about a value: the same value fails again, so they are not retried.
DATA: tuple[type[BaseException], ...] = (
    asyncpg.DataError,                    # class 22: invalid text representation, NUL …
    asyncpg.IntegrityConstraintViolationError,  # class 23: unique, foreign key, check
    asyncpg.exceptions._base.DataError,   # client side: an argument asyncpg cannot encode
)
#: Everything :func:`pg_errors` translates; other exceptions pass through untouched.
TRANSLATED: tuple[type[BaseException], ...] = (asyncpg.PostgresError, *UNAVAILABLE, *TIMEOUT)


def _kind(exc: BaseException) -> type[MsstoreError] | None:
    """The msstore error class for ``exc`` (order matters: the tuples overlap)."""
    if isinstance(exc, MsstoreError):
        return type(exc)
    if isinstance(exc, DATA):  # before InterfaceError: the client DataError is one
        return DataRejectedError
    if isinstance(exc, TIMEOUT):  # before OSError: TimeoutError is one
        return StoreTimeoutError
    if isinstance(exc, UNAVAILABLE):
        return StoreUnavailableError
    if isinstance(exc, asyncpg.PostgresError):
        return StoreError
    return None


def _sqlstate(exc: BaseException) -> str:
    state = getattr(exc, "sqlstate", None)
    return f", SQLSTATE {state}" if state else ""


def pg_error(what: str, exc: BaseException) -> MsstoreError:
    """The msstore error for PostgreSQL failing to ``what`` (e.g. "load agent 1f…").

    A :class:`MsstoreError` is returned as it is; an exception this policy does not know
    becomes a :class:`StoreError` (callers normally only pass what :data:`TRANSLATED` holds).
    """
    kind = _kind(exc)
    if isinstance(exc, MsstoreError):
        return exc
    if kind is StoreTimeoutError:
        return StoreTimeoutError(
            f"{what}: PostgreSQL did not answer in time ({exc!r}); the statement may still "
            "have been applied, so read back before repeating a write, or raise the timeout")
    if kind is StoreUnavailableError:
        return StoreUnavailableError(
            f"{what}: PostgreSQL is unavailable ({exc!r}); retry once it is reachable")
    if kind is DataRejectedError:
        return DataRejectedError(
            f"{what}: PostgreSQL refused a value ({type(exc).__name__}{_sqlstate(exc)}: "
            f"{exc}); retrying the same value fails again")
    return StoreError(
        f"{what}: PostgreSQL refused the statement ({type(exc).__name__}{_sqlstate(exc)}: "
        f"{exc}); this is a bug or a missing migration, not an outage")


def retryable(exc: BaseException) -> bool:
    """True when trying the same statement again later can succeed (outage or timeout)."""
    kind = _kind(exc)
    return kind is not None and issubclass(kind, StoreUnavailableError)


@contextlib.contextmanager
def pg_errors(what: str) -> Iterator[None]:
    """Translate PostgreSQL errors raised inside the block by :func:`pg_error`."""
    try:
        yield
    except MsstoreError:
        raise
    except TRANSLATED as e:
        raise pg_error(what, e) from e


async def pg_call(what: str, aw: Awaitable[T]) -> T:
    """``await aw`` with :func:`pg_errors` around it (cancellation passes through)."""
    with pg_errors(what):
        return await aw


__all__ = ["DATA", "TIMEOUT", "TRANSLATED", "UNAVAILABLE", "pg_call", "pg_error", "pg_errors",
           "retryable"]

"""The PostgreSQL error policy (msstore._pg), checked with real asyncpg exception classes."""

from __future__ import annotations

import asyncio

import asyncpg
import asyncpg.exceptions
import asyncpg.exceptions._base
import pytest

from msstore._pg import pg_call, pg_error, pg_errors, retryable
from msstore.errors import (
    DataRejectedError,
    InvalidValueError,
    MsstoreError,
    NotSerializableError,
    PendingWritesError,
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
)

E = asyncpg.exceptions

#: (the exception asyncpg or the OS raises, the msstore class expected, retryable?)
POLICY: list[tuple[BaseException, type[MsstoreError], bool]] = [
    (ConnectionRefusedError(111, "Connection refused"), StoreUnavailableError, True),
    (ConnectionResetError(104, "reset by peer"), StoreUnavailableError, True),
    (OSError("Network is unreachable"), StoreUnavailableError, True),
    (asyncpg.InterfaceError("pool is closing"), StoreUnavailableError, True),
    (E.ConnectionDoesNotExistError("connection was closed"), StoreUnavailableError, True),
    (E.ConnectionFailureError("connection failure"), StoreUnavailableError, True),
    (E.CannotConnectNowError("the database system is starting up"), StoreUnavailableError,
     True),
    (E.TooManyConnectionsError("too many clients"), StoreUnavailableError, True),
    (E.AdminShutdownError("terminating connection"), StoreUnavailableError, True),
    (E.CrashShutdownError("crash"), StoreUnavailableError, True),
    (E.SerializationError("could not serialize"), StoreUnavailableError, True),
    (E.DeadlockDetectedError("deadlock detected"), StoreUnavailableError, True),
    (TimeoutError(), StoreTimeoutError, True),
    (E.QueryCanceledError("canceling statement due to statement timeout"), StoreTimeoutError,
     True),
    (E.LockNotAvailableError("lock timeout"), StoreTimeoutError, True),
    (E.InvalidTextRepresentationError("invalid input syntax"), DataRejectedError, False),
    (E.UntranslatableCharacterError("unsupported Unicode escape"), DataRejectedError, False),
    (E.NumericValueOutOfRangeError("out of range"), DataRejectedError, False),
    (E.UniqueViolationError("duplicate key"), DataRejectedError, False),
    (E.ForeignKeyViolationError("violates foreign key"), DataRejectedError, False),
    (E.CheckViolationError("violates check constraint"), DataRejectedError, False),
    (E.NotNullViolationError("null value"), DataRejectedError, False),
    (asyncpg.exceptions._base.DataError("invalid input for query argument $1"),
     DataRejectedError, False),
    (E.UndefinedTableError('relation "agents.nope" does not exist'), StoreError, False),
    (E.UndefinedColumnError("column does not exist"), StoreError, False),
    (E.PostgresSyntaxError("syntax error at or near"), StoreError, False),
    (E.InsufficientPrivilegeError("permission denied"), StoreError, False),
    (E.UndefinedFunctionError("function does not exist"), StoreError, False),
]


@pytest.mark.parametrize(("raw", "expected", "retry"), POLICY,
                         ids=[type(r).__name__ for r, _e, _r in POLICY])
def test_each_error_maps_to_exactly_one_class(raw: BaseException,
                                              expected: type[MsstoreError],
                                              retry: bool) -> None:
    err = pg_error("load agent 7", raw)
    assert type(err) is expected
    assert str(err).startswith("load agent 7: ")
    assert retryable(raw) is retry and retryable(err) is retry
    with pytest.raises(expected) as info, pg_errors("load agent 7"):
        raise raw
    assert type(info.value) is expected and info.value.__cause__ is raw


def test_the_kinds_say_what_to_do_and_keep_the_stdlib_types() -> None:
    timeout = pg_error("flush", E.QueryCanceledError("statement timeout"))
    assert "may still have been applied" in str(timeout)
    assert isinstance(timeout, TimeoutError) and isinstance(timeout, ConnectionError)
    down = pg_error("flush", ConnectionRefusedError(111, "refused"))
    assert "retry" in str(down) and isinstance(down, ConnectionError)
    bug = pg_error("flush", E.UndefinedTableError('relation "x" does not exist'))
    assert not isinstance(bug, StoreUnavailableError)
    assert "42P01" in str(bug) and "missing migration" in str(bug)
    data = pg_error("flush", E.UniqueViolationError("duplicate key"))
    assert isinstance(data, InvalidValueError) and isinstance(data, ValueError)
    assert "23505" in str(data)


def test_msstore_errors_pass_through_unchanged() -> None:
    for own in (NotSerializableError("x"), StoreTimeoutError("t"), PendingWritesError("p", [],
                                                                                        None)):
        assert pg_error("x", own) is own
        with pytest.raises(type(own)) as info, pg_errors("x"):
            raise own
        assert info.value is own and info.value.__cause__ is None
    assert retryable(PendingWritesError("p", [], None))
    assert not retryable(NotSerializableError("x"))


def test_other_exceptions_are_not_translated_nor_retryable() -> None:
    with pytest.raises(KeyError), pg_errors("x"):
        raise KeyError("a bug in msstore stays a bug")
    assert not retryable(KeyError("k")) and not retryable(ValueError("v"))
    assert type(pg_error("x", KeyError("k"))) is StoreError


async def test_pg_call_translates_and_lets_cancellation_through() -> None:
    async def fails() -> None:
        raise E.AdminShutdownError("terminating connection due to administrator command")

    with pytest.raises(StoreUnavailableError, match=r"^read row: PostgreSQL is unavailable"):
        await pg_call("read row", fails())

    async def ok() -> int:
        return 7

    assert await pg_call("read row", ok()) == 7
    task = asyncio.create_task(pg_call("sleep", asyncio.sleep(10)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

"""TaskQueue's checks and messages: everything that is decided before (or without) I/O."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

import msstore
from msstore._managed import Lifetime
from msstore._task_checks import check_attempts as attempts
from msstore._task_checks import check_priority as priority
from msstore._task_checks import check_task_type as task_type
from msstore._task_checks import check_types, check_when, lease_lost_message
from msstore._task_checks import check_worker as worker
from msstore.tasks import TaskQueue


class NoPool:
    """A pool that fails the test if anything reaches it: checks must come first."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the pool was used ({name}) before the input was checked")


class FakeConnection:
    pool = NoPool()


@pytest.fixture
def queue() -> TaskQueue:
    q = TaskQueue(FakeConnection())  # type: ignore[arg-type]
    q._state = Lifetime.OPEN
    return q


def test_run_after_and_expires_at_take_an_aware_datetime_or_seconds_from_now() -> None:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    assert check_when("run_after", at) == (at, None)
    assert check_when("run_after", 2) == (None, 2.0)
    assert check_when("run_after", None) == (None, None)
    for bad in (datetime(2030, 1, 1), -1, True, "soon", float("nan")):
        with pytest.raises(msstore.InvalidValueError, match="run_after"):
            check_when("run_after", bad)


@pytest.mark.parametrize("check, bad", [
    (task_type, ""), (task_type, "x" * 51), (task_type, 3), (worker, ""), (worker, None),
    (priority, True), (priority, 2**31), (priority, 1.5), (attempts, 0), (attempts, False),
    (check_types, "one-type-not-a-list"), (check_types, ["", "x"]),
])
def test_each_check_refuses_its_bad_values_with_an_invalid_value_error(check: Any,
                                                                        bad: object) -> None:
    with pytest.raises(msstore.InvalidValueError):
        check(bad)


def test_an_empty_types_list_means_every_type() -> None:
    assert check_types([]) is None and check_types(("a", "b")) == ["a", "b"]


def test_the_lease_lost_message_says_why_from_the_row_as_it_is_now() -> None:
    tid = uuid.uuid4()
    cases = {
        None: "does not exist",
        "done": "it is done, not running",
        "theirs": "held by 'B'",
        "mine": "lease ran out",
    }
    rows: dict[str, dict[str, Any] | None] = {
        "done": {"status": "done", "lease_owner": None},
        "theirs": {"status": "running", "lease_owner": "B"},
        "mine": {"status": "running", "lease_owner": "A"},
    }
    for case, expected in cases.items():
        message = lease_lost_message("completing", tid, "A", rows.get(case or ""))
        assert expected in message and str(tid) in message and "nothing was changed" in message


async def test_bad_input_never_reaches_the_database(queue: TaskQueue) -> None:
    with pytest.raises(msstore.InvalidValueError):
        await queue.enqueue("t", {}, priority="high")  # type: ignore[arg-type]
    with pytest.raises(msstore.InvalidValueError, match="not both"):
        await queue.enqueue("t", {}, ttl=5, expires_at=datetime.now(UTC))
    with pytest.raises(msstore.InvalidValueError, match="payloads"):
        await queue.enqueue_many("t", "abc")
    with pytest.raises(msstore.NotSerializableError):
        await queue.enqueue_many("t", [{"ok": 1}, object()])
    with pytest.raises(msstore.InvalidOptionError, match="limit"):
        await queue.claim("w", limit=0)
    with pytest.raises(msstore.InvalidOptionError, match="wait"):
        await queue.claim("w", wait=-1)
    with pytest.raises(msstore.InvalidValueError, match="results"):
        await queue.complete_many("w", [uuid.uuid4()], [1, 2])
    with pytest.raises(msstore.InvalidValueError, match="retry_in"):
        await queue.fail(uuid.uuid4(), "w", "boom", retry_in=-1)
    with pytest.raises(msstore.InvalidValueError, match="error must be a str"):
        await queue.fail(uuid.uuid4(), "w", RuntimeError("x"))  # type: ignore[arg-type]
    with pytest.raises(msstore.InvalidOptionError, match="lease"):
        await queue.extend(uuid.uuid4(), "w", 0)
    assert await queue.enqueue_many("t", []) == []  # nothing to write: no statement


def test_options_are_checked_when_the_queue_is_made() -> None:
    with pytest.raises(msstore.InvalidOptionError, match="recheck_interval"):
        TaskQueue(FakeConnection(), recheck_interval=0)  # type: ignore[arg-type]

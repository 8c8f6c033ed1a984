"""msstore.MessageLog against the real PostgreSQL: order under concurrent appends, keyset
paging without gaps or repeats, an agent's conversation, retention, and the indexes in use."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

import msstore
from msstore import (
    InvalidAgentIdError,
    InvalidCursorError,
    InvalidKeyError,
    InvalidOptionError,
    InvalidValueError,
    MessageLog,
    MessageLogStore,
    services,
)
from msstore import messages as ml

Unique = Callable[[str], str]


async def _channel_rows(ms: msstore.Connection, channel: str) -> list[int]:
    rows = await ms.pool.fetch("SELECT position FROM messages.log WHERE channel = $1 "
                               "ORDER BY position", channel)
    return [r["position"] for r in rows]


# --------------------------------------------------------------------------- appending


async def test_appends_get_consecutive_channel_and_agent_positions(
        ms: msstore.Connection, unique: Unique) -> None:
    log = MessageLog(ms)
    chat, other, agent = unique("chat"), unique("other"), uuid.uuid4()
    one = await log.append(chat, {"n": 0}, agent_id=agent)
    many = await log.append_many(chat, [{"n": n} for n in range(1, 5)], agent_id=str(agent))
    elsewhere = await log.append(other, {"n": 5}, agent_id=agent)
    assert [m.position for m in [one, *many]] == [1, 2, 3, 4, 5]
    assert [m.agent_position for m in [one, *many, elsewhere]] == [1, 2, 3, 4, 5, 6]
    assert elsewhere.position == 1 and elsewhere.channel == other
    assert {m.agent_id for m in many} == {str(agent)}
    assert await log.append_many(chat, []) == []
    from_generator = await log.append_many(other, ({"g": g} for g in range(2)))
    assert [(m.position, m.payload) for m in from_generator] == [(2, {"g": 0}), (3, {"g": 1})]
    # the DataStorage view appends through the same statement: its messages page here too
    store_id = await MessageLogStore(ms.pool).store(chat, {"n": 6})
    page = await log.page(chat)
    assert [m.position for m in page.messages] == [1, 2, 3, 4, 5, 6] and len(page) == 6
    assert page.messages[-1].message_id == store_id and page.messages[-1].agent_id is None
    assert [m.payload["n"] for m in page.messages] == [0, 1, 2, 3, 4, 6]


# --------------------------------------------------------------------------- order


async def _waiting_on_a_lock(ms: msstore.Connection) -> int:
    return int(await ms.pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND query LIKE '%channel_heads%'"))


async def test_a_naive_identity_log_skips_a_late_commit_and_the_message_log_does_not(
        ms: msstore.Connection, unique: Unique) -> None:
    """A holds its append open; B appends after it; a follower reads, then A commits.

    With an IDENTITY order (the control table) B's higher seq is visible first, the follower
    moves past A's lower seq and never sees it. With MessageLog, B waits on the channel's
    head row until A commits, so the follower sees nothing, then both, in order.
    """
    naive = unique("naive_log")
    app = await ms.pool.fetchval("SELECT current_user")
    async with ms.owner_connection() as owner:  # the application role has no DDL
        await owner.execute(f"CREATE TABLE {naive} (seq BIGINT GENERATED ALWAYS AS IDENTITY, "
                            "payload TEXT NOT NULL)")
        await owner.execute(f'GRANT SELECT, INSERT ON {naive} TO "{app}"')
    async with ms.pool.acquire() as a:
        async with a.transaction():
            await a.execute(f"INSERT INTO {naive} (payload) VALUES ('a')")
            await ms.pool.execute(f"INSERT INTO {naive} (payload) VALUES ('b')")  # commits
            seen = [r["payload"] for r in await ms.pool.fetch(
                f"SELECT payload FROM {naive} WHERE seq > 0 ORDER BY seq")]
            cursor = await ms.pool.fetchval(f"SELECT max(seq) FROM {naive}")
        seen += [r["payload"] for r in await ms.pool.fetch(
            f"SELECT payload FROM {naive} WHERE seq > $1 ORDER BY seq", cursor)]
    assert seen == ["b"]  # 'a' committed and was skipped: the harness can fail
    async with ms.owner_connection() as owner:
        await owner.execute(f"DROP TABLE {naive}")

    chat, log = unique("chat"), MessageLog(ms)
    async with ms.pool.acquire() as a:
        tx = a.transaction()
        await tx.start()
        held = await MessageLog(a).append(chat, "a")
        later = asyncio.create_task(log.append(chat, "b"))
        for _ in range(500):  # until B's backend waits on A's lock (not a timing assert)
            if await _waiting_on_a_lock(ms):
                break
            await asyncio.sleep(0.01)
        assert await _waiting_on_a_lock(ms) == 1 and not later.done()
        empty = await log.page(chat, after=0)
        await tx.commit()
    b = await later
    page = await log.page(chat, after=empty.next_cursor)
    assert (empty.messages, empty.next_cursor) == ((), 0)
    assert [(m.payload, m.position) for m in page.messages] == [("a", 1), ("b", 2)]
    assert (held.position, b.position) == (1, 2)


async def test_a_follower_sees_every_concurrent_append_once_in_order(
        database_url: str, endpoints: services.Endpoints, unique: Unique) -> None:
    """12 connections append to one channel in transactions held open a random 0-3 ms after
    the append (singles and blocks of 3) while a follower pages with ``after=``.

    With the append's positions drawn from a sequence instead of the head row (the naive
    design), this test fails: checked while writing it, 3 runs out of 3.
    """
    writers, transactions = 12, 25
    chat = unique("busy")
    async with msstore.connect(database_url, endpoints.nats_url, max_size=writers + 2) as c:
        log = MessageLog(c)
        appended: list[str] = []
        done = asyncio.Event()

        async def writer(w: int) -> None:
            rng = random.Random(w)
            i = 0
            for _ in range(transactions):
                n = rng.choice((1, 3))
                async with c.pool.acquire() as conn, conn.transaction():
                    got = await MessageLog(conn).append_many(
                        chat, [{"w": w, "i": i + k} for k in range(n)])
                    await asyncio.sleep(rng.random() * 0.003)
                appended.extend(m.message_id for m in got)
                i += n

        seen: list[ml.Message] = []

        async def follower() -> None:
            cursor = 0
            while True:
                finished = done.is_set()  # read before the page: then the page is the last
                page = await log.page(chat, after=cursor, limit=64)
                seen.extend(page.messages)
                assert page.next_cursor is not None
                cursor = page.next_cursor
                if finished and not page.has_more:
                    return

        reader = asyncio.create_task(follower())
        await asyncio.gather(*(writer(w) for w in range(writers)))
        done.set()
        await reader
    positions = [m.position for m in seen]
    assert len(appended) == len(set(appended)) > writers * transactions
    assert positions == list(range(1, len(appended) + 1))  # no gap, no repeat, in order
    assert sorted(m.message_id for m in seen) == sorted(appended)
    for w in range(writers):  # each writer's messages in the order it appended them
        mine = [m.payload["i"] for m in seen if m.payload["w"] == w]
        assert mine == list(range(len(mine))) and mine


# --------------------------------------------------------------------------- paging


async def test_paging_forward_and_backward_over_thousands_has_no_gaps_or_repeats(
        ms: msstore.Connection, unique: Unique) -> None:
    log, chat, noise = MessageLog(ms), unique("long"), unique("noise")
    total = 3_000
    for start in range(0, total, 500):  # interleaved with another channel's appends
        await log.append_many(chat, [{"n": n} for n in range(start, start + 500)])
        await log.append_many(noise, [{"n": -1}] * 50)

    forward: list[int] = []
    page = await log.page(chat, after=0, limit=97)
    pages = 1
    forward += [m.payload["n"] for m in page.messages]
    while page.has_more:
        page = await log.page(chat, after=page.next_cursor, limit=97)
        forward += [m.payload["n"] for m in page.messages]
        pages += 1
    assert forward == list(range(total)) and pages == -(-total // 97)
    tail = await log.page(chat, after=page.next_cursor)
    assert (tail.messages, tail.next_cursor, tail.has_more) == ((), total, False)

    backward: list[int] = []
    page = await log.page(chat, limit=101)  # the latest page, then before=
    backward = [m.payload["n"] for m in page.messages] + backward
    while page.has_more:
        page = await log.page(chat, before=page.next_cursor, limit=101)
        backward = [m.payload["n"] for m in page.messages] + backward
    assert backward == list(range(total)) and page.next_cursor == 1

    between = await log.page(chat, after=100, before=200, limit=500)
    assert [m.position for m in between.messages] == list(range(101, 200))
    assert not between.has_more and between.next_cursor == 199
    first_half = await log.page(chat, after=100, before=200, limit=50)
    assert first_half.has_more and first_half.next_cursor == 150

    # a removed message leaves a hole that paging steps over
    removed = between.messages[10]
    await MessageLogStore(ms.pool).remove(removed.message_id)
    around = await log.page(chat, after=105, limit=10)
    assert [m.position for m in around.messages] == [p for p in range(106, 117)
                                                     if p != removed.position]


async def test_an_agents_conversation_spans_channels_in_the_order_it_appended(
        ms: msstore.Connection, unique: Unique) -> None:
    log, agent, someone = MessageLog(ms), uuid.uuid4(), uuid.uuid4()
    plan, tools, chat = unique("plan"), unique("tools"), unique("chat")
    said: list[tuple[str, int]] = []
    for n in range(30):
        channel = (plan, tools, chat)[n % 3]
        await log.append(channel, {"n": n}, agent_id=agent)
        await log.append(channel, {"n": -n}, agent_id=someone)  # another agent, same channels
        said.append((channel, n))

    forward: list[tuple[str, int]] = []
    page = await log.conversation(agent, after=0, limit=7)
    forward += [(m.channel, m.payload["n"]) for m in page.messages]
    while page.has_more:
        page = await log.conversation(agent, after=page.next_cursor, limit=7)
        forward += [(m.channel, m.payload["n"]) for m in page.messages]
    assert forward == said

    latest = await log.conversation(str(agent), limit=4)
    assert [m.payload["n"] for m in latest.messages] == [26, 27, 28, 29]
    older = await log.conversation(agent, before=latest.next_cursor, limit=4)
    assert [m.agent_position for m in older.messages] == [23, 24, 25, 26]

    only = await log.conversation(agent, channels=[plan, chat], after=0, limit=100)
    assert [(m.channel, m.payload["n"]) for m in only.messages] == \
        [s for s in said if s[0] != tools]
    assert (await log.conversation(uuid.uuid4())).messages == ()


# --------------------------------------------------------------------------- retention


async def test_retention_by_count_keeps_the_newest_n_of_one_channel(
        ms: msstore.Connection, unique: Unique) -> None:
    log, chat, other = MessageLog(ms), unique("chat"), unique("other")
    await log.append_many(chat, list(range(100)))
    await log.append_many(other, list(range(10)))
    assert await log.trim(chat, keep=30) == 70
    assert await _channel_rows(ms, chat) == list(range(71, 101))
    assert await log.trim(chat, keep=30) == 0
    assert await log.trim(chat, keep=500) == 0
    assert len(await _channel_rows(ms, other)) == 10  # another channel is untouched
    assert await log.trim(chat, keep=0) == 30
    # positions are never reused, so a follower's cursor stays valid after retention
    after = await log.append(chat, "next")
    assert after.position == 101 and await _channel_rows(ms, chat) == [101]


async def test_retention_by_age_deletes_only_older_messages_of_one_channel(
        ms: msstore.Connection, unique: Unique) -> None:
    log, chat, other = MessageLog(ms), unique("chat"), unique("other")
    await log.append_many(chat, list(range(50)))
    await log.append_many(other, list(range(5)))
    # the fault: 20 messages (and all of the other channel's) appended two hours ago
    await ms.pool.execute("UPDATE messages.log SET created_at = created_at - interval '2 hours'"
                          " WHERE (channel = $1 AND position <= 20) OR channel = $2",
                          chat, other)
    assert await log.expire(chat, older_than=timedelta(hours=3)) == 0
    assert await log.expire(chat, older_than=3600) == 20
    assert await _channel_rows(ms, chat) == list(range(21, 51))
    assert await log.expire(chat, older_than=3600.0) == 0
    assert len(await _channel_rows(ms, other)) == 5


# --------------------------------------------------------------------------- indexes


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += _nodes(child)
    return found


async def test_the_paging_and_retention_queries_use_their_indexes(
        ms: msstore.Connection, unique: Unique) -> None:
    """At 10,000+ rows (40 channels, 40 agents), vacuumed and analysed as autovacuum keeps a
    table, with the planner's default settings: each page is an index scan on its index in
    index order (no Seq Scan, no Sort); a retention delete that removes many rows may read
    its index as a bitmap."""
    log = MessageLog(ms)
    channels = [unique("c") for _ in range(40)]
    agents = [uuid.uuid4() for _ in range(40)]
    for channel, agent in zip(channels, agents, strict=True):
        await log.append_many(channel, [{"n": n} for n in range(250)], agent_id=agent)
    async with ms.owner_connection() as owner:  # VACUUM is the owner's (or autovacuum's)
        await owner.execute("VACUUM (ANALYZE) messages.log")  # what autovacuum keeps up
    chat, agent = channels[7], agents[7]
    pages = ("Index Scan",)
    deletes = ("Index Scan", "Index Only Scan", "Bitmap Index Scan")
    queries = {
        "page after": (ml.CHANNEL_FORWARD, (chat, 100, 2**63 - 1, 51),
                       "idx_log_channel_position", pages),
        "page before": (ml.CHANNEL_BACKWARD, (chat, 200, 51), "idx_log_channel_position",
                        pages),
        "conversation after": (ml.AGENT_FORWARD, (agent, 100, 2**63 - 1, 51, None),
                               "idx_log_agent_position", pages),
        "conversation before": (ml.AGENT_BACKWARD, (agent, 200, 51, None),
                                "idx_log_agent_position", pages),
        "trim": (ml.TRIM, (chat, 100), "idx_log_channel_position", deletes),
        "expire": (ml.EXPIRE, (chat, 3600.0), "idx_log_channel_created", deletes),
    }
    for name, (sql, args, index, allowed) in queries.items():
        raw = await ms.pool.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args)
        nodes = _nodes((json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"])
        kinds = {n["Node Type"] for n in nodes}
        scans = {(n["Node Type"], n.get("Index Name")) for n in nodes if "Index Name" in n}
        assert any(i == index and k in allowed for k, i in scans), (name, scans)
        assert not kinds & {"Seq Scan", "Sort"}, (name, kinds)


# --------------------------------------------------------------------------- bad input


async def test_bad_cursors_limits_channels_and_options_are_typed_and_write_nothing(
        ms: msstore.Connection, unique: Unique) -> None:
    log, chat = MessageLog(ms), unique("chat")
    await log.append(chat, 1)
    for bad in (-1, "5", True, 1.5, 2**63):
        with pytest.raises(InvalidCursorError, match="must be a position"):
            await log.page(chat, after=bad)
        with pytest.raises(InvalidCursorError, match="must be a position"):
            await log.conversation(uuid.uuid4(), before=bad)
    with pytest.raises(InvalidCursorError, match="after=5 must be below before=5"):
        await log.page(chat, after=5, before=5)
    for limit in (0, -3, True, "10", ml.MAX_PAGE + 1):
        with pytest.raises(InvalidOptionError, match="limit"):
            await log.page(chat, limit=limit)
    for channel in ("", 5, None, "x" * (ml.MAX_CHANNEL + 1), "a\x00b"):
        with pytest.raises(InvalidKeyError, match="channel"):
            await log.append(channel, 1)  # type: ignore[arg-type]
        with pytest.raises(InvalidKeyError, match="channel"):
            await log.page(channel)  # type: ignore[arg-type]
    with pytest.raises(InvalidAgentIdError):
        await log.conversation("not-a-uuid")
    with pytest.raises(InvalidAgentIdError):
        await log.append(chat, 2, agent_id="not-a-uuid")
    with pytest.raises(InvalidValueError, match="sequence of channel names"):
        await log.conversation(uuid.uuid4(), channels=chat)
    with pytest.raises(InvalidValueError, match="sequence of payloads"):
        await log.append_many(chat, {"a": 1})
    with pytest.raises(InvalidOptionError, match="keep"):
        await log.trim(chat, keep=-1)
    for older in (0, -1.0, float("inf"), "1h"):
        with pytest.raises(InvalidOptionError, match="older_than"):
            await log.expire(chat, older_than=older)  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError, match="MessageLog takes"):
        MessageLog("postgresql://nowhere")  # type: ignore[arg-type]
    assert await _channel_rows(ms, chat) == [1]


async def test_a_closed_pool_is_a_typed_error(database_url: str,
                                             endpoints: services.Endpoints,
                                             unique: Unique) -> None:
    conn = await msstore.connect(database_url, endpoints.nats_url)
    log = MessageLog(conn)
    await conn.close()
    with pytest.raises(msstore.StoreUnavailableError, match="appending 1 message"):
        await log.append(unique("chat"), 1)
    with pytest.raises(msstore.StoreUnavailableError, match="paging channel"):
        await log.page(unique("chat"))

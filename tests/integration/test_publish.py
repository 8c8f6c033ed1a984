"""The publisher (acks on one inbox) against a real JetStream: what ``js.publish`` and
``KeyValue`` would store and raise, on its protocol fast path and on nats-py's ``publish``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import nats.errors
import nats.js.errors
import pytest
from nats.js.kv import KV_DEL, KeyValue

import msstore
from msstore import _publish
from msstore._nats import kv_prefix
from msstore._publish import Publisher, kv_update, publish_delete, publisher


@pytest.fixture(params=["raw", "nats-py"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a publish leaves: the protocol line built here, or ``nc.publish``."""
    if request.param == "nats-py":
        monkeypatch.setattr(_publish, "_raw_writes", lambda nc: False)
    return str(request.param)


@pytest.fixture
async def bucket(ms: msstore.Connection, unique: Callable[[str], str]
                 ) -> AsyncIterator[tuple[str, KeyValue]]:
    name = unique("pub")
    kv = await ms.js.create_key_value(bucket=name, history=5)
    try:
        yield name, kv
    finally:
        await ms.js.delete_key_value(name)


async def test_a_put_is_stored_exactly_under_the_revision_it_returns(
        ms: msstore.Connection, bucket: tuple[str, KeyValue], path: str) -> None:
    name, kv = bucket
    pub = publisher(ms.nc)
    data = bytes(range(256)) * 40  # every byte value, CR and LF included
    first = await pub.publish(kv_prefix(name) + "a.b", data)
    second = await pub.publish(kv_prefix(name) + "a.b", b"")
    entry = await kv.get("a.b", revision=first)
    assert (entry.value, entry.revision) == (data, first)
    assert second == first + 1 and (await kv.get("a.b")).value in (b"", None)
    assert pub._futures == {}  # nothing left waiting


async def test_concurrent_publishes_each_get_their_own_revision(
        ms: msstore.Connection, bucket: tuple[str, KeyValue], path: str) -> None:
    name, kv = bucket
    pub = publisher(ms.nc)
    revisions = await asyncio.gather(*(pub.publish(kv_prefix(name) + f"k{i}", str(i).encode())
                                       for i in range(500)))
    assert sorted(revisions) == list(range(min(revisions), min(revisions) + 500))
    for i in (0, 137, 499):
        entry = await kv.get(f"k{i}")
        assert (entry.value, entry.revision) == (str(i).encode(), revisions[i])
    assert pub._futures == {}


async def test_a_compare_and_set_loses_to_a_newer_write_as_kv_update_does(
        ms: msstore.Connection, bucket: tuple[str, KeyValue], path: str) -> None:
    name, kv = bucket
    subject = kv_prefix(name) + "head"
    r1 = await kv.put("head", b"one")
    r2 = await kv_update(ms.nc, subject, b"two", last=r1)
    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
        await kv_update(ms.nc, subject, b"three", last=r1)  # r2 came in between
    entry = await kv.get("head")
    assert (entry.value, entry.revision) == (b"two", r2)


async def test_a_delete_marker_is_what_kv_delete_writes(
        ms: msstore.Connection, bucket: tuple[str, KeyValue], path: str) -> None:
    name, kv = bucket
    await kv.put("gone", b"x")
    revision = await publish_delete(ms.nc, kv_prefix(name) + "gone")
    with pytest.raises(nats.js.errors.KeyNotFoundError) as e:
        await kv.get("gone")
    assert e.value.op == KV_DEL
    assert (await kv.status()).values == revision  # the marker is the stream's last message


async def test_a_subject_no_stream_listens_on_is_no_stream_response(
        ms: msstore.Connection, unique: Callable[[str], str], path: str) -> None:
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await publisher(ms.nc).publish(f"msstore.nostream.{unique('s')}", b"x")


async def test_an_ack_that_never_comes_is_a_timeout_and_leaves_nothing_waiting(
        ms: msstore.Connection, unique: Callable[[str], str], path: str) -> None:
    subject = f"msstore.silent.{unique('s')}"
    got: list[bytes] = []

    async def silent(msg: nats.aio.msg.Msg) -> None:  # a responder that never answers
        got.append(msg.data)

    sub = await ms.nc.subscribe(subject, cb=silent)
    pub = Publisher(ms.nc, timeout=0.2)
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await pub.publish(subject, b"x")
    finally:
        await sub.unsubscribe()
    assert got == [b"x"] and pub._futures == {}


async def test_a_value_over_the_max_payload_is_refused_before_it_is_sent(
        ms: msstore.Connection, bucket: tuple[str, KeyValue], path: str) -> None:
    name, kv = bucket
    with pytest.raises(nats.errors.MaxPayloadError):
        await publisher(ms.nc).publish(kv_prefix(name) + "big", b"x" * (ms.nc.max_payload + 1))
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get("big")

"""The servers themselves fail, for real, under load; no acknowledged write may be lost.

Three faults, each against real servers (private ones for the servers that get killed):

1. **nats-server killed -9 and restarted** while in-process writers, readers and a subprocess
   writer (tests/crash_writer.py) keep going;
2. **PostgreSQL killed -9 and restarted** while the same load runs;
3. **three processes share the stream consumer** (one bucket, one durable) and each is killed
   -9 at random moments, restarted once or twice; a fresh manager flushes at the end.

Each test asserts, for every acknowledged write (the writers keep a :class:`Ledger`):
PostgreSQL holds it (value *and* version = the KV revision), KV and PostgreSQL agree on every
key (value and revision), and every exception a writer or reader saw was an
:class:`msstore.MsstoreError`. Each also proves that its checks can fail: the NATS and
PostgreSQL tests tamper with PostgreSQL afterwards and assert the same checks name exactly the
tampered keys; the process test runs the same harness with ``flusher="dirty-set"`` and asserts
that losses are found.

The rule for writes that failed (it decides which final states are acceptable)
-------------------------------------------------------------------------------
A write that raised was **not acknowledged**, but it may still have landed: a
:class:`StoreTimeoutError` says NATS did not answer, not that it did nothing (the server may
have stored the message and died before its ack left; or nats-py still holds the request in
its reconnect buffer and sends it once the server is back). Likewise the write in flight when
a writer process is killed -9. Such writes are *indeterminate*. A writer's writes to one key are
sequential on one connection, so its acknowledged write supersedes every indeterminate write
it made to that key before (if one landed, it landed first: a lower revision). Per key:

* ``last`` = the acknowledged write with the highest revision (over all writers);
* ``unsure`` = the indeterminate writes not superseded by a later acknowledgement of the same
  writer.

*Holds every acknowledged write*: the PostgreSQL row is exactly ``last`` (value and version),
or its version is higher than ``last``'s and its value is one of ``unsure`` (an indeterminate
write landed after it, and then it must be the final state). Nothing else passes: an older row,
a missing row, the right version with another value, or an unknown value.
*KV and PostgreSQL agree*: for every key, KV's (value, revision) equals the row's
(value, version), whichever of the acceptable states it is.

Also checked: acknowledged revisions are unique within the bucket (a server that lost its
acknowledged tail on restart would hand the same revisions out again), and after the NATS
restart the stream's last sequence is at least the highest revision acknowledged before.

kill -9 of nats-server and lazy fsync: JetStream fsyncs its file store only every
``sync_interval`` (2 minutes by default), but for a single-server (R1) file stream it writes
each message into its block file (``write(2)``, the OS page cache) before it sends the ack.
``kill -9`` ends the process, not the kernel: the page cache survives and reaches the disk, so
an acknowledged write is not lost by killing the server. Only an OS crash or power loss within
the sync interval could lose acknowledged writes (``sync_interval: always`` closes that, at a
cost); this suite cannot cause those. Test 1 shows it for the kill: nothing acknowledged
before the kill is missing afterwards. The same holds for PostgreSQL: a commit is in the WAL
(page cache at least) before the client hears of it.

Seeds: ``MSSTORE_FAULT_SEED`` fixes the random schedule; otherwise each test picks one and
prints it (shown by pytest for a failing test).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest

import msstore
from msstore import _durable, _nats, services
from msstore.codec import loads
from msstore.hybrid import HybridStateManager
from msstore.keys import join_key
from msstore.kv import DEFAULT_TTL_SECONDS, ensure_bucket
from tests.crash_writer import value_of

from .conftest import kill9, private_nats_url

CRASH_WRITER = Path(__file__).resolve().parents[1] / "crash_writer.py"
WRITERS = 4  # in-process writer tasks (each owns its keys)
KEYS_PER_WRITER = 25
READERS = 2
WARM_UP = 300  # acknowledged writes before a server is killed
AFTER = 300  # … and after it is back (and, for PostgreSQL, while it is down)
FAST = {"flush_threshold": 20, "flush_interval": 0.1, "max_backoff": 0.3}

AgentKey = tuple[uuid.UUID, str]


def seed_for(name: str) -> int:
    seed = int(os.environ.get("MSSTORE_FAULT_SEED") or random.randrange(2**32))
    print(f"{name}: seed {seed} (MSSTORE_FAULT_SEED={seed} repeats the schedule)")
    return seed


async def until(what: str, cond: Callable[[], bool], seconds: float) -> None:
    """Wait (bounded) for ``cond()``; fail with ``what`` if it never holds."""
    try:
        async with asyncio.timeout(seconds):
            while not cond():  # noqa: ASYNC110  (a condition on counters, not an event)
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out after {seconds} s waiting for {what}")


# --------------------------------------------------------------------------- the ledger


@dataclass
class Ledger:
    """What the writers know: per key the last acknowledged write, and the indeterminate ones."""

    last: dict[AgentKey, tuple[Any, int]] = field(default_factory=dict)
    #: indeterminate writes per key: writer -> values not superseded by that writer's acks
    unsure: dict[AgentKey, dict[str, list[Any]]] = field(default_factory=dict)
    revisions: list[int] = field(default_factory=list)  # every acknowledged revision
    errors: Counter[str] = field(default_factory=Counter)  # failed writes and reads by type
    foreign: list[BaseException | str] = field(default_factory=list)  # not an MsstoreError
    went_back: list[str] = field(default_factory=list)  # reads older than an acked write
    reads: int = 0
    #: every write that failed: [writer, key, value, revision of that writer's next ack there]
    failures: list[list[Any]] = field(default_factory=list)

    def ack(self, writer: str, k: AgentKey, value: Any, revision: int) -> None:
        self.revisions.append(revision)
        seen = self.last.get(k)
        if seen is None or seen[1] < revision:
            self.last[k] = (value, revision)
        mine = self.unsure.get(k)
        if mine is not None:
            mine.pop(writer, None)  # sequential on one connection: they came before
        for f in self.failures:
            if f[0] == writer and f[1] == k and f[3] is None:
                f[3] = revision

    def maybe(self, writer: str, k: AgentKey, value: Any) -> None:
        """A write that was not acknowledged but may have landed."""
        self.unsure.setdefault(k, {}).setdefault(writer, []).append(value)
        self.failures.append([writer, k, value, None])

    def failed(self, e: BaseException) -> None:
        self.errors[type(e).__name__] += 1
        if not isinstance(e, msstore.MsstoreError):
            self.foreign.append(e)

    def unsure_values(self, k: AgentKey) -> list[Any]:
        return [v for values in self.unsure.get(k, {}).values() for v in values]

    @property
    def acked(self) -> int:
        return len(self.revisions)

    def keys(self) -> set[AgentKey]:
        return set(self.last) | {k for k, w in self.unsure.items() if any(w.values())}


Row = tuple[Any, int]  # (value, version) or (value, revision)


@dataclass
class Verdict:
    lost: list[str]  # acknowledged writes PostgreSQL does not hold (by the rule above)
    disagree: list[str]  # keys where KV and PostgreSQL differ
    landed_unsure: int  # keys whose final state is an indeterminate write
    checked: int


def verify(ledger: Ledger, pg: dict[AgentKey, Row], kv: dict[AgentKey, Row]) -> Verdict:
    lost, disagree, landed = [], [], 0
    keys = ledger.keys()
    for k in sorted(keys):
        row = pg.get(k)
        unsure = ledger.unsure_values(k)
        floor = ledger.last.get(k)
        if floor is not None and row == floor:
            pass
        elif row is not None and (floor is None or row[1] > floor[1]) and row[0] in unsure:
            landed += 1
        elif floor is not None:
            lost.append(f"{k[1]}: acked {floor}, PostgreSQL {row}")
        elif row is not None:
            lost.append(f"{k[1]}: never acked, unknown row {row}")
        if kv.get(k) != row:
            disagree.append(f"{k[1]}: KV {kv.get(k)}, PostgreSQL {row}")
    return Verdict(lost, disagree, landed, len(keys))


async def pg_rows(pool: Any, agents: list[uuid.UUID]) -> dict[AgentKey, Row]:
    found = await pool.fetch(
        "SELECT agent_id, key, value, version FROM agents.state WHERE agent_id = ANY($1)",
        agents)
    return {(r["agent_id"], r["key"]): (r["value"], r["version"]) for r in found}


async def kv_rows(js: Any, bucket: str, keys: set[AgentKey]) -> dict[AgentKey, Row]:
    kv = await js.key_value(bucket)
    out: dict[AgentKey, Row] = {}
    for agent, key in keys:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            entry = await kv.get(join_key(str(agent), key))
            out[(agent, key)] = (loads(entry.value or b"null"), int(entry.revision or 0))
    return out


async def check_all(ledger: Ledger, pool: Any, js: Any, bucket: str,
                    agents: list[uuid.UUID]) -> Verdict:
    pg = await pg_rows(pool, agents)
    kv = await kv_rows(js, bucket, ledger.keys() | set(pg))
    return verify(ledger, pg, kv)


async def tampering_is_caught(ledger: Ledger, pool: Any, js: Any, bucket: str,
                              agents: list[uuid.UUID]) -> None:
    """The checks can fail: remove one acknowledged row and age another; both are named."""
    (a1, k1), (a2, k2) = sorted(ledger.last)[:2]
    await pool.execute("DELETE FROM agents.state WHERE agent_id = $1 AND key = $2", a1, k1)
    await pool.execute("UPDATE agents.state SET version = version - 1 "
                       "WHERE agent_id = $1 AND key = $2", a2, k2)
    v = await check_all(ledger, pool, js, bucket, agents)
    assert [line.split(":")[0] for line in v.lost] == sorted([k1, k2])
    assert sorted(line.split(":")[0] for line in v.disagree) == sorted([k1, k2])


async def fate_of_failed_writes(ledger: Ledger, js: Any, bucket: str) -> Counter[str]:
    """Which failed writes landed ("landed"), which did not ("absent"), which the kept history
    cannot tell ("unknown"); asserts the rule's premise: one that landed did so before the
    same writer's next acknowledged write of the key."""
    kv = await js.key_value(bucket)
    fate = Counter[str]()
    for _writer, (agent, key), value, next_rev in ledger.failures:
        history = await kv.history(join_key(str(agent), key))
        revs = [int(e.revision or 0) for e in history if loads(e.value or b"null") == value]
        if revs:
            fate["landed"] += 1
            assert next_rev is None or max(revs) < next_rev, (key, value, revs, next_rev)
        elif next_rev is not None and history and int(history[0].revision or 0) < next_rev:
            fate["absent"] += 1  # the history reaches back before the next ack: conclusive
        else:
            fate["unknown"] += 1
    return fate


def assert_unique_revisions(ledger: Ledger) -> None:
    dupes = [r for r, n in Counter(ledger.revisions).items() if n > 1]
    assert dupes == [], f"revisions acknowledged twice (a server lost its tail?): {dupes[:10]}"


# --------------------------------------------------------------------------- in-process load


@dataclass
class Load:
    """WRITERS writer tasks (own keys, values never repeat) and READERS reader tasks."""

    hsm: HybridStateManager
    agent: uuid.UUID
    ledger: Ledger
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, rng: random.Random) -> None:
        self.tasks = [asyncio.create_task(self._write(w)) for w in range(WRITERS)]
        self.tasks += [asyncio.create_task(self._read(random.Random(rng.random())))
                       for _ in range(READERS)]

    async def _write(self, w: int) -> None:
        n = attempt = 0  # n: the writer's n-th acknowledged write; attempt: never repeats
        while not self.stop.is_set():
            key = f"w{w}-k{n % KEYS_PER_WRITER}"
            value = {"w": w, "n": n, "a": attempt, "pad": "x" * 32}
            attempt += 1
            try:
                rev = await self.hsm.write_state(self.agent, key, value)
            except Exception as e:  # recorded, judged by the test; the same key is retried
                self.ledger.failed(e)
                self.ledger.maybe(f"task{w}", (self.agent, key), value)
                await asyncio.sleep(0.05)
                continue
            self.ledger.ack(f"task{w}", (self.agent, key), value, rev)
            n += 1
            if n % 10 == 0:
                await asyncio.sleep(0)

    async def _read(self, rng: random.Random) -> None:
        """Reads never go back before a write acknowledged when the read began."""
        while not self.stop.is_set():
            key = f"w{rng.randrange(WRITERS)}-k{rng.randrange(KEYS_PER_WRITER)}"
            before = self.ledger.last.get((self.agent, key))
            try:
                got = await self.hsm.read_state(self.agent, key, default=None)
            except Exception as e:
                self.ledger.failed(e)
                await asyncio.sleep(0.05)
                continue
            self.ledger.reads += 1
            if before is not None and (got is None or got["n"] < before[0]["n"]):
                self.ledger.went_back.append(f"{key}: read {got} after acked {before}")
            await asyncio.sleep(0.002)

    async def finish(self) -> None:
        self.stop.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*self.tasks)


# --------------------------------------------------------------------------- writer processes


def read_output(ledger: Ledger, agent: uuid.UUID, tag: str, out: bytes,
                killed: bool) -> list[str]:
    """Fold a ``--log-values`` writer's output into ``ledger``; return its error lines.

    The last piece after the final newline may be torn: never acknowledged. A killed writer's
    ``?`` line without its acknowledgement is its in-flight write: indeterminate.
    """
    lines = out.decode().split("\n")[:-1]
    errors: list[str] = []
    inflight: dict[str, int] = {}
    for line in lines:
        parts = line.split()
        if parts in (["ready"], ["done"]):
            continue
        if parts[0] == "?":
            inflight[parts[1]] = int(parts[2])
        elif parts[0] == "!":
            name, key, i = parts[1], parts[2], int(parts[3])
            inflight.pop(key, None)
            errors.append(name)
            ledger.errors[name] += 1
            if not issubclass(getattr(msstore, name, Exception), msstore.MsstoreError):
                ledger.foreign.append(f"{tag}: {line}")
            ledger.maybe(tag, (agent, key), value_of(i, tag))
        else:
            key, rev, i = parts[0], int(parts[1]), int(parts[2])
            inflight.pop(key, None)
            ledger.ack(tag, (agent, key), value_of(i, tag), rev)
    assert killed or not inflight, (tag, inflight)
    for key, i in inflight.items():
        ledger.maybe(tag, (agent, key), value_of(i, tag))
    return errors


@dataclass
class Writer:
    proc: asyncio.subprocess.Process
    stdout: asyncio.Task[bytes]
    stderr: asyncio.Task[bytes]


async def spawn(database_url: str, nats_url: str, bucket: str, agent: uuid.UUID, tag: str,
                *extra: str) -> Writer:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CRASH_WRITER), "--bucket", bucket, "--agent", str(agent),
        "--tag", tag, "--log-values", *extra, env=services.child_env(database_url, nats_url),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    ready = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert ready == b"ready\n", (ready, await proc.stderr.read())
    # read while it runs: a full pipe would stall the writer
    return Writer(proc, asyncio.create_task(proc.stdout.read()),
                  asyncio.create_task(proc.stderr.read()))


async def reap(w: Writer, how: signal.Signals) -> tuple[bytes, bytes, int]:
    with contextlib.suppress(ProcessLookupError):
        w.proc.send_signal(how)
    async with asyncio.timeout(60):
        out, err = await w.stdout, await w.stderr
        rc = await w.proc.wait()
    return out, err, rc


# --------------------------------------------------------------------------- 1. NATS kill -9


@pytest.mark.slow
async def test_nats_killed_9_and_restarted_under_load_loses_no_acknowledged_write(
        private_nats: Path, ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    rng = random.Random(seed_for("nats kill -9"))
    bucket, url = unique("natskill"), private_nats_url(private_nats)
    agent, sub_agent = uuid.uuid4(), uuid.uuid4()
    ledger = Ledger()
    seen = Counter[str]()
    async with msstore.connect(ms.database_url, url, migrate=False) as conn:
        conn.add_listener(on_disconnect=lambda: seen.update(["disconnect"]),
                          on_reconnect=lambda: seen.update(["reconnect"]))
        # 64 revisions per key (instead of 1), only so that the test can tell afterwards which
        # failed writes landed; the flushers read the durability log, which copies every
        # revision either way
        await ensure_bucket(conn.js, bucket, ttl=DEFAULT_TTL_SECONDS, history=64)
        async with HybridStateManager(conn, bucket=bucket, ack_wait=2.0, **FAST) as hsm:
            load = Load(hsm, agent, ledger)
            load.start(rng)
            sub = await spawn(ms.database_url, url, bucket, sub_agent, "sub", "--keep-going",
                              "--keys", "50", "--threshold", "20", "--interval", "0.1",
                              "--ack-wait", "2", "--graceful-term")
            try:
                await until("the warm-up writes", lambda: ledger.acked >= WARM_UP, 30)
                await asyncio.sleep(rng.uniform(0, 0.3))
                await asyncio.to_thread(kill9, private_nats, "nats")
                at_kill = ledger.acked
                # the outage outlasts the 5 s JetStream request timeout: every writer's pending
                # write fails (StoreTimeoutError), and nats-py sends them after the restart
                await asyncio.sleep(rng.uniform(5.5, 6.5))
                await asyncio.to_thread(services.up, private_nats, which=("nats",))
                before_restart = max(ledger.revisions)
                await until("writes after the restart",
                            lambda: ledger.acked >= at_kill + AFTER, 40)
                # the server kept everything it had acknowledged before it was killed
                info = await conn.js.stream_info(_nats.kv_stream(bucket))
                assert info.state.last_seq >= before_restart
            finally:
                await load.finish()
                out, err, rc = await reap(sub, signal.SIGTERM)  # it flushes and exits
            assert rc == 0 and out.endswith(b"done\n"), (rc, err.decode()[-3000:])
            sub_errors = read_output(ledger, sub_agent, "sub", out, killed=False)
            async with asyncio.timeout(60):
                await hsm.flush()
            verdict = await check_all(ledger, conn.pool, conn.js, bucket, [agent, sub_agent])
            fate = await fate_of_failed_writes(ledger, conn.js, bucket)
            print(f"nats kill -9: {ledger.acked} acked writes ({at_kill} before the kill), "
                  f"failed writes {dict(fate)}, {ledger.reads} reads, "
                  f"errors {dict(ledger.errors)} (subprocess: "
                  f"{dict(Counter(sub_errors))}), {verdict.landed_unsure} keys end on an "
                  f"indeterminate write, {len(verdict.lost)} lost, counters "
                  f"retries={hsm.counters['retries']}, connection {dict(seen)}")
            assert ledger.foreign == []  # every error a writer or reader saw was msstore's
            assert seen["disconnect"] >= 1 and seen["reconnect"] >= 1  # the outage was real
            assert sum(ledger.errors.values()) >= WRITERS
            assert ledger.went_back == []
            assert_unique_revisions(ledger)
            assert verdict.checked == WRITERS * KEYS_PER_WRITER + 50
            assert verdict.lost == []
            assert verdict.disagree == []
            await tampering_is_caught(ledger, conn.pool, conn.js, bucket, [agent, sub_agent])


# --------------------------------------------------------------------------- 2. PostgreSQL kill -9


async def restart_postgres(home: Path) -> None:
    """``services.up`` after a kill -9 (crash recovery); retried while the old backends go."""
    for attempt in range(20):
        try:
            await asyncio.to_thread(services.up, home, which=("postgres",))
            return
        except Exception:
            if attempt == 19:
                raise
            await asyncio.sleep(0.5)


@pytest.mark.slow
async def test_postgres_killed_9_and_restarted_under_load_loses_no_acknowledged_write(
        private_pg: Path, private_ms: msstore.Connection,
        unique: Callable[[str], str]) -> None:
    rng = random.Random(seed_for("postgres kill -9"))
    bucket, agent, ledger = unique("pgkill"), uuid.uuid4(), Ledger()
    async with HybridStateManager(private_ms, bucket=bucket, **FAST) as hsm:
        load = Load(hsm, agent, ledger)
        load.start(rng)
        try:
            await until("the warm-up writes and a flush",
                        lambda: ledger.acked >= WARM_UP and hsm.counters["flushes"] >= 1, 30)
            await asyncio.sleep(rng.uniform(0, 0.3))
            await asyncio.to_thread(kill9, private_pg, "postgres")
            at_kill = ledger.acked
            # writes go on while PostgreSQL is away; the flusher meets the outage
            await until("writes and a failed flush while PostgreSQL is down",
                        lambda: ledger.acked >= at_kill + AFTER
                        and hsm.counters["retries"] >= 1, 30)
            during = ledger.acked - at_kill
            await asyncio.sleep(rng.uniform(0, 0.5))
        finally:
            await restart_postgres(private_pg)
        try:
            await until("writes after the restart",
                        lambda: ledger.acked >= at_kill + during + AFTER, 30)
        finally:
            await load.finish()
        async with asyncio.timeout(60):
            await hsm.flush()
        counters = hsm.counters
    verdict = await check_all(ledger, private_ms.pool, private_ms.js, bucket, [agent])
    print(f"postgres kill -9: {ledger.acked} acked writes ({at_kill} before the kill, "
          f"{during} while down), {ledger.reads} reads, errors {dict(ledger.errors)}, "
          f"flush retries {counters['retries']}, {len(verdict.lost)} lost")
    # writes need NATS only: nothing failed, unless by backpressure
    assert set(ledger.errors) <= {"BackpressureError"}, ledger.errors
    assert ledger.foreign == []
    assert ledger.went_back == []
    assert counters["retries"] >= 1  # the flusher met the outage and caught up
    assert_unique_revisions(ledger)
    assert verdict.checked == WRITERS * KEYS_PER_WRITER
    assert verdict.landed_unsure == 0
    assert verdict.lost == []
    assert verdict.disagree == []
    await tampering_is_caught(ledger, private_ms.pool, private_ms.js, bucket, [agent])


# --------------------------------------------------------------------------- 3. shared consumer


PROCESSES = 3
#: fewer keys than the writers' flush threshold (100): they flush every 0.5 s, so a kill always
#: finds unflushed writes (what the dirty set loses; what the stream flusher must not)
SHARED_KEYS = 60


async def run_slot(ms: msstore.Connection, bucket: str, agent: uuid.UUID, durable: str,
                   flusher: str, slot: int, lives: list[float]
                   ) -> list[tuple[str, bytes, bytes, int]]:
    """One writer slot: an incarnation per entry of ``lives``, each killed -9 after it."""
    runs = []
    for n, life in enumerate(lives):
        tag = f"p{slot}.{n}"
        w = await spawn(ms.database_url, ms.nats_url, bucket, agent, tag,
                        "--flusher", flusher, "--durable", durable,
                        "--keys", str(SHARED_KEYS), "--threshold", "100", "--interval", "0.5",
                        "--ack-wait", "1")
        await asyncio.sleep(life)
        runs.append((tag, *await reap(w, signal.SIGKILL)))
    return runs


async def shared_consumer_trial(ms: msstore.Connection, bucket: str, durable: str,
                                flusher: str, rng: random.Random
                                ) -> tuple[Ledger, Verdict, int]:
    """PROCESSES writers on one agent (overlapping keys), killed at random; a fresh manager
    flushes. Returns the ledger, the verdict and the unacked count of the durable consumer."""
    agent, ledger = uuid.uuid4(), Ledger()
    # the bucket and the shared durable consumer (short ack_wait: quick redelivery)
    async with HybridStateManager(ms, bucket=bucket, durable=durable, ack_wait=1.0):
        pass
    schedule = [[rng.uniform(0.2, 1.5) for _ in range(1 + rng.randint(1, 2))]
                for _ in range(PROCESSES)]
    print(f"{flusher}: lives per process {[[round(x, 2) for x in s] for s in schedule]}")
    slots = await asyncio.gather(*(run_slot(ms, bucket, agent, durable, flusher, s, lives)
                                   for s, lives in enumerate(schedule)))
    for tag, out, err, rc in (run for slot in slots for run in slot):
        # killed by us, not ended by an error of its own
        assert rc == -signal.SIGKILL and b"Traceback" not in err, (tag, rc, err.decode())
        read_output(ledger, agent, tag, out, killed=True)
    unacked = 0
    async with HybridStateManager(ms, bucket=bucket, durable=durable, flusher=flusher,  # type: ignore[arg-type]
                                  ack_wait=1.0) as fresh:
        async with asyncio.timeout(60):
            await fresh.flush()
        if flusher == "stream":
            epoch = _nats.stream_epoch(await ms.js.stream_info(_nats.kv_stream(bucket)))
            ci = await ms.js.consumer_info(_durable.log_name(bucket, epoch), durable)
            unacked = int(ci.num_pending or 0) + int(ci.num_ack_pending or 0)
    verdict = await check_all(ledger, ms.pool, ms.js, bucket, [agent])
    print(f"{flusher}: {sum(len(s) for s in schedule)} writer processes killed, "
          f"{ledger.acked} acked writes on {len(ledger.last)} keys, "
          f"{verdict.landed_unsure} keys end on an in-flight (unacknowledged) write, "
          f"{len(verdict.lost)} lost, "
          + (f"{unacked} unacked in the durable consumer" if flusher == "stream" else
             f"{len(verdict.disagree)} keys where KV and PostgreSQL differ"))
    return ledger, verdict, unacked


@pytest.mark.slow
async def test_three_processes_sharing_the_consumer_killed_9_at_random_lose_nothing(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    rng = random.Random(seed_for("shared consumer"))
    ledger, verdict, unacked = await shared_consumer_trial(
        ms, unique("shared"), unique("durable"), "stream", rng)
    assert ledger.acked >= 100 and len(ledger.last) == SHARED_KEYS
    assert_unique_revisions(ledger)
    assert ledger.errors == {}
    assert verdict.lost == []
    assert verdict.disagree == []
    assert unacked == 0


@pytest.mark.slow
async def test_the_same_harness_catches_the_dirty_sets_losses(
        ms: msstore.Connection, unique: Callable[[str], str]) -> None:
    """The checks can fail: the dirty set's buffer dies with each killed process."""
    rng = random.Random(seed_for("shared consumer, dirty set"))
    ledger, verdict, _ = await shared_consumer_trial(
        ms, unique("shared"), unique("durable"), "dirty-set", rng)
    assert ledger.acked >= 100
    assert len(verdict.lost) > 0
    assert verdict.disagree != []  # KV has the newest, PostgreSQL an older row (or none)


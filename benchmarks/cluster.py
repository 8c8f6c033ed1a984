"""#11 On a 3-node JetStream cluster: what replication, fsync-before-ack and more flusher
processes cost or buy.

Two private clusters on loopback, started for the run (``services.up(home, nats_nodes=3)``):
one with JetStream's default fsync (every 2 minutes), one with ``sync_interval: always``.
PostgreSQL is the suite's.

* ``write_state`` p50/p99, one write at a time: an R3 bucket vs an R1 bucket on the same
  cluster (replication), and R1 and R3 with ``always`` vs the default (fsync before ack);
* flushing N acknowledged writes (``flush()``), the same pairs;
* draining N writes (raw puts into an R3 bucket, pipelined) through 2 and 4 flusher-only
  processes sharing one durable consumer, vs 1 — from the first put until PostgreSQL holds
  every row.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pandas as pd

import msstore
from msstore import services
from msstore.codec import dumps
from msstore.hybrid import HybridStateManager
from msstore.keys import join_key

from .common import Comparison, gather_chunked, order, payload, percentile, progress, scratch

FLUSHER = Path(__file__).with_name("flusher_proc.py")
#: Nothing is committed before the timed flush(): no threshold, no interval, and a batch (the
#: most the stream flusher's tail holds before it commits) larger than any measured flush.
QUIET: dict[str, Any] = {"flush_threshold": 10**9, "flush_interval": 3600.0,
                         "batch_size": 20_000, "max_backlog": 10**7}


@contextlib.asynccontextmanager
async def cluster(sync: str) -> AsyncIterator[str]:
    """A private 3-node cluster (its comma-separated URL), stopped and deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"msstore-bench-{sync}-") as tmp:
        home = Path(tmp)
        ends = await asyncio.to_thread(services.up, home, which=("nats",), nats_nodes=3,
                                       nats_sync=sync)
        try:
            yield ends.nats_url
        finally:
            await asyncio.to_thread(services.down, home, which=("nats",))


async def latencies(hsm: HybridStateManager, agent: uuid.UUID, ops: int) -> list[float]:
    out = []
    for i in range(ops):
        t0 = time.perf_counter()
        await hsm.write_state(agent, f"k{i % 100}", payload(i % 100))
        out.append(time.perf_counter() - t0)
    return out


async def flush_time(hsm: HybridStateManager, agent: uuid.UUID, n: int) -> float:
    await gather_chunked((lambda i=i: hsm.write_state(agent, f"f{i}", payload(i)))  # type: ignore[misc]
                         for i in range(n))
    t0 = time.perf_counter()
    await hsm.flush()
    return time.perf_counter() - t0


async def drain(ms: msstore.Connection, conn: msstore.Connection, bucket: str, durable: str,
                processes: int, n: int, within: float = 300.0) -> float:
    """Seconds from the first of ``n`` raw puts until PostgreSQL holds them all, with
    ``processes`` flusher-only processes on one durable (TimeoutError after ``within``: a
    drain that never completes fails the run instead of hanging it)."""
    procs = []
    for _ in range(processes):
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-P", str(FLUSHER), bucket, durable,
            env=services.child_env(ms.database_url, conn.nats_url),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        assert p.stdout is not None
        assert await asyncio.wait_for(p.stdout.readline(), 60) == b"ready\n"
        procs.append(p)
    agent = uuid.uuid4()
    kv = await conn.js.key_value(bucket)
    data = [dumps(payload(i)) for i in range(n)]
    try:
        t0 = time.perf_counter()
        deadline = t0 + within
        await gather_chunked((lambda i=i: kv.put(join_key(str(agent), f"d{i}"), data[i]))  # type: ignore[misc]
                             for i in range(n))
        while await ms.pool.fetchval(
                "SELECT count(*) FROM agents.state WHERE agent_id = $1", agent) < n:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{processes} flusher processes drained fewer than {n:,} "
                                   f"writes within {within:.0f} s")
            await asyncio.sleep(0.01)
        return time.perf_counter() - t0
    finally:
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
        for p in procs:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.wait(), 60)
        await ms.pool.execute("DELETE FROM agents.state WHERE agent_id = $1", agent)


async def run(ms: msstore.Connection, p: dict[str, int], *, bar: bool = True
              ) -> tuple[list[Comparison], pd.DataFrame]:
    ops, n, reps = p["cluster_write_ops"], p["cluster_flush_keys"], p["cluster_reps"]
    c = {
        "p50_r3": Comparison(11, "cluster", "sequential write p50", "µs", "R3 bucket",
                             "R1 bucket (same cluster)"),
        "p99_r3": Comparison(11, "cluster", "sequential write p99", "µs", "R3 bucket",
                             "R1 bucket (same cluster)"),
        "p50_sync1": Comparison(11, "cluster", "sequential write p50", "µs",
                                "R1, sync_interval always", "R1, default fsync"),
        "p99_sync1": Comparison(11, "cluster", "sequential write p99", "µs",
                                "R1, sync_interval always", "R1, default fsync"),
        "p50_sync": Comparison(11, "cluster", "sequential write p50", "µs",
                               "R3, sync_interval always", "R3, default fsync"),
        "p99_sync": Comparison(11, "cluster", "sequential write p99", "µs",
                               "R3, sync_interval always", "R3, default fsync"),
        "flush_r3": Comparison(11, "cluster", f"flush {n:,} writes", "s", "R3 bucket",
                               "R1 bucket (same cluster)"),
        "flush_sync": Comparison(11, "cluster", f"flush {n:,} writes", "s",
                                 "R3, sync_interval always", "R3, default fsync"),
        "drain_2": Comparison(11, "cluster", f"drain {n:,} writes (R3)", "s",
                              "2 flusher processes", "1 flusher process"),
        "drain_4": Comparison(11, "cluster", f"drain {n:,} writes (R3)", "s",
                              "4 flusher processes", "1 flusher process"),
    }
    samples: list[dict[str, Any]] = []
    pb = progress(reps * 11, "#11 cluster", bar)
    async with cluster("default") as url_default, cluster("always") as url_always, \
            msstore.connect(ms.database_url, url_default, migrate=False) as cd, \
            msstore.connect(ms.database_url, url_always, migrate=False) as ca, \
            scratch(cd) as sd, scratch(ca) as sa:
        managers: dict[str, HybridStateManager] = {}
        for name, conn, s, replicas in (("r1", cd, sd, 1), ("r3", cd, sd, 3),
                                        ("r1_always", ca, sa, 1), ("r3_always", ca, sa, 3)):
            hsm = HybridStateManager(conn, bucket=s.bucket(f"cl{name}"), replicas=replicas,
                                     durable=f"bench-{uuid.uuid4().hex[:8]}", **QUIET)
            await hsm.start()
            s.cleanups.append(hsm.close)
            managers[name] = hsm
        for hsm in managers.values():  # warm up
            await latencies(hsm, uuid.uuid4(), 50)
            await hsm.flush()
        drain_bucket = sd.bucket("cldrain")
        async with HybridStateManager(cd, bucket=drain_bucket, replicas=3):
            pass  # the bucket and its log, before the flusher processes open them
        for rep in range(reps):
            row: dict[str, Any] = {"rep": rep}
            for name in order(rep, list(managers)):
                lat = await latencies(managers[name], sd.agent(), ops)
                row[f"{name}_p50_us"] = percentile(lat, 50) * 1e6
                row[f"{name}_p99_us"] = percentile(lat, 99) * 1e6
                pb.update()
            for name in order(rep, list(managers)):
                row[f"{name}_flush_s"] = await flush_time(managers[name], sd.agent(), n)
                pb.update()
            for k in order(rep, ["1", "2", "4"]):
                row[f"drain_{k}_s"] = await drain(ms, cd, drain_bucket, "bench-drain", int(k), n)
                pb.update()
            c["p50_r3"].add(row["r3_p50_us"], row["r1_p50_us"])
            c["p99_r3"].add(row["r3_p99_us"], row["r1_p99_us"])
            c["p50_sync"].add(row["r3_always_p50_us"], row["r3_p50_us"])
            c["p99_sync"].add(row["r3_always_p99_us"], row["r3_p99_us"])
            c["p50_sync1"].add(row["r1_always_p50_us"], row["r1_p50_us"])
            c["p99_sync1"].add(row["r1_always_p99_us"], row["r1_p99_us"])
            c["flush_r3"].add(row["r3_flush_s"], row["r1_flush_s"])
            c["flush_sync"].add(row["r3_always_flush_s"], row["r3_flush_s"])
            c["drain_2"].add(row["drain_2_s"], row["drain_1_s"])
            c["drain_4"].add(row["drain_4_s"], row["drain_1_s"])
            samples.append(row)
    pb.close()
    return list(c.values()), pd.DataFrame(samples)

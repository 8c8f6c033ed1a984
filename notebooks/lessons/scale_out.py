"""Notebook 09's plumbing: private clusters, the tables that describe them, and benchmark
#11's measurements (``benchmarks/cluster.py``) run on them, with the counts the asserts need.

The timings come from ``benchmarks.cluster`` itself (``latencies``, ``flush_time``, ``drain``
and the flusher-only process ``benchmarks/flusher_proc.py``), so this notebook and
``msstore bench --only 11`` measure the same thing. What this module adds is bookkeeping: each
variant's rows counted in PostgreSQL (then deleted), the shared consumer's state after the
drains, and the repetitions in rotating order so that no variant always runs first.

The clusters live in temporary state folders: :func:`stop` (the notebook's last cell) stops
their nodes and deletes the folder; :func:`stop_at_exit` does the same should the kernel exit
before that cell ran.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pandas as pd

import msstore
from msstore import services
from msstore._durable import LOG_PREFIX
from msstore._procs import pid_alive
from msstore.hybrid import HybridStateManager

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks/
from benchmarks.cluster import QUIET, drain, flush_time, latencies
from benchmarks.common import SCALES, order, percentile

__all__ = ["QUIET", "SCALES", "cluster_status", "consumer_state", "measure_flush",
           "measure_flushers", "measure_latency", "new_home", "open_variants", "paired",
           "read_back", "running", "stop", "stop_at_exit", "streams"]

COUNT = "SELECT count(*) FROM agents.state WHERE agent_id = $1"
FORGET = "DELETE FROM agents.state WHERE agent_id = ANY($1::uuid[])"


# --------------------------------------------------------------------------- the clusters


def new_home(what: str) -> Path:
    """An empty temporary state folder for one private cluster."""
    return Path(tempfile.mkdtemp(prefix=f"msstore-nb09-{what}-"))


def stop(home: Path) -> list[str]:
    """Stop the private servers recorded in ``home`` and delete it; return what was running."""
    if not home.exists():
        return []
    try:
        return services.down(home, which=("nats",))
    finally:
        shutil.rmtree(home, ignore_errors=True)


def stop_at_exit(home: Path) -> None:
    """Stop ``home``'s servers when the kernel exits, in case the last cell never runs."""
    atexit.register(stop, home)


def running(pids: list[Any]) -> list[int]:
    """The PIDs among ``pids`` that still run (a reaped or zombie process does not)."""
    return [int(p) for p in pids if p is not None and pid_alive(int(p))]


def cluster_status(home: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """``services.status(home)``'s NATS row, and its nodes as a table (``external=False``:
    the private cluster, even where ``MSSTORE_NATS_URL`` names the session's server)."""
    rows = services.status(home, external=False)
    row = next(r for r in rows if r["server"] == "nats")
    nodes = pd.DataFrame(row.get("nodes") or []).set_index("name")
    return row, nodes


async def streams(hsm: HybridStateManager) -> pd.DataFrame:
    """The bucket's stream and its durability log: replicas, leader, followers, direct gets."""
    js = hsm.ms.js
    names = [hsm.stream] + [str(i.config.name) for i in await js.streams_info()
                            if (i.config.name or "").startswith(f"{LOG_PREFIX}{hsm.bucket}_")]
    rows = []
    for name in names:
        info = await js.stream_info(name)
        peers = (info.cluster.replicas or []) if info.cluster else []
        rows.append({"stream": name, "replicas": info.config.num_replicas,
                     "leader": info.cluster.leader if info.cluster else None,
                     "followers": ", ".join(sorted(str(p.name) for p in peers)),
                     "followers current": sum(bool(p.current) for p in peers),
                     "direct gets": bool(info.config.allow_direct)})
    return pd.DataFrame(rows).set_index("stream")


async def read_back(hsm: HybridStateManager, n: int) -> dict[str, int]:
    """Write ``n`` values to one key, reading each back at once: how many came back older."""
    agent = uuid.uuid4()
    stale = 0
    for i in range(n):
        await hsm.write_state(agent, "counter", i)
        stale += await hsm.read_state(agent, "counter") != i
    await hsm.flush()
    rows = await hsm.ms.pool.fetchval(COUNT, agent)
    await hsm.ms.pool.execute(FORGET, [agent])
    return {"writes": n, "stale reads": stale, "rows in PostgreSQL": rows}


# --------------------------------------------------------------------------- measurements


async def open_variants(variants: dict[str, tuple[msstore.Connection, int]],
                        run: str) -> dict[str, HybridStateManager]:
    """One started manager per variant (name -> connection, replicas), warmed up. They flush
    only when asked (``QUIET``), so each timing holds exactly one thing."""
    managers: dict[str, HybridStateManager] = {}
    warm = uuid.uuid4()
    for name, (conn, replicas) in variants.items():
        slug = name.lower().replace(" ", "_").replace("+", "")
        hsm = HybridStateManager(conn, bucket=f"nb09_{slug}_{run}", replicas=replicas,
                                 durable=f"nb09-{run}", **QUIET)
        await hsm.start()
        managers[name] = hsm
        await latencies(hsm, warm, 50)
        await hsm.flush()
    await next(iter(managers.values())).ms.pool.execute(FORGET, [warm])
    return managers


async def measure_latency(managers: dict[str, HybridStateManager], ops: int,
                          reps: int) -> pd.DataFrame:
    """``write_state`` one at a time: p50/p99 per variant and repetition."""
    rows, agents = [], []
    for rep in range(reps):
        for name in order(rep, list(managers)):
            agents.append(uuid.uuid4())
            lat = await latencies(managers[name], agents[-1], ops)
            rows.append({"variant": name, "rep": rep, "writes": len(lat),
                         "p50_us": percentile(lat, 50) * 1e6,
                         "p99_us": percentile(lat, 99) * 1e6})
    for hsm in managers.values():  # the writes above must not count in the flush timings
        await hsm.flush()
    await next(iter(managers.values())).ms.pool.execute(FORGET, agents)
    return pd.DataFrame(rows)


async def measure_flush(managers: dict[str, HybridStateManager], keys: int,
                        reps: int) -> pd.DataFrame:
    """``flush()`` of ``keys`` acknowledged writes per variant: seconds, keys/s and the rows
    PostgreSQL holds afterwards."""
    rows = []
    for rep in range(reps):
        for name in order(rep, list(managers)):
            hsm, agent = managers[name], uuid.uuid4()
            seconds = await flush_time(hsm, agent, keys)
            in_sql = await hsm.ms.pool.fetchval(COUNT, agent)
            await hsm.ms.pool.execute(FORGET, [agent])
            rows.append({"variant": name, "rep": rep, "written": keys, "seconds": seconds,
                         "keys_per_s": keys / seconds, "rows in PostgreSQL": in_sql})
    return pd.DataFrame(rows)


async def measure_flushers(ms: msstore.Connection, conn: msstore.Connection, bucket: str,
                           durable: str, counts: list[int], keys: int, reps: int,
                           within: float = 120.0) -> pd.DataFrame:
    """Drain ``keys`` raw puts through each number of flusher-only processes (one durable):
    seconds from the first put until PostgreSQL holds every row (``drain`` waits for that; a
    drain that does not finish ``within`` seconds fails with TimeoutError)."""
    async with HybridStateManager(conn, bucket=bucket, replicas=3):
        pass  # the bucket and its log exist before the flusher processes open them
    rows = []
    for rep in range(reps):
        for k in map(int, order(rep, [str(c) for c in counts])):
            seconds = await drain(ms, conn, bucket, durable, k, keys, within=within)
            rows.append({"processes": k, "rep": rep, "written": keys,
                         "seconds": seconds, "keys_per_s": keys / seconds})
    return pd.DataFrame(rows)


async def consumer_state(conn: msstore.Connection, bucket: str, durable: str) -> dict[str, Any]:
    """The shared durable consumer on the bucket's log: its limits and what it still holds."""
    js = conn.js
    log = next(str(i.config.name) for i in await js.streams_info()
               if (i.config.name or "").startswith(f"{LOG_PREFIX}{bucket}_"))
    info = await js.consumer_info(log, durable)
    return {"log": log, "durable": durable, "max_ack_pending": info.config.max_ack_pending,
            "ack_wait_s": info.config.ack_wait, "delivered": info.delivered.stream_seq,
            "pending": info.num_pending, "ack_pending": info.num_ack_pending,
            "redelivered": info.num_redelivered, "log replicas": (await js.stream_info(log))
            .config.num_replicas}


def paired(df: pd.DataFrame, value: str, by: str, baseline: Any) -> pd.Series:
    """Median over repetitions of each variant's ``value`` / the baseline's in the same
    repetition: a ratio measured side by side, which drift on a shared machine hits alike."""
    wide = df.pivot(index="rep", columns=by, values=value)
    return wide.div(wide[baseline], axis=0).median()

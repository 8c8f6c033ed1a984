"""#4 Hydrating a 1,000-key agent: ``StateLifecycleManager.hydrate_agent`` vs the seed loop.

* seed (``hydrateAgent``, seed 4.2): one ``SELECT key, value`` then, for each row, one awaited
  ``kv.put`` — N round trips one after the other;
* msstore: the same single query, then compare-and-set creates (expected last subject
  sequence 0, as ``kv.update(last=0)`` sends, so a newer value already in KV wins) published
  with ``nc.publish`` and acknowledged on one inbox subscription, at most ``hydrate_chunk`` in
  flight (a sliding window, refilled once half of it is acknowledged);
* "reference" (the prototype msstore's ``_create_all`` grew from): the same creates and acks on
  one inbox, in chunks that each wait for all their acks before the next chunk is published.

Each repetition seeds two fresh agents with the same N rows (untimed, one merge statement
each) and times both hydrations back to back, alternating which goes first.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pandas as pd

import msstore
from msstore.codec import dumps
from msstore.hybrid import StateChange, merge_changes
from msstore.keys import join_key
from msstore.kv import ensure_bucket
from msstore.lifecycle import StateLifecycleManager

from .common import Comparison, order, payload, progress, scratch, timed


async def seed_hydrate_agent(ms: msstore.Connection, kv: Any, agent: uuid.UUID) -> int:
    """The seed's ``hydrateAgent`` loop: one query, then one awaited put per row."""
    rows = await ms.pool.fetch(
        "SELECT key, value::text AS value FROM agents.state WHERE agent_id = $1", agent)
    for row in rows:
        await kv.put(join_key(str(agent), row["key"]), row["value"].encode())
    return len(rows)


async def proposed_hydrate(ms: msstore.Connection, bucket: str, agent: uuid.UUID,
                           chunk: int = 256) -> int:
    """Compare-and-set creates with acks on one callback inbox; returns how many were created."""
    rows = await ms.pool.fetch(
        "SELECT key, value::text AS value FROM agents.state WHERE agent_id = $1", agent)
    nc = ms.nc
    inbox = nc.new_inbox()
    state = {"want": 0, "got": 0, "created": 0}
    done = asyncio.Event()

    async def on_ack(msg: Any) -> None:
        state["got"] += 1
        if b'"error"' not in msg.data:  # wrong last sequence: a newer value is in KV
            state["created"] += 1
        if state["got"] >= state["want"]:
            done.set()

    sub = await nc.subscribe(inbox, cb=on_ack)
    prefix = f"$KV.{bucket}."
    headers = {"Nats-Expected-Last-Subject-Sequence": "0"}
    try:
        for i in range(0, len(rows), chunk):
            part = rows[i:i + chunk]
            state["want"] += len(part)
            done.clear()
            for r in part:
                await nc.publish(prefix + join_key(str(agent), r["key"]),
                                 r["value"].encode(), reply=inbox, headers=headers)
            await asyncio.wait_for(done.wait(), 10)
    finally:
        await sub.unsubscribe()
    return state["created"]


async def run(ms: msstore.Connection, p: dict[str, int], *, bar: bool = True
              ) -> tuple[list[Comparison], pd.DataFrame]:
    n, reps = p["hydrate_keys"], p["hydrate_reps"]
    encoded = [dumps(payload(i)) for i in range(n)]
    cmp = Comparison(4, "hydrate", f"hydrate a {n:,}-key agent", "s", "hydrate_agent",
                     "seed put-per-key loop", target=("<=", 1 / 10),
                     target_text="≥ 10× faster")
    proposed = Comparison(4, "hydrate", f"hydrate a {n:,}-key agent", "s",
                          "reference: acks on one inbox, chunk barriers",
                          "seed put-per-key loop")
    samples: list[dict[str, Any]] = []
    pb = progress(reps * 3, "#4 hydrate", bar)
    async with scratch(ms) as s:
        seed_bucket = s.bucket("hyd-seed")
        seed_kv = await ensure_bucket(ms.js, seed_bucket)
        prop_bucket = s.bucket("hyd-prop")
        await ensure_bucket(ms.js, prop_bucket)
        lm = StateLifecycleManager(ms, bucket=s.bucket("hyd"))
        await lm.start(sweeper=False)
        s.cleanups.append(lm.close)
        for rep in range(reps):
            agents = {"seed": s.agent(), "msstore": s.agent(), "proposed": s.agent()}
            for agent in agents.values():
                await merge_changes(ms.pool, [StateChange(agent, f"k{i:04d}", i + 1, d)
                                              for i, d in enumerate(encoded)])
            times: dict[str, float] = {}
            for variant in order(rep, ["seed", "msstore", "proposed"]):
                if variant == "seed":
                    times[variant] = await timed(seed_hydrate_agent(ms, seed_kv, agents["seed"]))
                elif variant == "proposed":
                    times[variant] = await timed(proposed_hydrate(ms, prop_bucket,
                                                                  agents["proposed"]))
                else:
                    times[variant] = await timed(lm.hydrate_agent(agents["msstore"]))
                pb.update()
            cmp.add(times["msstore"], times["seed"])
            proposed.add(times["proposed"], times["seed"])
            # what landed in KV: every row, on every side
            counted: dict[str, int] = {}
            for variant, bucket in (("seed", seed_bucket), ("msstore", lm.bucket),
                                    ("proposed", prop_bucket)):
                info = await ms.js.stream_info(
                    f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.{agents[variant]}.>")
                counted[variant] = len(info.state.subjects or {})
            samples.append({"rep": rep, **{f"{k}_s": v for k, v in times.items()},
                            **{f"{k}_keys_in_kv": v for k, v in counted.items()}})
        counters = dict(lm.counters)
    pb.close()
    cmp.detail = (f"msstore: 1 query + creates acked on one inbox, {lm.hydrate_chunk} in flight; "
                  f"seed: 1 query + {n:,} sequential puts")
    frame = pd.DataFrame(samples)
    frame.attrs["keys"] = n
    frame.attrs["counters"] = counters
    proposed.detail = "the prototype of _create_all: same CAS creates, chunk-by-chunk waits"
    return [cmp, proposed], frame

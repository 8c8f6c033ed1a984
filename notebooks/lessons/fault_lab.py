"""Notebook 08's plumbing: private servers to break, writer processes to watch, and counting.

Nothing here invents a check. What counts as *lost* is what the test suite counts
(``tests/integration``): an acknowledged write is lost when PostgreSQL ends up without it; a
write that failed may or may not have landed (``test_server_faults.Ledger`` and ``verify``
judge both). This module adds what a notebook needs on top:

* :class:`Lab` starts private servers in temporary state folders (never the shared ones) and
  stops and deletes every one of them at the end, at the latest when the kernel exits;
* :class:`Fleet` runs ``tests/crash_writer.py`` processes and timestamps every line they print
  as it arrives, so that the notebook can chart acknowledged writes over time and measure how
  long the writers stood still;
* :func:`kill_writers` is notebook 03's crash (``lessons.crash.killed_writer``), timed.

The notebook puts the repository root on ``sys.path`` before importing this module.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib.pyplot as plt
import pandas as pd

import msstore
from msstore import services
from msstore.hybrid import HybridStateManager
from tests.integration.test_server_faults import Ledger, read_output

from .crash import CRASH_WRITER, killed_writer

# --------------------------------------------------------------------------- private servers


class Lab:
    """Private servers in temporary state folders, all stopped and deleted by :meth:`close`.

    ``close`` is also registered with :mod:`atexit`: a notebook that stops at a failing cell
    leaves no server running once its kernel exits.
    """

    def __init__(self) -> None:
        self.homes: list[Path] = []
        atexit.register(self._purge_all)

    async def start(self, which: tuple[str, ...],
                    **options: Any) -> tuple[Path, services.Endpoints]:
        """``services.up`` in a fresh temporary folder; return it and the endpoints."""
        home = Path(tempfile.mkdtemp(prefix="msstore-nb08-"))
        self.homes.append(home)
        ends = await asyncio.to_thread(services.up, home, which=which, **options)
        return home, ends

    async def stop(self, home: Path) -> list[str]:
        """Stop the servers of ``home`` and delete their data; return what was running."""
        stopped = await asyncio.to_thread(services.purge, home)
        if home in self.homes:
            self.homes.remove(home)
        return stopped

    async def close(self) -> list[str]:
        stopped: list[str] = []
        for home in list(self.homes):
            stopped += await self.stop(home)
        return stopped

    def _purge_all(self) -> None:
        for home in self.homes:
            with contextlib.suppress(Exception):
                services.purge(home)
            shutil.rmtree(home, ignore_errors=True)


# --------------------------------------------------------------------------- writer processes


@dataclass
class Member:
    tag: str
    agent: uuid.UUID
    proc: asyncio.subprocess.Process
    lines: list[tuple[float, bytes]] = field(default_factory=list)  # (monotonic, raw line)
    reader: asyncio.Task[None] | None = None
    stderr: asyncio.Task[bytes] | None = None
    flush_only: bool = False


class Fleet:
    """``tests/crash_writer.py`` processes on one bucket, every printed line timestamped.

    Writers log each value (``--log-values``), survive msstore errors (``--keep-going``:
    ``! ErrorClass key i``) and flush and exit on SIGTERM (``--graceful-term``). Flusher
    processes (``--flush-only``) write nothing and share the writers' durable consumer.
    """

    def __init__(self, database_url: str, nats_url: str, bucket: str, *,
                 durable: str = "msstore-flusher", keys: int = 40,
                 close_timeout: float = 120.0) -> None:
        self.database_url, self.nats_url, self.bucket = database_url, nats_url, bucket
        self.keys = keys  # per writer: a writer writes k0 … k{keys-1} of its own agent
        self.common = ["--durable", durable, "--keys", str(keys), "--threshold", "20",
                       "--interval", "0.2", "--ack-wait", "5", "--keep-going",
                       "--graceful-term", "--log-values", "--close-timeout", str(close_timeout)]
        self.members: list[Member] = []
        self.t0 = time.monotonic()

    async def spawn(self, tag: str, *, flush_only: bool = False) -> Member:
        agent = uuid.uuid4()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(CRASH_WRITER), "--bucket", self.bucket, "--agent", str(agent),
            "--tag", tag, *self.common, *(["--flush-only"] if flush_only else []),
            env=services.child_env(self.database_url, self.nats_url),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        member = Member(tag, agent, proc, flush_only=flush_only)
        self.members.append(member)
        ready = await asyncio.wait_for(proc.stdout.readline(), 60)
        if ready != b"ready\n":
            raise RuntimeError(f"{tag} did not start: {(await proc.stderr.read()).decode()}")
        member.reader = asyncio.create_task(self._read(member))
        member.stderr = asyncio.create_task(proc.stderr.read())  # a full pipe would stall it
        return member

    async def _read(self, m: Member) -> None:
        assert m.proc.stdout is not None
        async for line in m.proc.stdout:  # stamped on arrival: the moment it was acknowledged
            m.lines.append((time.monotonic(), line))

    def now(self) -> float:
        """Seconds since the fleet was made (the time axis of :meth:`events`)."""
        return time.monotonic() - self.t0

    def acked(self) -> int:
        """Writes acknowledged so far (all writers)."""
        return sum(1 for m in self.members for _, line in m.lines if _is_ack(line))

    def revisions(self, until: float) -> list[int]:
        """The revisions acknowledged up to ``until`` (seconds on the :meth:`now` axis)."""
        return [int(line.split()[1]) for m in self.members for t, line in m.lines
                if t - self.t0 <= until and _is_ack(line)]

    async def until_acked(self, n: int, within: float = 60.0) -> None:
        """Wait until the writers have ``n`` acknowledged writes."""
        async with asyncio.timeout(within):
            while self.acked() < n:  # noqa: ASYNC110  (a count of lines, not an event)
                await asyncio.sleep(0.05)

    async def stop(self, within: float = 180.0) -> Ledger:
        """SIGTERM everyone (writers first: they flush before they exit); fold their output
        into a test-suite :class:`Ledger`. A process whose final flush failed exits with the
        error's traceback: an msstore error is counted in ``ledger.errors`` as
        ``close:<ErrorClass>`` (its changes stay in the durability log for the next flusher),
        anything else goes to ``ledger.foreign``."""
        ledger = Ledger()
        try:
            async with asyncio.timeout(within):
                for group in ([m for m in self.members if not m.flush_only],
                              [m for m in self.members if m.flush_only]):
                    for m in group:
                        with contextlib.suppress(ProcessLookupError):
                            m.proc.send_signal(signal.SIGTERM)
                    for m in group:
                        await m.proc.wait()
                        assert m.reader is not None and m.stderr is not None
                        await m.reader
                        _exit_error(ledger, m, await m.stderr)
        finally:
            self.kill()
        for m in self.members:
            if not m.flush_only:
                read_output(ledger, m.agent, m.tag, b"".join(line for _, line in m.lines),
                            killed=False)
        return ledger

    def kill(self) -> None:
        """kill -9 every member still running (a failing cell leaves no writer behind)."""
        for m in self.members:
            if m.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    m.proc.kill()

    @property
    def agents(self) -> list[uuid.UUID]:
        return [m.agent for m in self.members if not m.flush_only]

    def events(self) -> pd.DataFrame:
        """One row per acknowledged or failed write: ``t`` (s since start), ``kind`` ("ack" or
        "error"), ``tag``, ``revision`` (0 for a failed write)."""
        rows = [{"t": t - self.t0, "kind": "ack" if _is_ack(line) else "error", "tag": m.tag,
                 "revision": int(line.split()[1]) if _is_ack(line) else 0}
                for m in self.members for t, line in m.lines
                if _is_ack(line) or line.startswith(b"!")]
        return pd.DataFrame(rows, columns=["t", "kind", "tag", "revision"]).sort_values("t")


class Sampler:
    """The newest revision PostgreSQL holds for some agents, sampled every ``every`` seconds
    on a fleet's time axis: how far the flushers have got while the fault runs."""

    def __init__(self, pool: Any, agents: list[uuid.UUID], fleet: Fleet,
                 every: float = 0.1) -> None:
        self.pool, self.agents, self.fleet, self.every = pool, agents, fleet, every
        self.samples: list[tuple[float, int]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a sample may fail; the next one is taken
                newest = await self.pool.fetchval(
                    "SELECT coalesce(max(version), 0) FROM agents.state "
                    "WHERE agent_id = ANY($1)", self.agents)
                self.samples.append((self.fleet.now(), int(newest)))
            await asyncio.sleep(self.every)

    async def stop(self) -> pd.DataFrame:
        """Stop sampling; return the samples (``t``, ``revision``)."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        return pd.DataFrame(self.samples, columns=["t", "revision"])


def past(pg: pd.DataFrame, revision: int, at: float) -> float:
    """Seconds from ``at`` until PostgreSQL first held a revision above ``revision``."""
    later = pg[(pg.t > at) & (pg.revision > revision)].t
    return float(later.min() - at) if not later.empty else float("inf")


def _exit_error(ledger: Ledger, m: Member, stderr: bytes) -> None:
    """Count how a stopped process ended, if not cleanly (the last line of its traceback)."""
    if m.proc.returncode == 0:
        return
    last = (stderr.decode(errors="replace").strip().splitlines() or ["(no output)"])[-1]
    name = last.split(":")[0].rsplit(".", 1)[-1]
    if last.startswith("msstore.errors.") and isinstance(getattr(msstore, name, None), type) \
            and issubclass(getattr(msstore, name), msstore.MsstoreError):
        ledger.errors[f"close:{name}"] += 1
    else:
        ledger.foreign.append(f"{m.tag} exited {m.proc.returncode}: {last}")


async def until_current(js: Any, streams: list[str], within: float = 60.0) -> float:
    """Wait until every replica of ``streams`` is current (a restarted node has caught up);
    return the seconds it took."""
    t0 = time.monotonic()
    async with asyncio.timeout(within):
        while True:
            with contextlib.suppress(Exception):  # an answer may fail while a node rejoins
                infos = [await js.stream_info(s) for s in streams]
                if all(i.cluster and i.cluster.leader
                       and len(i.cluster.replicas or []) == (i.config.num_replicas or 1) - 1
                       and all(r.current and not r.offline for r in i.cluster.replicas or [])
                       for i in infos):
                    return time.monotonic() - t0
            await asyncio.sleep(0.2)


def _is_ack(line: bytes) -> bool:
    return line.endswith(b"\n") and line[:1] not in (b"?", b"!") \
        and line not in (b"ready\n", b"done\n")


class Standstill(NamedTuple):
    """The longest gap between two consecutive acknowledgements after a fault."""

    start: float  # the last acknowledgement before the gap (s on the fleet's axis)
    end: float  # the first one after it
    revision: int  # the newest revision acknowledged before the gap

    @property
    def seconds(self) -> float:
        return self.end - self.start


def standstill(events: pd.DataFrame, at: float) -> Standstill:
    """The writers' longest standstill after a fault at ``at``, counted from their last
    acknowledgement before it (any writer's)."""
    acks = events[events.kind == "ack"].sort_values("t")
    before = acks[acks.t <= at]
    window = acks[acks.t >= (before.t.max() if not before.empty else at)]
    if len(window) < 2:
        return Standstill(at, float("inf"), int(acks.revision.max()))
    i = int(window.t.diff().fillna(0).to_numpy().argmax())  # the row ending the longest gap
    return Standstill(float(window.t.iloc[i - 1]), float(window.t.iloc[i]),
                      int(window.revision.iloc[:i].max()))


def per_bin(events: pd.DataFrame, width: float = 0.1) -> pd.DataFrame:
    """Acknowledged and failed writes per ``width`` seconds, for a timeline chart."""
    if events.empty:
        return pd.DataFrame(columns=["ack", "error"])
    events = events[["t", "kind"]]
    binned = (events.t // width * width).round(3)
    table = events.groupby([binned, events.kind]).size().unstack(fill_value=0)
    full = pd.Index((pd.RangeIndex(int(binned.max() / width) + 1) * width).round(3), name="t")
    return table.reindex(full, fill_value=0).reindex(columns=["ack", "error"], fill_value=0)


# --------------------------------------------------------------------------- 1. killed writers


async def kill_writers(ms: msstore.Connection, flusher: str, *, trials: int,
                       bucket: str) -> dict[str, Any]:
    """``trials`` writer processes killed -9 at once (notebook 03's crash); for the stream
    flusher a fresh process then catches up on the durable consumer, timed. Counts, per key,
    the last acknowledged write PostgreSQL does not hold (missing, or an older version)."""
    async with HybridStateManager(ms, bucket=bucket, ack_wait=1.0):
        pass  # the bucket and the durable consumer, before the writers open them
    agents = [uuid.uuid4() for _ in range(trials)]
    acked = await asyncio.gather(*(killed_writer(ms, bucket, a, flusher) for a in agents))
    t0 = time.perf_counter()
    if flusher == "stream":  # a fresh process catches up on the same durable consumer
        async with HybridStateManager(ms, bucket=bucket, ack_wait=1.0) as fresh:
            await fresh.flush()
    recovery = time.perf_counter() - t0
    lost = 0
    for a, acks in zip(agents, acked, strict=True):
        stored: dict[str, int] = {r["key"]: r["version"] for r in await ms.pool.fetch(
            "SELECT key, version FROM agents.state WHERE agent_id = $1", a)}
        lost += sum(1 for k, rev in acks.items() if stored.get(k, 0) < rev)
    return {"flusher": flusher, "acknowledged": sum(map(len, acked)), "lost": lost,
            "recovery_s": recovery if flusher == "stream" else float("nan")}


# --------------------------------------------------------------------------- the timeline chart


def timeline(events: pd.DataFrame, pg: pd.DataFrame, marks: dict[str, float], title: str,
             width: float = 0.1) -> None:
    """Two panels on one time axis: acknowledged writes per second (failed writes as crosses),
    and the newest revision acknowledged against the newest one in PostgreSQL; dashed lines
    mark the moments in ``marks``."""
    per = per_bin(events, width) / width
    acks = events[events.kind == "ack"]
    _, (top, bottom) = plt.subplots(2, 1, figsize=(9, 4.6), sharex=True,
                                    gridspec_kw={"height_ratios": [1, 1.3]})
    top.fill_between(per.index, per["ack"], step="post", color="tab:blue", alpha=0.6,
                     label="acknowledged writes/s")
    errors = events[events.kind == "error"]
    top.plot(errors.t, [0] * len(errors), "x", color="tab:red", label="failed (indeterminate)")
    top.set(ylabel="writes/s")
    bottom.step(acks.t, acks.revision.cummax(), where="post", color="tab:blue",
                label="newest revision acknowledged")
    bottom.step(pg.t, pg.revision, where="post", color="tab:orange",
                label="newest revision in PostgreSQL")
    bottom.set(xlabel="seconds since the writers started", ylabel="revision")
    colors = ["tab:red", "tab:green", "tab:purple", "tab:brown", "black", "tab:gray"]
    for (label, t), color in zip(marks.items(), colors, strict=False):
        for ax in (top, bottom):
            ax.axvline(t, color=color, linestyle="--", linewidth=1,
                       label=label if ax is bottom else None)
    top.legend(fontsize=7, loc="upper left")
    bottom.legend(fontsize=7, loc="upper left")
    top.set_title(title, fontsize=9)
    plt.tight_layout()
    plt.show()

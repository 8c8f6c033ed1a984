"""Notebook 03's crash harness: writer processes killed -9, then acknowledged writes counted.

Each writer is ``tests/crash_writer.py`` (outside the package), which prints every
acknowledged ``key revision`` before it is killed at a random moment. What counts is simple:
an acknowledged write is *lost* when PostgreSQL ends up without its row, or with an older
version of it.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import msstore
from msstore import services
from msstore.hybrid import HybridStateManager

CRASH_WRITER = Path(__file__).resolve().parents[2] / "tests" / "crash_writer.py"


async def killed_writer(ms: msstore.Connection, bucket: str, agent: uuid.UUID,
                        flusher: str) -> dict[str, int]:
    """Run one writer, kill it -9 after 0.2–0.6 s; return {key: highest acknowledged revision}."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CRASH_WRITER), "--bucket", bucket, "--agent", str(agent),
        "--flusher", flusher, "--keys", "150", "--threshold", "20", "--interval", "0.1",
        "--ack-wait", "1", env=services.child_env(ms.database_url, ms.nats_url),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"ready\n"
    await asyncio.sleep(random.uniform(0.2, 0.6))
    proc.send_signal(signal.SIGKILL)
    out = await proc.stdout.read()
    await proc.wait()
    acked: dict[str, int] = {}
    for line in out.split(b"\n")[:-1]:  # a torn last line was never acknowledged
        key, rev = line.decode().split()
        acked[key] = max(acked.get(key, 0), int(rev))
    return acked


async def crash(ms: msstore.Connection, flusher: str, *, trials: int,
                run: str) -> dict[str, Any]:
    """``trials`` writers killed at once; a fresh stream flusher catches up; count the losses."""
    bucket = f"nb03_crash_{flusher.replace('-', '_')}_{run}"
    async with HybridStateManager(ms, bucket=bucket, ack_wait=1.0):
        pass  # creates the bucket and the durable consumer
    agents = [uuid.uuid4() for _ in range(trials)]
    acked = await asyncio.gather(*(killed_writer(ms, bucket, a, flusher) for a in agents))
    if flusher == "stream":  # a fresh process catches up on the same durable consumer
        async with HybridStateManager(ms, bucket=bucket, ack_wait=1.0) as fresh:
            await fresh.flush()
    lost = 0
    for a, acks in zip(agents, acked, strict=True):
        stored = dict(await ms.pool.fetch(
            "SELECT key, version FROM agents.state WHERE agent_id = $1", a))
        lost += sum(1 for k, rev in acks.items() if stored.get(k, 0) < rev)
    return {"flusher": flusher, "acknowledged_keys": sum(map(len, acked)), "lost": lost}

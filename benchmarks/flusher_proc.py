"""A flusher-only process for benchmark #11: ``python -P benchmarks/flusher_proc.py DB NATS BUCKET
DURABLE``. It opens a stream-flushed :class:`msstore.HybridStateManager` (writing nothing),
prints ``ready`` and flushes until its stdin closes."""

from __future__ import annotations

import asyncio
import sys

import msstore


async def main(database_url: str, nats_url: str, bucket: str, durable: str) -> None:
    async with msstore.connect(database_url, nats_url, migrate=False) as ms, \
            msstore.HybridStateManager(ms, bucket=bucket, durable=durable, flush_threshold=1,
                                       flush_interval=0.05, batch_size=2_000):
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))

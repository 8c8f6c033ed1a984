"""A flusher-only process for benchmark #11: ``python -P benchmarks/flusher_proc.py BUCKET
DURABLE``, with the servers in ``MSSTORE_DATABASE_URL`` / ``MSSTORE_NATS_URL`` (their passwords
stay off the command line: ``services.child_env``). It opens a stream-flushed
:class:`msstore.HybridStateManager` (writing nothing), prints ``ready`` and flushes until its
stdin closes."""

from __future__ import annotations

import asyncio
import sys

import msstore


async def main(bucket: str, durable: str) -> None:
    async with msstore.connect(migrate=False) as ms, \
            msstore.HybridStateManager(ms, bucket=bucket, durable=durable, flush_threshold=1,
                                       flush_interval=0.05, batch_size=2_000):
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:3]))

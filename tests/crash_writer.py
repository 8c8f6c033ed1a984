"""The writer that crash tests and notebook 03 kill -9: ``python tests/crash_writer.py …``.

It writes forever (or ``--writes`` times) through a :class:`msstore.HybridStateManager`,
printing ``<key> <revision>`` for every acknowledged write (line-buffered), so whoever kills
it knows exactly which writes were acknowledged. A torn last line was never acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from msstore import HybridStateManager, connect
from msstore.hybrid import FLUSHERS


async def write_until_killed(args: argparse.Namespace) -> None:
    async with connect(args.database_url, args.nats_url, migrate=False) as ms:
        hsm = await HybridStateManager.open(
            ms, bucket=args.bucket, flusher=args.flusher, flush_threshold=args.threshold,
            flush_interval=args.interval, ack_wait=args.ack_wait, durable=args.durable,
            ttl=args.ttl)
        print("ready", flush=True)
        i = 0
        while args.writes <= 0 or i < args.writes:
            key = f"k{i % args.keys}"
            rev = await hsm.write_state(args.agent, key, {"i": i, "pad": "x" * 64})
            sys.stdout.write(f"{key} {rev}\n")
            sys.stdout.flush()
            i += 1
            if i % 20 == 0:
                await asyncio.sleep(0)
        await hsm.close()
        print("done", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python tests/crash_writer.py")
    p.add_argument("--database-url", required=True)
    p.add_argument("--nats-url", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--agent", required=True)
    p.add_argument("--flusher", choices=FLUSHERS, default="stream")
    p.add_argument("--durable", default="msstore-flusher")
    p.add_argument("--keys", type=int, default=200)
    p.add_argument("--writes", type=int, default=0, help="stop after N writes (0: never)")
    p.add_argument("--threshold", type=int, default=50)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--ack-wait", type=float, default=30.0)
    p.add_argument("--ttl", type=float, default=1800.0)
    asyncio.run(write_until_killed(p.parse_args(argv)))


if __name__ == "__main__":
    main()

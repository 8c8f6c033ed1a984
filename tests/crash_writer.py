"""The writer that crash tests and notebook 03 kill -9: ``python tests/crash_writer.py …``.

It writes forever (or ``--writes`` times) through a :class:`msstore.HybridStateManager`,
printing ``<key> <revision>`` for every acknowledged write (line-buffered), so whoever kills
it knows exactly which writes were acknowledged. A torn last line was never acknowledged.

Options for the server-fault suite (tests/integration/test_server_faults.py):

* ``--tag T`` puts ``"w": T`` into every value, so writers (and restarts of one) never write
  the same value twice;
* ``--log-values`` prints ``? <key> <i>`` before each write and ``<key> <revision> <i>`` after
  its acknowledgement (the value is ``{"i": i, "pad": …}`` plus the tag): a killed writer's
  in-flight write is the ``?`` line without its acknowledgement;
* ``--keep-going`` survives msstore errors: it prints ``! <ErrorClass> <key> <i>`` and writes
  on (any other exception still ends the process with a traceback and a non-zero exit);
* ``--graceful-term`` makes SIGTERM close it cleanly (stop writing, flush, print ``done``);
* ``--flush-only`` writes nothing: the process only runs the flusher (a flusher process of the
  cluster suite), until SIGTERM (with ``--graceful-term``) or kill.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from msstore import HybridStateManager, MsstoreError, connect
from msstore.hybrid import FLUSHERS


def value_of(i: int, tag: str | None) -> dict[str, Any]:
    """The value the writer stores at its ``i``-th write (what the tests expect back)."""
    value: dict[str, Any] = {"i": i, "pad": "x" * 64}
    if tag is not None:
        value["w"] = tag
    return value


async def write_until_killed(args: argparse.Namespace) -> None:
    async with connect(args.database_url, args.nats_url, migrate=False) as ms:
        hsm = await HybridStateManager.open(
            ms, bucket=args.bucket, flusher=args.flusher, flush_threshold=args.threshold,
            flush_interval=args.interval, ack_wait=args.ack_wait, durable=args.durable,
            ttl=args.ttl, close_timeout=args.close_timeout)
        stop = asyncio.Event()
        if args.graceful_term:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        if args.flush_only:
            await stop.wait()
        out = sys.stdout
        i = 0
        while (args.writes <= 0 or i < args.writes) and not stop.is_set() \
                and not args.flush_only:
            key = f"k{i % args.keys}"
            if args.log_values:
                out.write(f"? {key} {i}\n")
                out.flush()
            try:
                rev = await hsm.write_state(args.agent, key, value_of(i, args.tag))
            except MsstoreError as e:
                if not args.keep_going:
                    raise
                out.write(f"! {type(e).__name__} {key} {i}\n")
                out.flush()
                await asyncio.sleep(0.05)
            else:
                out.write(f"{key} {rev} {i}\n" if args.log_values else f"{key} {rev}\n")
                out.flush()
            i += 1
            if i % 20 == 0:
                await asyncio.sleep(0)
        await hsm.close()
        print("done", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python tests/crash_writer.py")
    # the URLs carry passwords: they come in MSSTORE_DATABASE_URL / MSSTORE_NATS_URL
    # (services.child_env), not on the command line, which every local user can read
    p.add_argument("--database-url", default=None)
    p.add_argument("--nats-url", default=None)
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
    p.add_argument("--tag", default=None, help='put "w": TAG into every value')
    p.add_argument("--log-values", action="store_true",
                   help="print '? key i' before and 'key revision i' after each write")
    p.add_argument("--keep-going", action="store_true",
                   help="print '! ErrorClass key i' for an msstore error and write on")
    p.add_argument("--close-timeout", type=float, default=30.0,
                   help="seconds close() may take to flush (HybridStateManager close_timeout)")
    p.add_argument("--flush-only", action="store_true",
                   help="write nothing: run the flusher until SIGTERM")
    p.add_argument("--graceful-term", action="store_true",
                   help="on SIGTERM stop writing, close (flush) and print 'done'")
    asyncio.run(write_until_killed(p.parse_args(argv)))


if __name__ == "__main__":
    main()

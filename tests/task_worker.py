"""The worker that queue tests and notebook 10 run as processes: ``python tests/task_worker.py``.

It opens a :class:`msstore.TaskQueue`, prints ``ready``, then claims tasks of ``--type`` and
prints one line per event, line-buffered, so whoever runs (or kills) it knows exactly what it
did: ``claimed <task_id> <attempt>`` after a claim, ``done <task_id>`` after ``complete``
returned (a torn last line was never acknowledged), ``lost <task_id>`` when the queue refused
a ``complete`` (the lease was gone). It exits after ``--idle-exit`` seconds without a task,
printing ``exit <notifications> <wakeups> <rechecks>``. ``--hold`` claims one batch and then
sleeps forever without completing it: the worker a test kills -9 mid-lease.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from msstore import Connection, LeaseLostError, TaskQueue, connect, services

SCRIPT = Path(__file__).resolve()


@dataclass
class Report:
    """What one worker process printed, parsed."""

    worker: str
    claimed: list[tuple[str, int]] = field(default_factory=list)  # (task id, attempt)
    done: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    #: (notifications, wake-ups by one, re-checks) when it exited by itself
    counters: tuple[int, int, int] | None = None


class WorkerProcess:
    """One ``task_worker.py`` process: started, ready, then waited for or killed -9."""

    def __init__(self, proc: asyncio.subprocess.Process, worker: str) -> None:
        self.proc, self.worker = proc, worker
        self.lines: list[str] = []

    @classmethod
    async def start(cls, ms: Connection, worker: str, task_type: str,
                    *options: str) -> WorkerProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(SCRIPT), "--worker", worker, "--type", task_type, *options,
            env=services.child_env(ms.database_url, ms.nats_url),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        self = cls(proc, worker)
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 60)
        if ready != b"ready\n":
            raise RuntimeError(f"worker {worker} did not start: {ready!r}")
        return self

    async def readline(self) -> str:
        assert self.proc.stdout is not None
        line = (await self.proc.stdout.readline()).decode()
        if line.endswith("\n"):
            self.lines.append(line)
        return line

    async def kill(self) -> Report:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        return await self.wait()

    async def wait(self) -> Report:
        """Wait for the exit (bounded: 120 s) and parse everything it printed."""
        assert self.proc.stdout is not None
        rest = await asyncio.wait_for(self.proc.stdout.read(), 120)
        await self.proc.wait()
        text = "".join(self.lines) + rest.decode()
        report = Report(self.worker)
        for line in text.split("\n")[:-1]:  # a torn last line was never acknowledged
            kind, *args = line.split()
            if kind == "claimed":
                report.claimed.append((args[0], int(args[1])))
            elif kind == "done":
                report.done.append(args[0])
            elif kind == "lost":
                report.lost.append(args[0])
            elif kind == "exit":
                report.counters = (int(args[0]), int(args[1]), int(args[2]))
        return report


async def work(args: argparse.Namespace) -> None:
    out = sys.stdout
    async with connect(args.database_url, args.nats_url, migrate=False) as ms, \
            TaskQueue(ms, recheck_interval=args.recheck) as queue:
        print("ready", flush=True)
        while True:
            tasks = await queue.claim(args.worker, types=[args.type], limit=args.batch,
                                      lease=args.lease, wait=args.idle_exit)
            if not tasks:
                break
            out.write("".join(f"claimed {t.task_id} {t.attempt}\n" for t in tasks))
            out.flush()
            if args.hold:
                await asyncio.Event().wait()  # hold the leases until killed
            for t in tasks:
                try:
                    await queue.complete(t.task_id, args.worker, {"by": args.worker})
                except LeaseLostError:
                    out.write(f"lost {t.task_id}\n")
                else:
                    out.write(f"done {t.task_id}\n")
            out.flush()
        c = queue.counters
        print(f"exit {c['notifications']} {c['wakeups']} {c['rechecks']}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    # URLs (with passwords) come in the environment: services.child_env
    p.add_argument("--database-url", default=None)
    p.add_argument("--nats-url", default=None)
    p.add_argument("--worker", required=True)
    p.add_argument("--type", required=True)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--lease", type=float, default=30.0)
    p.add_argument("--idle-exit", type=float, default=2.0)
    p.add_argument("--recheck", type=float, default=1.0)
    p.add_argument("--hold", action="store_true")
    asyncio.run(work(p.parse_args()))


if __name__ == "__main__":
    main()

"""``msstore up | down | status | env | migrate | workbook``: the services from a shell."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from . import services
from ._extras import needs_extra
from .errors import MsstoreError


def _cmd_up(args: argparse.Namespace) -> int:
    endpoints = services.up()
    for info in (endpoints.postgres, endpoints.nats):
        print(f"{info.name:<9} {info.url}  (pid {info.pid})")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    stopped = services.down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    print(f"state folder: {services.state_home()}")
    for row in services.status():
        pid = f" pid {row['pid']}" if row.get("pid") else ""
        print(f"{row['server']:<9} {row['mode']:<9} {row['health']:<11} {row['version']:<28} "
              f"{row['url']}{pid}")
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    print("\n".join(services.env_lines(services.resolve())))
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from .connection import connect

    async def run() -> list[str]:
        async with connect(migrate=False) as ms:
            return await ms.migrate()

    applied = asyncio.run(run())
    print("applied: " + (", ".join(applied) if applied else "nothing, the schema is current"))
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    """Exit 0 when every URL answers on its TCP port (used by the external CI lane)."""
    for url in args.urls:
        parts = urlsplit(url)
        default = 5432 if parts.scheme.startswith("postgres") else 4222
        try:
            with socket.create_connection((parts.hostname or "127.0.0.1",
                                           parts.port or default), timeout=2):
                pass
        except OSError:
            return 1
    return 0


def _cmd_workbook(args: argparse.Namespace) -> int:
    """Execute every notebook headless in order; print one line per notebook."""
    with needs_extra("msstore workbook"):
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError

    notebooks: list[Path] = []
    for given in map(Path, args.paths):
        notebooks += sorted(given.glob("[0-9][0-9]_*.ipynb")) if given.is_dir() else [given]
    if not notebooks:
        print(f"no notebooks in {' '.join(args.paths)}")
        return 1
    failed = 0
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
        start = time.perf_counter()
        try:
            NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                           resources={"metadata": {"path": str(path.parent)}}).execute()
            verdict = "ok"
            if args.save:
                nbformat.write(nb, path)  # type: ignore[no-untyped-call]
        except CellExecutionError as e:
            failed += 1
            verdict = "FAILED: " + str(e).strip().splitlines()[-1][:200]
        print(f"{path.name:<40} {time.perf_counter() - start:6.1f}s  {verdict}", flush=True)
    print(f"{len(notebooks) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    """Run the side-by-side benchmarks of ``benchmarks/`` (a source checkout only)."""
    try:
        from benchmarks.run import main as bench_main
    except ImportError:
        print("msstore bench runs from a source checkout: benchmarks/ is not in the wheel",
              file=sys.stderr)
        return 2
    return int(bench_main(["--scale", args.scale, "--out", str(args.out)]
                          + (["--only", args.only] if args.only else [])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msstore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the embedded servers (idempotent)").set_defaults(
        func=_cmd_up)
    sub.add_parser("down", help="stop the embedded servers").set_defaults(func=_cmd_down)
    sub.add_parser("status", help="version, URL and health of each server").set_defaults(
        func=_cmd_status)
    sub.add_parser("env", help="print export lines for the server URLs").set_defaults(
        func=_cmd_env)
    sub.add_parser("migrate", help="apply pending schema migrations").set_defaults(
        func=_cmd_migrate)
    probe = sub.add_parser("probe", help="exit 0 if every URL answers")
    probe.add_argument("urls", nargs="+")
    probe.set_defaults(func=_cmd_probe)
    wb = sub.add_parser("workbook", help="run every notebook headless and report each")
    wb.add_argument("paths", nargs="*", default=["notebooks"],
                    help="notebook files or folders (default: notebooks)")
    wb.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    wb.add_argument("--save", action="store_true",
                    help="write the outputs back into each notebook that passed")
    wb.set_defaults(func=_cmd_workbook)
    bench = sub.add_parser("bench", help="side-by-side benchmarks (CSV + PNG charts)")
    bench.add_argument("--scale", choices=["ci", "full"],
                       default=os.environ.get("MSSTORE_SCALE", "ci"))
    bench.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    bench.add_argument("--only", default="", help="comma-separated numbers, e.g. 1,3")
    bench.set_defaults(func=_cmd_bench)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except MsstoreError as e:
        print(f"msstore: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

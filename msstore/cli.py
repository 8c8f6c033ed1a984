"""``msstore up | down | status | env | migrate | workbook | bench``: the servers from a shell.

``probe`` is internal (the Makefile's external lane) and hidden from ``--help``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from . import services
from ._credentials import path as credentials_path
from ._credentials import redact
from ._extras import needs_extra
from .errors import MsstoreError


def _cmd_up(args: argparse.Namespace) -> int:
    endpoints = services.up(nats_nodes=args.nats_nodes, nats_sync=args.nats_sync)
    if args.rotate_credentials:
        endpoints = services.rotate_credentials()
        print("new passwords: PostgreSQL (both roles) and NATS; restart the processes that "
              "use the old URLs (`msstore env` prints the new ones)")
    for info in (endpoints.postgres, endpoints.nats):
        print(f"{info.name:<9} {redact(info.url)}  (pid {info.pid})")
    print(f"credentials: {credentials_path(services.state_home())} "
          "(`msstore env` prints the URLs with them)")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    if args.purge:
        home = services.state_home()
        data = services.data_root(home)
        stopped = services.purge(home)
        print(f"deleted: {home}" + (f" and {data}" if data != home else ""))
    else:
        stopped = services.down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    """Exit 0 only when every server answers, so scripts can wait on ``msstore status``."""
    home = services.state_home()
    rows = services.status(home)
    healthy = all(row["health"] in services.HEALTHY for row in rows)
    if args.json:
        print(json.dumps({"state_folder": str(home), "healthy": healthy, "servers": rows},
                         indent=2))
        return 0 if healthy else 1
    print(f"state folder: {home}")
    for row in rows:
        pid = f" pid {row['pid']}" if row.get("pid") else ""
        data = f"  data {row['data']}" if row.get("data") else ""
        print(f"{row['server']:<9} {row['mode']:<9} {row['health']:<11} {row['version']:<28} "
              f"{row['url']}{pid}{data}")
        for node in row.get("nodes") or []:  # type: ignore[attr-defined]
            lead = "  meta leader" if node["meta_leader"] else ""
            npid = f" pid {node['pid']}" if node["pid"] else ""
            print(f"  {node['server_name']:<12} {node['health']:<6} {node['url']}{npid}{lead}")
    if not healthy:
        down = [str(r["server"]) for r in rows if r["health"] not in services.HEALTHY]
        print(f"msstore: not answering: {', '.join(down)}; `msstore up` starts the embedded "
              f"servers (external ones: check {services.DATABASE_URL_ENV} / "
              f"{services.NATS_URL_ENV})", file=sys.stderr)
    return 0 if healthy else 1


def _cmd_env(args: argparse.Namespace) -> int:
    """Print the exports of the servers as they are; start nothing (``msstore up`` does)."""
    rows = services.status()
    if args.start or any(not row["url"] for row in rows):
        if not args.start:
            print("msstore: the embedded servers were never started here; starting them "
                  "(`msstore up`)", file=sys.stderr)
        print("\n".join(services.env_lines(services.resolve())))
        return 0
    print("\n".join(services.env_lines(services.current())))
    down = [str(r["server"]) for r in rows if r["health"] not in services.HEALTHY]
    if down:
        print(f"msstore: {', '.join(down)} not answering at the URL above; `msstore up` starts "
              "the embedded servers again at the same URLs while their ports are free "
              "(or use `msstore env --start`)", file=sys.stderr)
        return 1
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
        from jupyter_client.manager import KernelManager
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError

    notebooks: list[Path] = []
    for given in map(Path, args.paths):
        notebooks += sorted(given.glob("[0-9][0-9]_*.ipynb")) if given.is_dir() else [given]
    if not notebooks:
        print(f"no notebooks in {' '.join(args.paths)}")
        return 1
    failed = 0
    sockets = tempfile.TemporaryDirectory(prefix="msstore-kernels-")
    # a kernel process' own stderr (ipykernel's shutdown noise, a crash) goes to a log file:
    # cell output, stderr included, still reaches the notebook through the kernel protocol
    logs = services.state_home() / "workbook-kernels"
    logs.mkdir(parents=True, exist_ok=True)
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
        start = time.perf_counter()
        # IPC sockets in a private folder: a TCP kernel warns "running over TCP without
        # encryption" once per notebook, which buried the one line per notebook
        km = KernelManager(kernel_name="python3", transport="ipc",
                           ip=str(Path(sockets.name) / path.stem))
        kernel_log = logs / f"{path.stem}.log"
        try:
            with kernel_log.open("w") as log:
                NotebookClient(nb, timeout=args.timeout, km=km,
                               resources={"metadata": {"path": str(path.parent)}}
                               ).execute(stderr=log)
            verdict = "ok"
            if args.save:
                nbformat.write(nb, path)  # type: ignore[no-untyped-call]
        except CellExecutionError as e:
            failed += 1
            verdict = ("FAILED: " + str(e).strip().splitlines()[-1][:200]
                       + f" (kernel log: {kernel_log})")
        finally:
            if km.has_kernel:  # a km passed in is ours to shut down, not nbclient's
                km.shutdown_kernel()
        print(f"{path.name:<40} {time.perf_counter() - start:6.1f}s  {verdict}", flush=True)
    sockets.cleanup()
    print(f"{len(notebooks) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _cmd_lab(args: argparse.Namespace) -> int:
    from ._lab import run_lab

    return run_lab(Path(args.path), args.port)


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


DESCRIPTION = """\
Manage the PostgreSQL and NATS servers msstore uses, and run the workbook.

With no environment variables msstore runs an embedded PostgreSQL and nats-server, with their
state in the state folder: .msstore/ at the repository root, ~/.msstore outside a repository,
or MSSTORE_HOME. Set MSSTORE_DATABASE_URL / MSSTORE_NATS_URL to use your own servers instead.
"""
PUBLIC_COMMANDS = ("up", "down", "status", "env", "migrate", "workbook", "lab", "bench")


def build_parser() -> argparse.ArgumentParser:
    """The ``msstore`` command line; ``probe`` is accepted but not listed."""
    parser = argparse.ArgumentParser(prog="msstore", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, title="commands",
                                metavar="{" + ",".join(PUBLIC_COMMANDS) + "}")
    up = sub.add_parser("up", help="start the embedded servers (idempotent)")
    up.add_argument("--nats-nodes", type=int, default=None, metavar="N",
                    help="run NATS as an N-node JetStream cluster on loopback (3 survives one "
                         "node lost; default: MSSTORE_NATS_NODES, else as last time, else 1)")
    up.add_argument("--nats-sync", choices=["default", "always"], default=None,
                    help="'always': every node fsyncs before acknowledging a write "
                         "(default: MSSTORE_NATS_SYNC, else as last time)")
    up.add_argument("--rotate-credentials", action="store_true",
                    help="new passwords for PostgreSQL and NATS (restarts NATS)")
    up.set_defaults(
        func=_cmd_up)
    down = sub.add_parser("down", help="stop the embedded servers")
    down.add_argument("--purge", action="store_true",
                      help="also delete their data (the state folder and PostgreSQL's data)")
    down.set_defaults(func=_cmd_down)
    st = sub.add_parser("status", help="URL, PID, version, data folder and health of each "
                        "server; exits 1 when one does not answer")
    st.add_argument("--json", action="store_true", help="print the state as JSON")
    st.set_defaults(func=_cmd_status)
    env = sub.add_parser("env", help="print export lines for the server URLs (starts nothing "
                         "unless --start or never started)")
    env.add_argument("--start", action="store_true",
                     help="start the embedded servers first if they are down")
    env.set_defaults(func=_cmd_env)
    sub.add_parser("migrate", help="apply pending schema migrations").set_defaults(
        func=_cmd_migrate)
    probe = sub.add_parser("probe")  # internal: no help, not in PUBLIC_COMMANDS
    probe.add_argument("urls", nargs="+")
    probe.set_defaults(func=_cmd_probe)
    wb = sub.add_parser("workbook", help="run every notebook headless and report each")
    wb.add_argument("paths", nargs="*", default=["notebooks"],
                    help="notebook files or folders (default: notebooks)")
    wb.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    wb.add_argument("--save", action="store_true",
                    help="write the outputs back into each notebook that passed")
    wb.set_defaults(func=_cmd_workbook)
    lab = sub.add_parser("lab", help="JupyterLab on the same servers (as root too); prints "
                         "the URL to open")
    lab.add_argument("path", nargs="?", default="notebooks",
                     help="the folder to open (default: notebooks)")
    lab.add_argument("--port", type=int, default=8888,
                     help="port to listen on (default 8888; a free one if taken or 0)")
    lab.set_defaults(func=_cmd_lab)
    bench = sub.add_parser("bench", help="side-by-side benchmarks (CSV + PNG charts)")
    bench.add_argument("--scale", choices=["ci", "full"],
                       default=os.environ.get("MSSTORE_SCALE", "ci"))
    bench.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    bench.add_argument("--only", default="", help="comma-separated numbers, e.g. 1,3")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe fails here, inside the handler below
        return code
    except MsstoreError as e:
        print(f"msstore: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `msstore status | head -1`: the reader left; say nothing more, exit quietly
        # (stdout goes to /dev/null so the interpreter's final flush cannot raise again)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())

"""An embedded JetStream cluster on loopback: N ``nats-server`` nodes from the same wheel.

::

    msstore up --nats-nodes 3        home/nats-cluster/
      n1  client :p1  route :r1  http :m1     n1.conf  n1/ (store)  n1.log  n1.pid
      n2  client :p2  route :r2  http :m2     n2.conf  n2/ …
      n3  client :p3  route :r3  http :m3     n3.conf  n3/ …
      routes: every node lists the others    MSSTORE_NATS_URL = nats://…:p1,nats://…:p2,…

Each node has its own ``server_name`` and store folder, and keeps its three ports across
restarts while they are free (a killed node comes back at the same address, with its files).
JetStream needs a quorum of ``N // 2 + 1`` nodes: 2 of 3. ``sync="always"`` makes every node
fsync before it acknowledges (``jetstream { sync_interval: always }``); the default fsyncs every
2 minutes. A single node started with ``sync`` gets the same config file, without routes.

Every config (mode 0600) carries the credentials file's NATS user for clients and for routes
(a process that dials a route port without them is refused). Each node keeps its HTTP
monitoring port, bound to loopback: ``msstore up`` and ``msstore status`` read ``/healthz``
and ``/jsz`` there (server and stream statistics, no message data).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Final

from ._credentials import with_password
from ._nats_server import authorization, write_private
from ._procs import HOST, cmdline, pid_alive, port_for, port_open, wait_gone
from .errors import InvalidOptionError, ServiceError

CLUSTER_NAME: Final = "msstore"
NODES_ENV: Final = "MSSTORE_NATS_NODES"
SYNC_ENV: Final = "MSSTORE_NATS_SYNC"
SYNC_VALUES: Final = ("default", "always")
MAX_NODES: Final = 7


def check_layout(nodes: int, sync: str) -> tuple[int, str]:
    """``(nodes, sync)`` validated: 1…7 nodes, sync "default" or "always"."""
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= MAX_NODES:
        raise InvalidOptionError(
            f"nats nodes must be an int from 1 to {MAX_NODES} (3 tolerates one node lost), "
            f"got {nodes!r} (set {NODES_ENV} or --nats-nodes)")
    if sync not in SYNC_VALUES:
        raise InvalidOptionError(
            f"nats sync must be one of {', '.join(SYNC_VALUES)}, got {sync!r} "
            f"(set {SYNC_ENV} or --nats-sync)")
    return nodes, sync


def wanted_layout(previous: dict[str, Any] | None, nodes: int | None,
                  sync: str | None) -> tuple[int, str]:
    """What to run: the arguments, else the env vars, else what ran last time, else 1 node."""
    prev = previous or {}
    if nodes is None:
        env = os.environ.get(NODES_ENV)
        try:
            nodes = int(env) if env else int(prev.get("nodes_wanted", 1))
        except ValueError:
            raise InvalidOptionError(f"{NODES_ENV}={env!r} is not a number of nodes") from None
    if sync is None:
        sync = os.environ.get(SYNC_ENV) or str(prev.get("sync", "default"))
    return check_layout(nodes, sync)


def _addr(port: object) -> str:
    return json.dumps(f"{HOST}:{port}")


def _config(name: str, node: dict[str, Any], peers: list[dict[str, Any]], sync: str,
            cluster: str, creds: dict[str, str]) -> str:
    lines = [f"server_name: {json.dumps(name)}", f"listen: {_addr(node['port'])}",
             f"http: {_addr(node['monitor_port'])}",
             "jetstream {", f"  store_dir: {json.dumps(node['store'])}"]
    if sync == "always":
        lines.append("  sync_interval: always")
    lines.append("}")
    if peers:
        routes = ", ".join(json.dumps(with_password(
            f"nats-route://{HOST}:{p['cluster_port']}", creds["user"], creds["password"]))
            for p in peers)
        lines += ["cluster {", f"  name: {json.dumps(cluster)}",
                  f"  listen: {_addr(node['cluster_port'])}",
                  "  " + authorization(creds).replace("\n", "\n  ").rstrip(),
                  f"  routes: [{routes}]", "}"]
    return "\n".join(lines) + "\n" + authorization(creds)


def node_alive(node: dict[str, Any]) -> bool:
    pid, port = node.get("pid"), node.get("port")
    return (isinstance(pid, int) and isinstance(port, int) and pid_alive(pid)
            and str(node.get("conf", "")) in cmdline(pid) and port_open(port))


def _spawn(bin_path: Path, node: dict[str, Any]) -> subprocess.Popen[bytes]:
    args = [str(bin_path), "-c", node["conf"], "-l", node["log"], "-P", node["pidfile"]]
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def start_nodes(home: Path, previous: dict[str, Any] | None, bin_path: Path, nodes: int,
                sync: str, creds: dict[str, str]) -> dict[str, Any]:
    """Start the nodes of the layout that are not running (all of them the first time); return
    the state record. Nodes of an earlier, different layout are stopped first."""
    prev = previous or {}
    old = list(prev.get("nodes") or [])
    if len(old) != nodes or prev.get("sync") != sync:
        stop_nodes(prev)
        old = [] if len(old) != nodes else old
    root = home / "nats-cluster"
    root.mkdir(parents=True, exist_ok=True)
    # A name of its own, kept across restarts: a node of another cluster on this machine that
    # still retries a route to a port this one reuses is refused, instead of merging the two
    # (the server names are msstore-n1… in every cluster). Older state folders kept the shared
    # name, and their stores were made under it.
    cluster = str(prev.get("cluster") or (CLUSTER_NAME if old else
                                          f"{CLUSTER_NAME}-{secrets.token_hex(4)}"))
    recs: list[dict[str, Any]] = []
    for i in range(nodes):
        before = old[i] if i < len(old) else None
        name = f"n{i + 1}"
        keep = before if before and node_alive(before) else None
        recs.append(keep or {
            "name": name, "port": port_for(before),
            "cluster_port": port_for(before, "cluster_port"),
            "monitor_port": port_for(before, "monitor_port"), "store": str(root / name),
            "conf": str(root / f"{name}.conf"), "log": str(root / f"{name}.log"),
            "pidfile": str(root / f"{name}.pid")})
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for node in recs:
        if "pid" in node and node_alive(node):
            continue
        peers = [p for p in recs if p is not node] if nodes > 1 else []
        write_private(Path(node["conf"]),
                      _config(f"msstore-{node['name']}", node, peers, sync, cluster, creds))
        procs[node["name"]] = _spawn(bin_path, node)
        node["pid"] = procs[node["name"]].pid
        node["url"] = f"nats://{HOST}:{node['port']}"
    _wait_ready(recs, procs)
    return {"pid": recs[0]["pid"], "port": recs[0]["port"], "nodes": recs,
            "nodes_wanted": nodes, "sync": sync, "store": str(root), "cluster": cluster,
            "auth": True,
            "url": ",".join(n["url"] for n in recs)}


def _wait_ready(recs: list[dict[str, Any]], procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """Every node accepts clients and reports JetStream healthy (a meta leader elected)."""
    deadline = time.monotonic() + 60
    waiting = list(recs)
    while waiting:
        node = waiting[0]
        proc = procs.get(node["name"])
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            tail = Path(node["log"]).read_text()[-2000:] if Path(node["log"]).exists() else ""
            stop_nodes({"nodes": recs})
            raise ServiceError(f"nats-server node {node['name']} did not become healthy "
                               f"(exit {proc.returncode if proc else '?'}):\n{tail}")
        if port_open(node["port"]) and _healthz(node) == "ok":
            waiting.pop(0)
        else:
            time.sleep(0.1)
    while not _meta_current(recs) and time.monotonic() < deadline:
        time.sleep(0.1)  # a replicated stream can be placed only once the leader saw every peer


def _meta_current(recs: list[dict[str, Any]]) -> bool:
    """The meta leader has heard from every other node (else R3 placement fails: 10005)."""
    for node in recs:
        meta = (_monitor(node, "/jsz") or {}).get("meta_cluster") or {}
        if meta.get("leader") == f"msstore-{node['name']}":
            peers = meta.get("replicas") or []
            return len(peers) == len(recs) - 1 and all(
                p.get("current") and not p.get("offline") for p in peers)
    return False


def _monitor(node: dict[str, Any], path: str) -> Any:
    url = f"http://{HOST}:{node['monitor_port']}{path}"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:  # loopback only
            return json.loads(r.read())
    except Exception as e:  # an HTTP error body is JSON too
        body = getattr(e, "read", None)
        try:
            return json.loads(body()) if body else None
        except Exception:
            return None


def _healthz(node: dict[str, Any]) -> str:
    answer = _monitor(node, "/healthz")
    return str(answer.get("status", "")) if isinstance(answer, dict) else ""


def meta_leader(rec: dict[str, Any]) -> str | None:
    """The server name of the JetStream meta leader, as the first node that answers sees it."""
    for node in rec.get("nodes") or []:
        if node_alive(node):
            jsz = _monitor(node, "/jsz")
            leader = (jsz or {}).get("meta_cluster", {}).get("leader")
            if leader:
                return str(leader)
    return None


def node_rows(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per node: name, PID, URL, health ("up"/"down"), leader (bool)."""
    leader = meta_leader(rec)
    rows = []
    for node in rec.get("nodes") or []:
        alive = node_alive(node)
        rows.append({"name": node["name"], "server_name": f"msstore-{node['name']}",
                     "pid": node.get("pid") if alive else None, "url": node.get("url", ""),
                     "health": "up" if alive else "down",
                     "meta_leader": leader == f"msstore-{node['name']}"})
    return rows


def stop_node(node: dict[str, Any], how: signal.Signals = signal.SIGTERM) -> bool:
    """Stop one node if it is still the process msstore started; True if it was running."""
    pid = node.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid) or str(node.get("conf")) not in cmdline(pid):
        return False
    os.kill(pid, how)
    wait_gone(pid, f"nats-server {node.get('name')}")
    return True


def stop_nodes(rec: dict[str, Any]) -> None:
    for node in rec.get("nodes") or []:
        stop_node(node)


__all__ = ["NODES_ENV", "SYNC_ENV", "check_layout", "meta_leader", "node_alive", "node_rows",
           "start_nodes", "stop_node", "stop_nodes", "wanted_layout"]

"""Which of a thread's keys a retention rule lets go (pure: the saver lists and removes).

A rule keeps, per namespace, the newest ``keep_last`` checkpoints that are not older than
``older_than`` — and always the newest one, so a thread can be resumed. What goes is exactly
what belongs to the checkpoints let go: their documents, their pending writes, and the channel
blobs they use that no kept checkpoint uses. A key no checkpoint document accounts for (a
blob or a write of a checkpoint still being saved) is never touched.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from langgraph.checkpoint.serde.base import SerializerProtocol

from . import _layout as L
from ._scan import Found

Where = tuple[uuid.UUID, str]


def _blobs(serde: SerializerProtocol, doc: dict[str, Any]) -> set[str]:
    versions = L.unpack(serde, doc["checkpoint"])["channel_versions"]
    return {L.blob_key(doc["checkpoint_ns"], ch, v) for ch, v in versions.items()}


def _older(doc: dict[str, Any], cutoff: datetime | None) -> bool:
    if cutoff is None or not doc.get("ts"):
        return False
    return datetime.fromisoformat(doc["ts"]) < cutoff


def let_go(found: Found, serde: SerializerProtocol, *, keep_last: int,
           older_than: datetime | None = None) -> set[Where]:
    """The keys of ``found`` (one thread's, as :func:`._scan.scan` lists them) to remove."""
    by_ns: dict[tuple[uuid.UUID, str], list[dict[str, Any]]] = {}
    for (agent, key), doc in found.items():
        if key.startswith("cp."):
            by_ns.setdefault((agent, doc["checkpoint_ns"]), []).append(doc)
    gone: set[Where] = set()
    for (agent, ns), docs in by_ns.items():
        docs.sort(key=lambda d: d["checkpoint_id"], reverse=True)
        kept = [d for i, d in enumerate(docs)
                if i == 0 or (i < keep_last and not _older(d, older_than))]
        if len(kept) == len(docs):
            continue
        kept_ids = {d["checkpoint_id"] for d in kept}
        doomed = [d for d in docs if d["checkpoint_id"] not in kept_ids]
        used = set().union(*(_blobs(serde, d) for d in kept))
        blobs = set().union(*(_blobs(serde, d) for d in doomed)) - used
        writes = tuple(L.writes_prefix(ns, d["checkpoint_id"]) for d in doomed)
        gone |= {(agent, L.checkpoint_key(ns, d["checkpoint_id"])) for d in doomed}
        gone |= {(a, k) for a, k in found if a == agent and (k in blobs or k.startswith(writes))}
    return gone


__all__ = ["let_go"]

"""Where :class:`MsstoreSaver` puts a LangGraph thread: its agent id, its keys, its documents.

One thread is one msstore agent: ``uuid5(bucket, thread_id)``, since msstore's agent ids are
UUIDs and LangGraph's thread ids are any string. Its keys in ``agents.state`` (and in KV as
``<agent>.<key>``)::

    cp.<ns>.<checkpoint_id>                       the checkpoint without its channel values
    bl.<ns>.<channel>.<version>                   one channel value, once per version (small
                                                  ones go inline in the checkpoint)
    wr.<ns>.<checkpoint_id>.<task_id>.<idx>       one call's pending writes (idx: its first)

Every ``<…>`` is a :func:`token`: the string itself behind ``i`` when it is made of letters,
digits and ``-`` only (UUIDs stay readable), else ``h`` and its UTF-8 bytes in hex. Either way
it is one NATS subject token, never empty (the root namespace ``""`` is ``h``), and the
mapping is exact, so a subject filter on ``<agent>.cp.<ns>.>`` sees one namespace's
checkpoints.

Values are JSON documents (what msstore stores); what LangGraph's serializer (``serde``) makes
of a value is kept as its type name and base64 bytes, so any serde round-trips exactly.
"""

from __future__ import annotations

import base64
import functools
import re
import uuid
from collections.abc import Iterable
from typing import Any, Final

from langgraph.checkpoint.serde.base import SerializerProtocol

from ...codec import dumps, loads
from ...errors import InvalidKeyError, MsstoreError

#: uuid5 namespace of the thread → agent mapping (fixed: changing it orphans every thread)
THREAD_NAMESPACE: Final = uuid.UUID("6b0f4f3e-2c1a-5d1e-9a57-6c616e676772")
_PLAIN = re.compile(r"[0-9A-Za-z][-0-9A-Za-z]*")
#: a channel that has a version but no value (LangGraph's empty channel)
EMPTY: Final = {"t": "empty"}


@functools.lru_cache(maxsize=16_384)
def thread_agent(bucket: str, thread_id: str) -> uuid.UUID:
    """The msstore agent of a thread: stable across processes, distinct per bucket (memoised:
    every checkpoint and write of a thread asks for it)."""
    return uuid.uuid5(THREAD_NAMESPACE, f"{bucket}\x00{thread_id}")


def token(part: str) -> str:
    """``part`` as one subject token (exact, readable when it is plain)."""
    if _PLAIN.fullmatch(part):
        return "i" + part
    return "h" + part.encode("utf-8").hex()


def untoken(tok: str) -> str:
    """Invert :func:`token`."""
    if tok[:1] == "i":
        return tok[1:]
    if tok[:1] == "h":
        return bytes.fromhex(tok[1:]).decode("utf-8")
    raise InvalidKeyError(f"{tok!r} is not a token MsstoreSaver wrote")


def checkpoint_prefix(ns: str | None = None) -> str:
    return "cp." if ns is None else f"cp.{token(ns)}."


def checkpoint_key(ns: str, checkpoint_id: str) -> str:
    return f"cp.{token(ns)}.{token(checkpoint_id)}"


def blob_key(ns: str, channel: str, version: object) -> str:
    return f"bl.{token(ns)}.{token(channel)}.{token(str(version))}"


def writes_prefix(ns: str, checkpoint_id: str) -> str:
    return f"wr.{token(ns)}.{token(checkpoint_id)}."


def write_key(ns: str, checkpoint_id: str, task_id: str, idx: int) -> str:
    return writes_prefix(ns, checkpoint_id) + f"{token(task_id)}.{token(str(idx))}"


def head_key(agent: uuid.UUID, ns: str) -> str:
    """The key of a namespace's newest checkpoint id in the heads bucket."""
    return f"{agent}.{token(ns)}"


def key_tokens(key: str) -> list[str]:
    """The decoded parts of a key after its kind: ``cp.<ns>.<id>`` → ``[ns, id]``."""
    return [untoken(t) for t in key.split(".")[1:]]


#: a str channel value up to this many characters goes inline with its checkpoint
INLINE_STR: Final = 256


def inline(value: object) -> bool:
    """Kept in the checkpoint document itself (as LangGraph's PostgreSQL saver keeps
    primitives), not as a blob: None, bools, numbers and short strings, repeated per
    checkpoint because they cost less than a key, a round trip and a row of their own."""
    return value is None or type(value) in (bool, int, float) or (
        type(value) is str and len(value) <= INLINE_STR)


def flat_writes(docs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pending writes of stored call documents, one per (task, index)."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for doc in docs:
        for w in doc["writes"]:
            out[(doc["task_id"], w["idx"])] = {**w, "task_id": doc["task_id"],
                                               "task_path": doc["task_path"]}
    return list(out.values())


# ------------------------------------------------------------------ serde ⇄ JSON


def pack(serde: SerializerProtocol, obj: Any) -> dict[str, str]:
    """``obj`` through LangGraph's serializer, as a JSON object: type name and base64 bytes."""
    kind, data = serde.dumps_typed(obj)
    return {"t": kind, "b": base64.b64encode(data).decode("ascii")}


def unpack(serde: SerializerProtocol, doc: dict[str, str]) -> Any:
    return serde.loads_typed((doc["t"], base64.b64decode(doc["b"])))


def metadata_fields(serde: SerializerProtocol, metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata as plain JSON when it round-trips exactly (queryable in PostgreSQL's JSONB),
    else through serde (``metadata_typed``)."""
    try:
        if loads(dumps(metadata)) == metadata:
            return {"metadata": metadata}
    except MsstoreError:  # not JSON as it is: keep it exact through serde
        pass
    return {"metadata_typed": pack(serde, metadata)}


def metadata_of(serde: SerializerProtocol, doc: dict[str, Any]) -> dict[str, Any]:
    if doc.get("metadata_typed") is not None:
        md: dict[str, Any] = unpack(serde, doc["metadata_typed"])
        return md
    return dict(doc.get("metadata") or {})


__all__ = [
    "EMPTY",
    "THREAD_NAMESPACE",
    "blob_key",
    "checkpoint_key",
    "checkpoint_prefix",
    "flat_writes",
    "head_key",
    "inline",
    "key_tokens",
    "metadata_fields",
    "metadata_of",
    "pack",
    "thread_agent",
    "token",
    "unpack",
    "untoken",
    "write_key",
    "writes_prefix",
]

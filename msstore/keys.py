"""NATS-safe keys: an exact, readable round trip for any non-empty string.

NATS KV keys must match ``[-/_=.a-zA-Z0-9]+``; ``.`` separates subject tokens, an empty
token (``a..b``, a leading or trailing dot) is rejected, ``*`` and ``>`` are wildcards and
``_kv`` is reserved. The seed's ``agent:<id>`` and ``<agent_id>:<key>`` keys are therefore
invalid. msstore maps every key through :func:`encode_key`:

* characters in ``[-/_a-zA-Z0-9]`` stay as they are, so safe keys stay readable;
* ``.`` stays a token separator wherever it makes no empty token, and is escaped otherwise;
* every other character, and ``=`` itself, becomes ``=XX`` per UTF-8 byte (upper-case hex),
  like quoted-printable: ``agent:42`` -> ``agent=3A42``, ``*`` -> ``=2A``;
* a key that starts with ``_kv`` (any case) has its ``_`` escaped: ``_kv`` -> ``=5Fkv``.

Refused with :class:`InvalidKeyError` before any I/O (by :func:`check_key`, which
:func:`encode_key`, :func:`encode_token` and :func:`join_key` call first): keys that are not
str, empty keys, keys containing U+0000 (PostgreSQL ``text`` refuses NUL), keys with lone
surrogates (not Unicode text), and keys longer than :data:`MAX_ENCODED_KEY` once encoded.

The mapping msstore uses instead of the seed's keys:

=====================  ============================  ==============================
seed                   msstore KV key                example
=====================  ============================  ==============================
``agent:<id>``         ``agent.<id>``                ``agent.6f1c…``
``<agent_id>:<key>``   ``<agent_id>.<encode_key>``   ``6f1c….plan/step=3A1``
=====================  ============================  ==============================

so that a watch on ``<agent_id>.>`` sees exactly one agent's keys. The id part is always
encoded with :func:`encode_token` (every ``.`` escaped) so it is exactly one token.
"""

from __future__ import annotations

import re

from .errors import InvalidKeyError

#: The NATS KV key grammar (as checked by nats-py and the server).
NATS_KEY_RE = re.compile(r"^[-/_=.a-zA-Z0-9]+$")
#: Encoded keys longer than this are refused: a KV subject is ``$KV.<bucket>.<key>`` and the
#: server's control line (subject plus headers) is 4 KiB by default.
MAX_ENCODED_KEY = 1024

_SAFE = frozenset("-/_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_ALREADY_SAFE_RE = re.compile(r"^[-/_a-zA-Z0-9]+(?:\.[-/_a-zA-Z0-9]+)*$")
_ESCAPE_RE = re.compile(r"=([0-9A-F]{2})")


def _escape(ch: str) -> str:
    try:
        return "".join(f"={b:02X}" for b in ch.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise InvalidKeyError(f"key contains {ch!r}, which is not valid Unicode text") from e


def check_key(key: object) -> str:
    """``key`` if every layer can store it; else :class:`InvalidKeyError` saying what is wrong.

    A key must be a non-empty str of Unicode text (no lone surrogates: they have no UTF-8
    form), without U+0000 (PostgreSQL ``text`` columns refuse NUL, so a KV write would be
    accepted and its flush refused), and at most :data:`MAX_ENCODED_KEY` characters (the
    exact limit, on the encoded form, is checked by :func:`encode_key`).
    """
    if not isinstance(key, str):
        raise InvalidKeyError(f"keys must be str, got {type(key).__name__}: {key!r}"[:200])
    if not key:
        raise InvalidKeyError("keys must not be empty")
    if len(key) > MAX_ENCODED_KEY:
        raise InvalidKeyError(
            f"key {key[:40]!r}… is {len(key):,} characters long, above the limit of "
            f"{MAX_ENCODED_KEY} (on the encoded key); use a shorter key")
    if "\x00" in key:
        raise InvalidKeyError(
            f"key {key[:40]!r} contains U+0000 (NUL), which PostgreSQL text columns refuse "
            "(the write would reach KV and its flush be refused); remove it")
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidKeyError(
                f"key {key[:40]!r} contains the lone surrogate {key[e.start]!r} at position "
                f"{e.start}, which is not Unicode text (it has no UTF-8 form); fix the key"
            ) from None
    return key


def _limit(original: str, encoded: str) -> str:
    if len(encoded) > MAX_ENCODED_KEY:
        raise InvalidKeyError(
            f"key {original[:40]!r}… encodes to {len(encoded)} characters, above the limit of "
            f"{MAX_ENCODED_KEY}; use a shorter key (non-ASCII characters take 3 per byte)"
        )
    return encoded


def encode_key(key: str) -> str:
    """Encode ``key`` into a valid NATS KV key; dots that make no empty token stay dots."""
    key = check_key(key)
    if _ALREADY_SAFE_RE.match(key) and not key[:3].lower() == "_kv":
        return _limit(key, key)
    out: list[str] = []
    last = len(key) - 1
    for i, ch in enumerate(key):
        if ch in _SAFE:
            out.append(ch)
        elif ch == "." and out and not out[-1].endswith(".") and i < last:
            out.append(".")
        else:
            out.append(_escape(ch))
    if key[:3].lower() == "_kv":
        out[0] = "=5F"
    return _limit(key, "".join(out))


def encode_token(part: str) -> str:
    """Encode ``part`` as exactly one subject token (every ``.`` escaped too)."""
    part = check_key(part)
    encoded = encode_key(part)
    if "." in encoded:
        encoded = encoded.replace(".", "=2E")
    return _limit(part, encoded)


def decode_key(encoded: str) -> str:
    """Invert :func:`encode_key` / :func:`encode_token` exactly."""
    if not isinstance(encoded, str) or not is_valid_nats_key(encoded):
        raise InvalidKeyError(f"{encoded!r} is not a valid NATS KV key")
    if "=" not in encoded:
        return encoded
    pieces = _ESCAPE_RE.split(encoded)  # text, hex, text, hex, ..., text
    raw = bytearray()
    for i, piece in enumerate(pieces):
        if i % 2:
            raw.append(int(piece, 16))
        elif "=" in piece:
            raise InvalidKeyError(f"{encoded!r} has a stray '=': not a key msstore encoded")
        else:
            raw += piece.encode("ascii")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidKeyError(f"{encoded!r} is not a key msstore encoded: {e}") from e


def join_key(*parts: str) -> str:
    """Join a hierarchical key: every part but the last is one token, the last a key."""
    if not parts:
        raise InvalidKeyError("join_key needs at least one part")
    for part in parts:  # every part checked before anything else touches it
        check_key(part)
    *head, tail = parts
    joined = ".".join([*map(encode_token, head), encode_key(tail)])
    return _limit(".".join(parts), joined)


def split_key(encoded: str, tokens: int = 1) -> list[str]:
    """Invert :func:`join_key` for a key joined from ``tokens`` leading parts plus a tail."""
    if not isinstance(encoded, str):
        raise InvalidKeyError(f"keys must be str, got {type(encoded).__name__}")
    pieces = encoded.split(".", tokens)
    if len(pieces) != tokens + 1:
        raise InvalidKeyError(f"{encoded!r} does not have {tokens} leading token(s)")
    return [decode_key(p) for p in pieces]


def is_valid_nats_key(encoded: str) -> bool:
    """True when ``encoded`` is a key NATS accepts (grammar, no empty token, not ``_kv``)."""
    return (
        bool(NATS_KEY_RE.match(encoded))
        and not encoded.startswith(".")
        and not encoded.endswith(".")
        and ".." not in encoded
        and not encoded[:3].lower() == "_kv"
    )


__all__ = [
    "MAX_ENCODED_KEY",
    "check_key",
    "decode_key",
    "encode_key",
    "encode_token",
    "is_valid_nats_key",
    "join_key",
    "split_key",
]

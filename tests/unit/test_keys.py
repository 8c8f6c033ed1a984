"""NATS key encoding: exact round trip, always a valid key, readable when already safe."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msstore import InvalidKeyError
from msstore.keys import (
    MAX_ENCODED_KEY,
    check_key,
    decode_key,
    encode_key,
    encode_token,
    is_valid_nats_key,
    join_key,
    split_key,
)

NATS_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")

# Keys built to hit every hard case: unicode, ':', wildcards, dots, spaces, '_kv' prefixes.
_pieces = st.one_of(
    st.text(min_size=1, max_size=12),
    st.sampled_from([":", "*", ">", ".", "..", " ", "_kv", "_KV.", "=", "=3A", "agent:",
                     "/", "-", "$KV", "\t", "é", "🎉", "\x01", "\U0010ffff"]),
)
# NUL is refused (see test_nul_is_refused_everywhere), so the round-trip keys leave it out.
keys = st.lists(_pieces, min_size=1, max_size=8).map("".join).filter(
    lambda k: bool(k) and "\x00" not in k)


def _assert_valid(encoded: str) -> None:
    assert NATS_KEY.match(encoded), encoded
    assert "*" not in encoded and ">" not in encoded
    assert "" not in encoded.split("."), f"empty token in {encoded!r}"
    assert not encoded.lower().startswith("_kv")
    assert is_valid_nats_key(encoded)


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys)
def test_any_key_round_trips_and_encodes_to_a_valid_nats_key(key: str) -> None:
    encoded = encode_key(key)
    _assert_valid(encoded)
    assert decode_key(encoded) == key


@settings(max_examples=2_000, deadline=None)
@given(keys, keys)
def test_joined_keys_keep_the_agent_in_exactly_one_token(agent: str, key: str) -> None:
    if len(encode_token(agent)) + 1 + len(encode_key(key)) > MAX_ENCODED_KEY:
        with pytest.raises(InvalidKeyError, match=str(MAX_ENCODED_KEY)):  # each part fits,
            join_key(agent, key)  # the two together do not: refused, as documented
        return
    joined = join_key(agent, key)
    _assert_valid(joined)
    assert joined.split(".", 1)[0] == encode_token(agent)
    assert split_key(joined) == [agent, key]


@settings(max_examples=2_000, deadline=None)
@given(keys, keys)
def test_distinct_keys_never_collide(a: str, b: str) -> None:
    if a != b:
        assert encode_key(a) != encode_key(b)


@pytest.mark.parametrize(
    ("key", "encoded"),
    [
        ("plain", "plain"),
        ("plan/step-1_a=b", "plan/step-1_a=3Db"),
        ("memory.short.term", "memory.short.term"),
        ("agent:42", "agent=3A42"),
        ("a..b", "a.=2Eb"),
        (".hidden", "=2Ehidden"),
        ("trailing.", "trailing=2E"),
        ("_kv.internal", "=5Fkv.internal"),
        ("orders.*", "orders.=2A"),
        ("orders.>", "orders.=3E"),
        ("two words", "two=20words"),
        ("é", "=C3=A9"),
    ],
)
def test_documented_mapping(key: str, encoded: str) -> None:
    assert encode_key(key) == encoded
    assert decode_key(encoded) == key


def test_seed_keys_map_to_valid_hierarchical_keys() -> None:
    agent = "6f1c2d9e-0000-4000-8000-000000000001"
    assert join_key("agent", agent) == f"agent.{agent}"
    assert join_key(agent, "plan:step") == f"{agent}.plan=3Astep"


@pytest.mark.parametrize("bad", ["", None, 42, b"bytes"])
def test_invalid_keys_raise_a_typed_error(bad: object) -> None:
    with pytest.raises(InvalidKeyError):
        encode_key(bad)  # type: ignore[arg-type]


def test_overlong_key_is_refused_with_the_limit_in_the_message() -> None:
    with pytest.raises(InvalidKeyError, match=str(MAX_ENCODED_KEY)):
        encode_key("é" * 200)  # 2 bytes -> 6 characters each
    assert len(encode_key("a" * MAX_ENCODED_KEY)) == MAX_ENCODED_KEY


@pytest.mark.parametrize("bad", ["a*b", "a..b", "=ZZ", "=3", "abc=", "=C3"])
def test_decode_refuses_what_encode_never_produces(bad: str) -> None:
    with pytest.raises(InvalidKeyError):
        decode_key(bad)


def test_lone_surrogate_is_a_typed_error() -> None:
    with pytest.raises(InvalidKeyError):
        encode_key("a\ud800")


_REFUSERS = {
    "check_key": check_key,
    "encode_key": encode_key,
    "encode_token": encode_token,
    "join_key(agent, key)": lambda k: join_key("6f1c2d9e-0000-4000-8000-000000000001", k),
    "join_key(key, agent)": lambda k: join_key(k, "plan"),
}


@pytest.mark.parametrize("name", sorted(_REFUSERS))
@pytest.mark.parametrize(("bad", "why"), [
    ("a\x00b", "U\\+0000"),
    ("\x00", "NUL"),
    ("", "empty"),
    (None, "must be str"),
    (42, "must be str"),
    (b"bytes", "must be str"),
    (("a", "b"), "must be str"),
    ("a\ud800", "surrogate"),
    ("\udfffx", "surrogate"),
    ("k" * 10_000, str(MAX_ENCODED_KEY)),
])
def test_bad_keys_are_refused_before_any_io(name: str, bad: object, why: str) -> None:
    with pytest.raises(InvalidKeyError, match=why):
        _REFUSERS[name](bad)


def test_nul_is_refused_everywhere_and_says_why() -> None:
    with pytest.raises(InvalidKeyError, match="PostgreSQL text columns refuse"):
        check_key("plan\x00step")
    assert issubclass(InvalidKeyError, ValueError)


def test_join_key_checks_parts_before_joining() -> None:
    # ".".join would raise a bare TypeError on a non-str part; the check comes first.
    with pytest.raises(InvalidKeyError, match="must be str, got int"):
        join_key("agent", 42)  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError, match="must be str, got NoneType"):
        join_key(None, "k")  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError, match="at least one part"):
        join_key()
    with pytest.raises(InvalidKeyError):
        split_key(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", [
    "a.b", "a.*", "a.>", "*", ">", "two words", " lead", "trail ", "ünïcode/日本語", "🎉.🎉",
    "a..b", ".", "..", "x" * MAX_ENCODED_KEY, "=00", "_kv", "\x01\x1f\x7f",
])
def test_awkward_keys_round_trip_exactly(key: str) -> None:
    encoded = encode_key(key)
    _assert_valid(encoded)
    assert decode_key(encoded) == key
    if len(encoded) < MAX_ENCODED_KEY - 6:
        assert split_key(join_key("agent", key)) == ["agent", key]


def test_the_limit_is_on_the_encoded_key() -> None:
    assert check_key("é" * 400) == "é" * 400  # 400 characters: check_key's cheap bound passes
    with pytest.raises(InvalidKeyError, match="encodes to 2400 characters"):
        encode_key("é" * 400)  # 6 characters each once encoded
    with pytest.raises(InvalidKeyError, match="10,000 characters"):
        check_key("k" * 10_000)

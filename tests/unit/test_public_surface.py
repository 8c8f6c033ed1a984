"""The top-level namespace: entry points, errors, and the result types public methods return."""

from __future__ import annotations

import inspect
import warnings

import pytest

import msstore
from msstore import codec, errors, keys

ENTRY_POINTS = {
    "Agent", "AgentRepository", "Connection", "DataRouter", "DataStorage", "DataType",
    "Embedder", "HashingEmbedder", "HybridStateManager", "KVStore", "MemoryCache",
    "MessageLog", "MessageLogStore", "MiniLMEmbedder", "Repository", "SQLStore",
    "StateLifecycleManager", "StorageLayer", "Store", "TaskQueue", "TaskStore",
    "TieredCacheRepository", "VectorStore", "__version__", "connect",
}
RESULTS = {
    "CacheEntry", "CacheSource", "ClaimedTask", "Hit", "HydrationResult", "LifecycleState",
    "MergeResult", "Message", "MessagePage", "RestoreResult", "TaskStatus", "TransitionEvent",
}
#: warnings msstore issues (an under-replicated bucket on a cluster)
WARNINGS = {"UnderReplicatedWarning"}
MOVED = {"dumps": codec, "loads": codec, "join_key": keys, "split_key": keys,
         "encode_key": keys, "decode_key": keys, "encode_token": keys}


def test_all_is_the_entry_points_the_errors_and_the_result_types() -> None:
    errors_ = {name for name, obj in vars(errors).items()
               if inspect.isclass(obj) and issubclass(obj, errors.MsstoreError)}
    assert set(msstore.__all__) == ENTRY_POINTS | RESULTS | errors_ | WARNINGS
    assert len(msstore.__all__) == len(set(msstore.__all__))
    for name in msstore.__all__:
        assert hasattr(msstore, name), name


def test_codec_and_key_helpers_are_not_in_all() -> None:
    assert not set(MOVED) & set(msstore.__all__)


@pytest.mark.parametrize("name", sorted(MOVED))
def test_moved_helpers_still_resolve_with_a_deprecation_warning(name: str) -> None:
    with pytest.warns(DeprecationWarning, match=f"msstore.{MOVED[name].__name__.split('.')[-1]}"
                                                f".{name}"):
        helper = getattr(msstore, name)
    assert helper is getattr(MOVED[name], name)


def test_an_unknown_attribute_is_an_attribute_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            msstore.nope  # noqa: B018


def test_the_managers_share_one_set_of_key_level_verbs() -> None:
    for verb in ("write_state", "read_state", "remove_state"):
        hybrid = inspect.signature(getattr(msstore.HybridStateManager, verb))
        lifecycle = inspect.signature(getattr(msstore.StateLifecycleManager, verb))
        assert list(hybrid.parameters) == list(lifecycle.parameters), verb
        assert hybrid.return_annotation == lifecycle.return_annotation, verb
    for old in ("write", "read", "delete"):
        assert not hasattr(msstore.StateLifecycleManager, old), old

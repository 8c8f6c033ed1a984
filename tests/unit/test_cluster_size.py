"""How many servers ``wanted_replicas`` assumes: what the cluster announced or what we were
given, whichever is larger (an announcement right after start-up can miss a node)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any
from urllib.parse import urlparse

import pytest

from msstore.kv import REPLICAS_ENV, cluster_size, wanted_replicas


@pytest.fixture(autouse=True)
def no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REPLICAS_ENV, raising=False)


def js(info: dict[str, Any], given: list[str], discovered: tuple[str, ...] = ()) -> Any:
    pool = [SimpleNamespace(uri=urlparse(f"nats://{u}"), discovered=False) for u in given]
    pool += [SimpleNamespace(uri=urlparse(f"nats://{u}"), discovered=True) for u in discovered]
    return SimpleNamespace(_nc=SimpleNamespace(_server_info=info, _server_pool=pool))


def test_a_server_without_a_cluster_is_one() -> None:
    assert cluster_size(js({"connect_urls": ["a:1", "b:2"]}, ["a:1", "b:2", "c:3"])) == 1


def test_an_announcement_short_by_a_node_is_made_up_by_the_urls_given() -> None:
    three = ["127.0.0.1:4222", "127.0.0.1:4223", "127.0.0.1:4224"]
    short = js({"cluster": "c", "connect_urls": three[:2]}, three)
    assert cluster_size(short) == 3 and wanted_replicas(short) == 3


def test_one_seed_url_counts_what_the_cluster_announces_not_what_it_discovered_twice() -> None:
    three = ["127.0.0.1:4222", "127.0.0.1:4223", "127.0.0.1:4224"]
    seeded = js({"cluster": "c", "connect_urls": three[:2]}, ["localhost:4222"], tuple(three[1:]))
    assert cluster_size(seeded) == 2  # the discovered URLs repeat the announcement
    assert wanted_replicas(js({"cluster": "c", "connect_urls": [*three, "127.0.0.1:4225"]},
                              ["localhost:4222"])) == 3  # never more than three

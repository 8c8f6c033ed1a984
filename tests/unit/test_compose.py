"""docker-compose.yml and .env.example agree: services, healthchecks, ports and credentials.

Docker need not be installed: the files are parsed, not run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"


def parse_env(text: str) -> dict[str, str]:
    """``KEY=value`` lines; blank lines and ``#`` comments ignored, optional quotes stripped."""
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):]
        key, sep, value = line.partition("=")
        assert sep, f".env.example: line without '=': {raw!r}"
        env[key.strip()] = value.strip().strip("'\"")
    return env


def published_ports(service: dict[str, Any]) -> dict[int, int]:
    """Container port -> host port, from short ("[ip:]host:container") or long syntax."""
    result: dict[int, int] = {}
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            result[int(entry["target"])] = int(entry["published"])
            continue
        parts = str(entry).split("/")[0].split(":")
        assert len(parts) >= 2, f"port {entry!r} is not published on the host"
        result[int(parts[-1])] = int(parts[-2])
    return result


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, from the mapping or the ``KEY=value`` list syntax."""
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(str(item).split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def command_args(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(a) for a in command]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return parse_env(ENV_EXAMPLE.read_text())


def test_both_services_exist(services: dict[str, Any]) -> None:
    assert {"postgres", "nats"} <= set(services)


@pytest.mark.parametrize("name", ["postgres", "nats"])
def test_each_service_has_a_healthcheck(services: dict[str, Any], name: str) -> None:
    test = services[name]["healthcheck"]["test"]
    assert test, f"{name}: empty healthcheck"
    text = " ".join(test) if isinstance(test, list) else str(test)
    expected = "pg_isready" if name == "postgres" else "/healthz"
    assert expected in text


def test_postgres_is_pgvector_on_pg15(services: dict[str, Any]) -> None:
    image = services["postgres"]["image"]
    repository, _, tag = image.partition(":")
    assert repository == "pgvector/pgvector"
    assert tag.startswith("pg15")


def test_nats_enables_jetstream_with_a_store_and_monitoring(services: dict[str, Any]) -> None:
    nats = services["nats"]
    assert nats["image"].startswith("nats:")
    args = command_args(nats)
    assert "-js" in args or "--jetstream" in args
    assert args[args.index("-sd") + 1] == "/data"
    assert args[args.index("-m") + 1] == "8222"
    # the store directory survives container re-creation
    assert any(str(v).endswith(":/data") for v in nats["volumes"])


def test_both_services_use_named_volumes(compose: dict[str, Any],
                                         services: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name in ("postgres", "nats"):
        sources = {str(v).split(":")[0] for v in services[name]["volumes"]}
        assert sources & declared, f"{name}: no named volume among {sources}"


def test_env_example_names_the_owner_the_application_role_and_nats(env: dict[str, str]) -> None:
    assert env["MSSTORE_MIGRATION_URL"] == "postgresql://msstore:msstore@127.0.0.1:5432/msstore"
    assert env["MSSTORE_DATABASE_URL"] == \
        "postgresql://msstore_app:msstore-app@127.0.0.1:5432/msstore"
    assert env["MSSTORE_NATS_URL"] == "nats://msstore:msstore@127.0.0.1:4222"


def test_the_application_role_is_msstores_on_the_owners_database(env: dict[str, str]) -> None:
    app, owner = urlsplit(env["MSSTORE_DATABASE_URL"]), urlsplit(env["MSSTORE_MIGRATION_URL"])
    assert app.username == "msstore_app" != owner.username  # the role migrate() grants
    assert (app.hostname, app.port, app.path) == (owner.hostname, owner.port, owner.path)


def test_every_port_is_published_on_loopback_only(services: dict[str, Any]) -> None:
    for name in ("postgres", "nats"):
        for entry in services[name]["ports"]:
            assert str(entry).startswith("127.0.0.1:"), (name, entry)


def test_nats_wants_the_user_and_password_of_the_nats_url(services: dict[str, Any],
                                                          env: dict[str, str]) -> None:
    args = command_args(services["nats"])
    url = urlsplit(env["MSSTORE_NATS_URL"])
    assert (args[args.index("--user") + 1], args[args.index("--pass") + 1]) == (
        url.username, url.password)


def test_postgres_port_matches_database_url(services: dict[str, Any],
                                            env: dict[str, str]) -> None:
    url = urlsplit(env["MSSTORE_DATABASE_URL"])
    assert url.port == 5432
    assert published_ports(services["postgres"])[5432] == url.port


def test_nats_port_matches_nats_url(services: dict[str, Any], env: dict[str, str]) -> None:
    url = urlsplit(env["MSSTORE_NATS_URL"])
    assert url.port == 4222
    assert published_ports(services["nats"])[4222] == url.port


def test_postgres_credentials_match_the_owners_url(services: dict[str, Any],
                                                   env: dict[str, str]) -> None:
    url = urlsplit(env["MSSTORE_MIGRATION_URL"])
    pg_env = environment(services["postgres"])
    assert (pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"], pg_env["POSTGRES_DB"]) == (
        url.username, url.password, url.path.lstrip("/"))
    assert url.username == "msstore"


def test_parsers_read_the_other_syntaxes() -> None:
    """The helpers above must not pass by accident: check them on the alternative forms."""
    assert published_ports({"ports": ["127.0.0.1:15432:5432/tcp"]}) == {5432: 15432}
    assert published_ports({"ports": [{"target": 4222, "published": "14222"}]}) == {4222: 14222}
    assert environment({"environment": ["POSTGRES_USER=a", "POSTGRES_DB=b=c"]}) == {
        "POSTGRES_USER": "a", "POSTGRES_DB": "b=c"}
    assert parse_env("# c\n\nexport A='x'\nB=y\n") == {"A": "x", "B": "y"}
    assert command_args({"command": "-js -sd /data"}) == ["-js", "-sd", "/data"]

"""The entity of :mod:`msstore.repository`: an :class:`Agent` as ``agents.registry`` knows it."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

from ._check import agent_uuid
from .codec import dumps, loads
from .errors import InvalidValueError, NotSerializableError

MAX_TYPE_LEN: Final = 100  # agents.registry.agent_type VARCHAR(100)
MAX_STATUS_LEN: Final = 20  # agents.registry.status VARCHAR(20)


def _check_text(name: str, value: object, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidValueError(f"Agent.{name} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise InvalidValueError(f"Agent.{name} must not be empty; give e.g. "
                                f"{'researcher' if name == 'type' else 'idle'!r}")
    if len(value) > limit:
        raise InvalidValueError(
            f"Agent.{name} is {len(value)} characters, above the limit of {limit} "
            f"(agents.registry column); shorten it: {value[:30]!r}…")
    return value


@dataclass(frozen=True, slots=True)
class Agent:
    """An agent as the registry knows it; validated on construction, immutable.

    ``metadata`` is normalised through JSON on construction (``{1: (2,)}`` becomes
    ``{"1": [2]}``), so what ``find`` returns compares equal to what was saved. ``version`` is
    the KV revision of the last write (0: never saved); repositories set it, callers pass it
    back to :meth:`AgentRepository.update`.
    """

    id: uuid.UUID
    type: str
    status: str = "idle"
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)
    version: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", agent_uuid(self.id))
        _check_text("type", self.type, MAX_TYPE_LEN)
        _check_text("status", self.status, MAX_STATUS_LEN)
        if not isinstance(self.metadata, dict):
            raise InvalidValueError(
                f"Agent.metadata must be a dict, got {type(self.metadata).__name__}; "
                "wrap the value, e.g. {'value': ...}")
        try:
            data = dumps(self.metadata)
        except NotSerializableError as e:
            raise NotSerializableError(f"Agent.metadata cannot be stored: {e}") from e
        object.__setattr__(self, "metadata", loads(data))
        if isinstance(self.version, bool) or not isinstance(self.version, int) \
                or self.version < 0:
            raise InvalidValueError(
                f"Agent.version must be an int >= 0 (0 = never saved), got {self.version!r}")

    def to_dict(self) -> dict[str, Any]:
        """The stored form (without ``version``: that is the KV revision, not part of the value)."""
        return {"id": str(self.id), "type": self.type, "status": self.status,
                "metadata": self.metadata}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, version: int) -> Agent:
        """Invert :meth:`to_dict`; re-validates, so a corrupted value raises a typed error."""
        if not isinstance(data, dict):
            raise InvalidValueError(f"an Agent is stored as a JSON object, got {data!r:.80}")
        return cls(id=data.get("id"), type=data.get("type"),  # type: ignore[arg-type]
                   status=data.get("status"), metadata=data.get("metadata"),  # type: ignore[arg-type]
                   version=version)

    @classmethod
    def _trusted(cls, id: uuid.UUID, type: str, status: str, metadata: dict[str, Any],
                 version: int) -> Agent:
        """Build from data msstore wrote itself (KV hit, SQL row): skips re-validation."""
        agent = object.__new__(cls)
        for name, value in (("id", id), ("type", type), ("status", status),
                            ("metadata", metadata), ("version", version)):
            object.__setattr__(agent, name, value)
        return agent

    @classmethod
    def _stored(cls, id: uuid.UUID, data: bytes | None, version: int) -> Agent:
        """Decode the codec bytes of :meth:`to_dict` that msstore wrote itself."""
        d = loads(data or b"null")
        return cls._trusted(id, d["type"], d["status"], d["metadata"], version)

    def replace(self, **changes: Any) -> Agent:
        """A copy with ``changes`` applied (validated again); keeps ``version`` for update()."""
        return dataclasses.replace(self, **changes)


def check_agent(agent: object) -> Agent:
    if not isinstance(agent, Agent):
        raise InvalidValueError(
            f"AgentRepository stores msstore.repository.Agent, got {type(agent).__name__}; "
            "build one with Agent(id, type, status, metadata)")
    return agent


__all__ = ["MAX_STATUS_LEN", "MAX_TYPE_LEN", "Agent", "check_agent"]

"""Notebook 12's plumbing: a deterministic LangGraph agent, what its checkpoints leave behind,
and a graph process to kill.

The agent has no model: ``plan`` writes a plan of ``steps`` items, ``work`` runs once per item
(a superstep each), ``summarise`` ends the run. Every node's output depends only on the
state, so two runs from the same input end in the same state — which is what makes "the
resumed run ends where the uninterrupted one does" a comparison of values.

The kill-and-resume section runs the crash test's graph process (``tests/langgraph_worker.py``,
through the test's own ``run_worker``, which also checks its exit code); the notebook puts the
repository root on ``sys.path`` before importing this module.
"""

from __future__ import annotations

import operator
import uuid
from typing import Annotated, Any, TypedDict

import pandas as pd
from langgraph.graph import END, START, StateGraph
from langgraph.store.base import BaseStore

import msstore
from msstore.integrations.langgraph import MsstoreSaver
from msstore.integrations.langgraph._layout import thread_agent
from msstore.integrations.langgraph._scan import scan
from tests.integration.test_langgraph_saver import run_worker

KINDS = {"cp": "checkpoints", "bl": "channel values", "wr": "pending writes"}


class Agent(TypedDict):
    task: str
    steps: int
    plan: list[str]
    done: Annotated[list[str], operator.add]  # each work step appends one item
    summary: str


def plan(state: Agent) -> dict[str, Any]:
    return {"plan": [f"{state['task']}: part {i + 1}" for i in range(state["steps"])]}


def work(state: Agent) -> dict[str, Any]:
    item = state["plan"][len(state["done"])]
    return {"done": [item.upper()]}


def more(state: Agent) -> str:
    return "work" if len(state["done"]) < len(state["plan"]) else "summarise"


def summarise(state: Agent) -> dict[str, Any]:
    return {"summary": f"{len(state['done'])} parts of {state['task']!r} done"}


def build() -> StateGraph[Agent]:
    """plan → work (once per planned item) → summarise."""
    builder = StateGraph(Agent)
    builder.add_node("plan", plan)
    builder.add_node("work", work)
    builder.add_node("summarise", summarise)
    builder.add_edge(START, "plan")
    builder.add_edge("plan", "work")
    builder.add_conditional_edges("work", more)
    builder.add_edge("summarise", END)
    return builder


def config(thread_id: str, checkpoint_id: str | None = None) -> Any:
    conf: dict[str, Any] = {"thread_id": thread_id}
    if checkpoint_id is not None:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf, "recursion_limit": 200}


async def history(graph: Any, thread_id: str) -> pd.DataFrame:
    """The thread's checkpoints, oldest first: step, the node whose output it holds, what is next.

    LangGraph's metadata names no node, so ``wrote`` is what the parent checkpoint had next.
    """
    rows = []
    async for snap in graph.aget_state_history(config(thread_id)):
        rows.append({"step": snap.metadata["step"], "source": snap.metadata["source"],
                     "next": ", ".join(snap.next), "done": len(snap.values.get("done", [])),
                     "checkpoint_id": snap.config["configurable"]["checkpoint_id"],
                     "parent": (snap.parent_config or {}).get("configurable", {})
                     .get("checkpoint_id")})
    frame = pd.DataFrame(rows[::-1])
    nexts = dict(zip(frame["checkpoint_id"], frame["next"], strict=True))
    frame.insert(2, "wrote", [nexts.get(p, "") for p in frame["parent"]])
    return frame


async def kv_keys(saver: MsstoreSaver, thread_id: str) -> pd.Series:
    """The thread's live keys by kind, as a listing sees them (KV, then PostgreSQL)."""
    found = await scan(saver.hsm, thread_agent(saver.bucket, thread_id), "")
    kinds = pd.Series([KINDS[key.split(".", 1)[0]] for _, key in found], dtype="object")
    return kinds.value_counts().reindex(list(KINDS.values()), fill_value=0)


async def pg_rows(ms: msstore.Connection, saver: MsstoreSaver, thread_id: str) -> pd.Series:
    """The thread's rows in ``agents.state`` by kind."""
    rows = await ms.pool.fetch(
        "SELECT split_part(key, '.', 1) AS kind, count(*) AS n FROM agents.state "
        "WHERE agent_id = $1 GROUP BY 1", thread_agent(saver.bucket, thread_id))
    counts = {KINDS[r["kind"]]: r["n"] for r in rows}
    return pd.Series({kind: counts.get(kind, 0) for kind in KINDS.values()})


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"




class Asked(TypedDict):
    question: str
    recalled: list[str]


def build_recall(namespace: tuple[str, ...]) -> StateGraph[Asked]:
    """One node that looks the question up in long-term memory (the graph's ``store``)."""

    async def recall(state: Asked, *, store: BaseStore) -> dict[str, Any]:
        hits = await store.asearch(namespace, query=state["question"], limit=2)
        return {"recalled": [hit.value["text"] for hit in hits]}

    builder = StateGraph(Asked)
    builder.add_node("recall", recall)
    builder.add_edge(START, "recall")
    builder.add_edge("recall", END)
    return builder


__all__ = ["Agent", "Asked", "build", "build_recall", "config", "history", "kv_keys",
           "pg_rows", "run_worker", "unique"]

"""A LangGraph graph checkpointed by MsstoreSaver, for the crash test to kill -9 and resume.

``python tests/langgraph_worker.py DATABASE_URL NATS_URL BUCKET THREAD_ID STEPS [--resume]``

The graph is deterministic (no model, no clock, no randomness): one node that runs ``STEPS``
supersteps, each adding ``n`` and a value derived from it to the state, pausing
``--pause`` seconds so a kill lands mid-run. It prints ``step <n>`` (line-buffered) after
each superstep's update and ``final <json>`` at the end. ``--resume`` continues the thread
from its last acknowledged checkpoint (``ainvoke(None)``) instead of starting it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import operator
import sys
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph

import msstore
from msstore.integrations.langgraph import MsstoreSaver


class State(TypedDict):
    n: int
    steps: int
    trail: Annotated[list[int], operator.add]


def build(pause: float) -> StateGraph[State]:
    """One counting node in a loop: the final state depends only on ``steps``."""

    async def step(state: State) -> dict[str, Any]:
        await asyncio.sleep(pause)
        n = state["n"] + 1
        return {"n": n, "trail": [(n * n * 31 + 7) % 101]}

    def more(state: State) -> str:
        return "step" if state["n"] < state["steps"] else END

    builder = StateGraph(State)
    builder.add_node("step", step)
    builder.add_edge(START, "step")
    builder.add_conditional_edges("step", more)
    return builder


async def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bucket")
    p.add_argument("thread_id")
    p.add_argument("steps", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--pause", type=float, default=0.02)
    a = p.parse_args(argv)
    config: Any = {"configurable": {"thread_id": a.thread_id}, "recursion_limit": a.steps + 10}
    # the URLs (with passwords) come in the environment (services.child_env)
    async with msstore.connect(migrate=False) as ms:
        async with MsstoreSaver(ms, bucket=a.bucket) as saver:
            graph = build(a.pause).compile(checkpointer=saver)
            inputs = None if a.resume else {"n": 0, "steps": a.steps, "trail": []}
            async for update in graph.astream(inputs, config, stream_mode="updates"):
                print(f"step {update['step']['n']}", flush=True)
            final = (await graph.aget_state(config)).values
            print(f"final {json.dumps(final, sort_keys=True)}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))

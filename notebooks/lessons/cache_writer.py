"""Notebook 06's second process: saves one agent through its own tiered cache, in lockstep.

Run as ``python lessons/cache_writer.py`` from ``notebooks/`` with ``NB06_AGENT`` (the agent
id), ``NB06_AGENTS`` (the repository's bucket) and ``NB06_CACHE`` (the cache's bucket) set, and
the servers in ``MSSTORE_DATABASE_URL`` / ``MSSTORE_NATS_URL``. It prints ``{"ready": true}``,
then for every number *i* read from stdin saves the agent with ``metadata={"i": i}`` and prints
the KV revision of that write, so the notebook can wait for exactly that revision.
"""

import asyncio
import json
import os
import sys
import uuid

import msstore
from msstore.cache import TieredCacheRepository
from msstore.repository import Agent, AgentRepository


async def main() -> None:
    agent_id = uuid.UUID(os.environ["NB06_AGENT"])
    async with msstore.connect(migrate=False) as ms, \
            AgentRepository(ms, bucket=os.environ["NB06_AGENTS"]) as repo, \
            TieredCacheRepository(ms, repo, bucket=os.environ["NB06_CACHE"],
                                  entity_type=Agent) as cache:
        print(json.dumps({"ready": True}), flush=True)
        for line in iter(sys.stdin.readline, ""):
            i = int(line)
            agent = await cache.find(agent_id)
            await cache.save(agent.replace(metadata={"i": i}))
            print(json.dumps({"i": i, "revision": cache.peek_entry(agent_id).revision}),
                  flush=True)


if __name__ == "__main__":
    asyncio.run(main())

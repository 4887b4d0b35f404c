"""Identity metrics: cosine similarity to the paired source and top-1 / top-5 retrieval among all sources.

Retrieval follows REFace's script: the gallery is every distinct source of the pair list (1,000 on FFHQ), ranked by
dot product of unit embeddings. A missing swap or a swap without a detectable face is a failure, never a skipped
pair: a retrieval miss and an ID similarity of 0 (an unrelated face), so both means count it the same way.
Retrieval is reported in % of pairs (per pair 0 or 100), in the JSON as everywhere else.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from appleswap.eval.pairs import Pair

FAILED_SIMILARITY = 0.0  # the ID similarity of a failed swap (missing, or no face in it): that of an unrelated face
PERCENT = 100.0


def retrieval_hits(queries: np.ndarray, gallery: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """(N,) 1.0 where the true gallery index is among the k highest dot products; NaN queries never hit."""
    scores = np.nan_to_num(queries @ gallery.T, nan=-np.inf)
    k = min(k, gallery.shape[0])
    top = np.argpartition(-scores, kth=k - 1, axis=1)[:, :k]
    hits = (top == truth[:, None]).any(axis=1).astype(np.float64)
    hits[~np.isfinite(queries).all(axis=1)] = 0.0
    return hits


def identity_scores(name: str, pairs: list[Pair], lookup: Callable) -> dict[str, np.ndarray]:
    """Per-pair ``id_sim/<name>``, ``id_top1/<name>``, ``id_top5/<name>`` arrays (top-k as 0/1)."""
    sources = list(dict.fromkeys(p.source for p in pairs))
    index = {path: i for i, path in enumerate(sources)}
    gallery = np.stack([lookup(path)["embedding"] for path in sources]).astype(np.float64)
    dim = gallery.shape[1]
    queries = np.stack([lookup(None, p)["embedding"] if p.swap is not None else np.full(dim, np.nan)
                        for p in pairs]).astype(np.float64)
    truth = np.array([index[p.source] for p in pairs])
    unit_g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    unit_q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    similarity = (unit_q * unit_g[truth]).sum(axis=1)
    similarity[~np.isfinite(similarity)] = FAILED_SIMILARITY
    return {f"id_sim/{name}": similarity, f"id_top1/{name}": PERCENT * retrieval_hits(queries, gallery, truth, 1),
            f"id_top5/{name}": PERCENT * retrieval_hits(queries, gallery, truth, 5)}


def failed_queries(pairs: list[Pair], lookup: Callable) -> int:
    """How many pairs count as identity failures (no swap, or no face found in it)."""
    return sum(p.swap is None or not np.isfinite(lookup(None, p)["embedding"]).all() for p in pairs)

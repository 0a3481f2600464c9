"""Which neurons to keep: the data-free selection criteria of structured pruning.

A layer with ``n`` neurons is given as a matrix ``v`` of shape (n, d): row i is neuron i's
vector (its incoming weights, flattened, optionally followed by its bias). A criterion scores
every row and keeps the ``k`` rows with the largest score:

* ``"l1-norm"``: score_i = ||v_i||_1 (Li et al., ICLR 2017).
* ``"l2-norm"``: score_i = ||v_i||_2.
* ``"l2-GM"``: score_i = sum_j ||v_i - v_j||_2, the summed Euclidean distance to every other
  neuron. The neurons with the smallest sums lie nearest the geometric median of the layer and
  are deemed the most replaceable (He et al., CVPR 2019, "FPGM"), so they are removed.

Ties are broken towards the higher index, as the Neuron Merging reference code does (it
reverses an ascending sort). All functions are pure NumPy and vectorized over neurons.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import distance

CRITERIA = ("l1-norm", "l2-norm", "l2-GM")
"""Names accepted by :func:`scores` and :func:`select`."""


def scores(vectors: np.ndarray, criterion: str) -> np.ndarray:
    """Importance score of each neuron; larger means keep.

    Args:
        vectors: array (n, d), one neuron per row.
        criterion: str, one of :data:`CRITERIA`.

    Returns:
        float64 array (n,).
    """
    if criterion not in CRITERIA:
        raise ValueError(
            f"`criterion` must be one of {CRITERIA}. Received: criterion={criterion!r}"
        )
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"`vectors` must have shape (n, d). Received: shape={v.shape}")
    if criterion == "l1-norm":
        return np.abs(v).sum(axis=1)
    if criterion == "l2-norm":
        return np.sqrt(np.square(v).sum(axis=1))
    if len(v) == 0:
        return np.zeros(0)
    # (n, n) Euclidean distances; the diagonal is 0 so it does not change the sums.
    return distance.cdist(v, v, "euclidean").sum(axis=0)


def select(vectors: np.ndarray, keep: int, criterion: str) -> np.ndarray:
    """Indices of the ``keep`` neurons with the largest :func:`scores`, in ascending order.

    Args:
        vectors: array (n, d), one neuron per row.
        keep: int, number of neurons to keep, 0 <= keep <= n.
        criterion: str, one of :data:`CRITERIA`.

    Returns:
        int64 array (keep,), sorted ascending.
    """
    n = int(np.shape(vectors)[0])
    if not 0 <= keep <= n:
        raise ValueError(f"`keep` must be in [0, {n}]. Received: keep={keep}")
    s = scores(vectors, criterion)
    # Stable ascending sort reversed: descending score, equal scores -> higher index first.
    order = np.argsort(s, kind="stable")[::-1]
    return np.sort(order[:keep]).astype(np.int64)

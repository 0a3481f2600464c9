"""Choosing which neurons to tie: k disjoint pairs of a cost matrix.

Both matchers take a cost matrix C (n_a, n_b) and a count k <= min(n_a, n_b), and return
``(rows, cols)``, two int arrays of length k, ordered by ascending pair cost: pair r ties
neuron ``rows[r]`` of A to neuron ``cols[r]`` of B, and becomes shared neuron r.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize

METHODS = ("greedy", "optimal")


def _validate(cost, k: int) -> np.ndarray:
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"`cost` must be a 2-D matrix. Received shape {cost.shape}.")
    if not np.all(np.isfinite(cost)):
        raise ValueError("`cost` holds NaN or infinite entries.")
    if not 0 <= k <= min(cost.shape):
        raise ValueError(
            f"`k` must be in [0, {min(cost.shape)}] for a cost matrix of shape {cost.shape}. "
            f"Received: k={k}"
        )
    return cost


def _sorted_by_cost(cost: np.ndarray, rows: np.ndarray, cols: np.ndarray):
    order = np.lexsort((cols, rows, cost[rows, cols]))
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


def greedy(cost, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's greedy matching: scan pairs by ascending cost, keep disjoint ones, stop at k.

    Implemented without a scan over pairs: with ties broken by flat index (a strict order),
    the greedy matching equals the *locally dominant* one, built in rounds that accept every
    pair that is the cheapest of both its row and its column among unused rows and columns.
    Each round is vectorized; the greedy acceptance order is ascending cost, so its first k
    pairs are the k cheapest pairs of the full matching.
    """
    cost = _validate(cost, k)
    n_a, n_b = cost.shape
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # Rank of every entry in (cost, flat index) order: a strict total order, no ties.
    rank = np.empty(cost.size, dtype=np.int64)
    rank[np.argsort(cost, axis=None, kind="stable")] = np.arange(cost.size)
    rank = rank.reshape(n_a, n_b)
    big = np.iinfo(np.int64).max
    row_free, col_free = np.ones(n_a, bool), np.ones(n_b, bool)
    rows, cols = [], []
    while row_free.any() and col_free.any():
        masked = np.where(row_free[:, None] & col_free[None, :], rank, big)
        best_col = masked.argmin(axis=1)  # cheapest free column of each row
        best_row = masked.argmin(axis=0)  # cheapest free row of each column
        r = np.flatnonzero(row_free & (best_row[best_col] == np.arange(n_a)))
        c = best_col[r]
        rows.append(r)
        cols.append(c)
        row_free[r] = False
        col_free[c] = False
    rows, cols = _sorted_by_cost(cost, np.concatenate(rows), np.concatenate(cols))
    return rows[:k], cols[:k]


def optimal(cost, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact minimum-cost matching of exactly k disjoint pairs.

    Reduced to a square assignment problem of size n_a + n_b − k: n_b − k dummy rows and
    n_a − k dummy columns absorb the unmatched real columns and rows at zero cost, and a
    dummy may not be matched to a dummy, so exactly k real pairs remain, at least total cost.
    """
    cost = _validate(cost, k)
    n_a, n_b = cost.shape
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    size = n_a + n_b - k
    forbidden = 1.0 + 2.0 * size * (np.abs(cost).max() + 1.0)
    square = np.zeros((size, size))
    square[:n_a, :n_b] = cost
    square[n_a:, n_b:] = forbidden
    rows, cols = scipy.optimize.linear_sum_assignment(square)
    real = (rows < n_a) & (cols < n_b)
    return _sorted_by_cost(cost, rows[real], cols[real])


def match(cost, k: int, method: str = "greedy") -> tuple[np.ndarray, np.ndarray]:
    """Dispatches to :func:`greedy` or :func:`optimal` by name."""
    if method == "greedy":
        return greedy(cost, k)
    if method == "optimal":
        return optimal(cost, k)
    raise ValueError(f"`matching` must be one of {METHODS}. Received: matching={method!r}")

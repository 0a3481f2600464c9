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
    ``argmin`` returns the first minimum, so on the matrix restricted to the unused rows and
    columns (kept in ascending index order) it breaks ties by flat index without ranking the
    entries. Each round is vectorized and works on the shrinking unused submatrix. The greedy
    acceptance order is ascending cost, so its first k pairs are the k cheapest of the full
    matching; once k accepted pairs are all cheaper than every unused entry, no later pair
    can enter them and the rounds stop.
    """
    cost = _validate(cost, k)
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows_left, cols_left = np.arange(cost.shape[0]), np.arange(cost.shape[1])
    sub = cost
    rows, cols = np.zeros(0, np.int64), np.zeros(0, np.int64)
    while rows_left.size and cols_left.size:
        if rows.size >= k:
            # The k-th cheapest accepted pair in (cost, flat index) order, against the
            # cheapest unused entry: a later pair costs at least that much, and at equal
            # cost its flat index decides.
            kept = _sorted_by_cost(cost, rows, cols)
            last = (
                cost[kept[0][k - 1], kept[1][k - 1]],
                kept[0][k - 1] * cost.shape[1] + kept[1][k - 1],
            )
            flat = sub.argmin()
            first = (
                sub.flat[flat],
                rows_left[flat // sub.shape[1]] * cost.shape[1] + cols_left[flat % sub.shape[1]],
            )
            if last < first:
                break
        best_col = sub.argmin(axis=1)  # cheapest unused column of each unused row
        best_row = sub.argmin(axis=0)  # cheapest unused row of each unused column
        mutual = np.flatnonzero(best_row[best_col] == np.arange(rows_left.size))
        rows = np.concatenate([rows, rows_left[mutual]])
        cols = np.concatenate([cols, cols_left[best_col[mutual]]])
        row_kept = np.ones(rows_left.size, bool)
        row_kept[mutual] = False
        col_kept = np.ones(cols_left.size, bool)
        col_kept[best_col[mutual]] = False
        sub = sub[row_kept][:, col_kept]
        rows_left, cols_left = rows_left[row_kept], cols_left[col_kept]
    rows, cols = _sorted_by_cost(cost, rows, cols)
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


def match(cost, k: int, method: str = "optimal") -> tuple[np.ndarray, np.ndarray]:
    """Dispatches to :func:`greedy` or :func:`optimal` by name."""
    if method == "greedy":
        return greedy(cost, k)
    if method == "optimal":
        return optimal(cost, k)
    raise ValueError(f"`matching` must be one of {METHODS}. Received: matching={method!r}")

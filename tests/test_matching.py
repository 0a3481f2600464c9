"""Matchers against brute force."""

import itertools

import numpy as np
import pytest

from mtz_tf import matching


def brute_force_greedy(cost, k):
    pairs = sorted(
        (cost[i, j], i * cost.shape[1] + j, i, j)
        for i in range(cost.shape[0])
        for j in range(cost.shape[1])
    )
    used_rows, used_cols, rows, cols = set(), set(), [], []
    for _, _, i, j in pairs:
        if len(rows) == k:
            break
        if i not in used_rows and j not in used_cols:
            used_rows.add(i)
            used_cols.add(j)
            rows.append(i)
            cols.append(j)
    return rows, cols


@pytest.mark.parametrize("seed", range(20))
def test_greedy_equals_sequential_scan(seed):
    rng = np.random.default_rng(seed)
    n_a, n_b = rng.integers(1, 12, size=2)
    # Few distinct values, so ties are common and the tie-break is exercised.
    cost = rng.integers(0, 6, size=(n_a, n_b)).astype(float)
    k = int(rng.integers(0, min(n_a, n_b) + 1))
    rows, cols = matching.greedy(cost, k)
    expected_rows, expected_cols = brute_force_greedy(cost, k)
    assert rows.tolist() == expected_rows
    assert cols.tolist() == expected_cols


@pytest.mark.parametrize("seed", range(6))
def test_greedy_stopping_early_keeps_the_scan_order(seed):
    # Few of many pairs (k small), so the rounds stop before the matching is complete.
    rng = np.random.default_rng(50 + seed)
    n_a, n_b = rng.integers(20, 40, size=2)
    cost = rng.integers(0, 30, size=(n_a, n_b)).astype(float)
    k = int(rng.integers(1, 6))
    rows, cols = matching.greedy(cost, k)
    assert (rows.tolist(), cols.tolist()) == brute_force_greedy(cost, k)


def brute_force_optimal_cost(cost, k):
    n_a, n_b = cost.shape
    best = np.inf
    for rows in itertools.combinations(range(n_a), k):
        for cols in itertools.permutations(range(n_b), k):
            best = min(best, cost[list(rows), list(cols)].sum())
    return best if k else 0.0


@pytest.mark.parametrize("seed", range(12))
def test_optimal_is_minimal(seed):
    rng = np.random.default_rng(100 + seed)
    n_a, n_b = rng.integers(1, 5, size=2)
    cost = rng.normal(size=(n_a, n_b)) ** 2
    k = int(rng.integers(0, min(n_a, n_b) + 1))
    rows, cols = matching.optimal(cost, k)
    assert len(rows) == k and len(set(rows)) == k and len(set(cols)) == k
    np.testing.assert_allclose(cost[rows, cols].sum(), brute_force_optimal_cost(cost, k))
    assert np.all(np.diff(cost[rows, cols]) >= 0), "pairs must come in ascending cost"
    greedy_rows, greedy_cols = matching.greedy(cost, k)
    assert cost[rows, cols].sum() <= cost[greedy_rows, greedy_cols].sum() + 1e-12


def test_greedy_scales_to_a_large_matrix():
    rng = np.random.default_rng(7)
    cost = rng.random((500, 400))
    rows, cols = matching.greedy(cost, 400)
    assert len(set(rows)) == 400 and len(set(cols)) == 400
    assert cost[rows[0], cols[0]] == cost.min()


def test_errors():
    with pytest.raises(ValueError, match="must be in"):
        matching.greedy(np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="NaN"):
        matching.optimal(np.array([[np.nan]]), 1)
    with pytest.raises(ValueError, match="2-D"):
        matching.greedy(np.zeros(3), 1)
    with pytest.raises(ValueError, match="must be one of"):
        matching.match(np.zeros((2, 2)), 1, "hungarian")

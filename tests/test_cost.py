"""Closed forms of mtz_tf.cost against independent computations."""

import numpy as np
import pytest

from mtz_tf import cost


def random_spd(rng, d, rank=None):
    g = rng.normal(size=(d, rank or 2 * d))
    return g @ g.T / g.shape[1]


def kkt_tie(w_a, w_b, h_a, h_b):
    """argmin over (δ_a, δ_b) of ½δ_aᵀH_Aδ_a + ½δ_bᵀH_Bδ_b s.t. w_a+δ_a = w_b+δ_b, by KKT."""
    d = len(w_a)
    eye = np.eye(d)
    zero = np.zeros((d, d))
    # Unknowns [δ_a, δ_b, ν]: H_A δ_a + ν = 0, H_B δ_b − ν = 0, δ_a − δ_b = w_b − w_a.
    system = np.block([[h_a, zero, eye], [zero, h_b, -eye], [eye, -eye, zero]])
    rhs = np.concatenate([np.zeros(d), np.zeros(d), w_b - w_a])
    solution = np.linalg.solve(system, rhs)
    d_a, d_b = solution[:d], solution[d : 2 * d]
    return w_a + d_a, 0.5 * d_a @ h_a @ d_a + 0.5 * d_b @ h_b @ d_b


def test_pair_merge_equals_kkt_constrained_minimum():
    rng = np.random.default_rng(0)
    d = 6
    h_a, h_b = random_spd(rng, d), random_spd(rng, d)
    w_a, w_b = rng.normal(size=(d, 1)), rng.normal(size=(d, 1))
    merged = cost.merged_weights([w_a, w_b], [h_a, h_b], damping=0.0).numpy()[:, 0]
    c = cost.merge_costs(w_a, w_b, h_a, h_b, damping=0.0).numpy()[0, 0]
    expected_w, expected_c = kkt_tie(w_a[:, 0], w_b[:, 0], h_a, h_b)
    np.testing.assert_allclose(merged, expected_w, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(c, expected_c, rtol=1e-9)


def test_cost_equals_paper_inverse_form():
    rng = np.random.default_rng(1)
    d = 5
    h_a, h_b = random_spd(rng, d), random_spd(rng, d)
    w_a, w_b = rng.normal(size=(d, 3)), rng.normal(size=(d, 4))
    c = cost.merge_costs(w_a, w_b, h_a, h_b, damping=0.0).numpy()
    m = np.linalg.inv(np.linalg.inv(h_a) + np.linalg.inv(h_b))
    for i in range(3):
        for j in range(4):
            diff = w_a[:, i] - w_b[:, j]
            np.testing.assert_allclose(c[i, j], 0.5 * diff @ m @ diff, rtol=1e-9)


@pytest.mark.parametrize("n_a,n_b", [(0, 3), (1, 1), (7, 5)])
def test_cost_matrix_equals_per_pair_loop_with_positions(n_a, n_b):
    rng = np.random.default_rng(2)
    d, positions = 4, 3
    h_a, h_b = random_spd(rng, d), random_spd(rng, d)
    w_a = rng.normal(size=(positions, d, n_a))
    w_b = rng.normal(size=(positions, d, n_b))
    c = cost.merge_costs(w_a, w_b, h_a, h_b, damping=0.0).numpy()
    assert c.shape == (n_a, n_b)
    m = h_a @ np.linalg.inv(h_a + h_b) @ h_b
    expected = np.zeros((n_a, n_b))
    for i in range(n_a):
        for j in range(n_b):
            for p in range(positions):
                diff = w_a[p, :, i] - w_b[p, :, j]
                expected[i, j] += 0.5 * diff @ m @ diff
    np.testing.assert_allclose(c, expected, rtol=1e-9, atol=1e-12)


def test_three_way_merge_minimises_total_cost():
    rng = np.random.default_rng(3)
    d = 5
    hs = [random_spd(rng, d) for _ in range(3)]
    ws = [rng.normal(size=(d, 2)) for _ in range(3)]
    merged = cost.merged_weights(ws, hs, damping=0.0).numpy()
    expected = np.linalg.solve(sum(hs), sum(h @ w for h, w in zip(hs, ws)))
    np.testing.assert_allclose(merged, expected, rtol=1e-9)
    total = cost.tie_costs(ws, hs, damping=0.0).numpy()
    # Stationarity: any perturbation of the merged vector raises the summed cost.
    for column in range(2):

        def objective(v, column=column):
            return sum(0.5 * (w[:, column] - v) @ h @ (w[:, column] - v) for w, h in zip(ws, hs))

        best = objective(merged[:, column])
        np.testing.assert_allclose(total[column], best, rtol=1e-9)
        for _ in range(5):
            assert objective(merged[:, column] + 1e-3 * rng.normal(size=d)) > best


def test_two_way_tie_cost_equals_pair_cost():
    rng = np.random.default_rng(4)
    d = 4
    h_a, h_b = random_spd(rng, d), random_spd(rng, d)
    w_a, w_b = rng.normal(size=(d, 3)), rng.normal(size=(d, 3))
    pair = np.diag(cost.merge_costs(w_a, w_b, h_a, h_b).numpy())
    tie = cost.tie_costs([w_a, w_b], [h_a, h_b]).numpy()
    np.testing.assert_allclose(tie, pair, rtol=1e-7)


def test_singular_hessians_give_finite_costs_and_average_on_dead_inputs():
    rng = np.random.default_rng(5)
    d = 6
    # Inputs 4 and 5 are dead (always zero) for both tasks: rank-deficient Hessians.
    x_a, x_b = rng.normal(size=(50, d)), rng.normal(size=(50, d))
    x_a[:, 4:] = 0
    x_b[:, 4:] = 0
    h_a, h_b = x_a.T @ x_a / 50, x_b.T @ x_b / 50
    w_a, w_b = rng.normal(size=(d, 3)), rng.normal(size=(d, 3))
    c = cost.merge_costs(w_a, w_b, h_a, h_b).numpy()
    merged = cost.merged_weights([w_a, w_b], [h_a, h_b]).numpy()
    assert np.all(np.isfinite(c)) and np.all(c >= 0)
    np.testing.assert_allclose(merged[4:], (w_a[4:] + w_b[4:]) / 2, rtol=1e-6)
    # Dead inputs do not contribute: the cost equals the one on the live block alone.
    live = cost.merge_costs(w_a[:4], w_b[:4], h_a[:4, :4], h_b[:4, :4], damping=0.0).numpy()
    np.testing.assert_allclose(c, live, rtol=1e-4, atol=1e-9)


def test_identical_neurons_cost_nothing():
    rng = np.random.default_rng(6)
    h = random_spd(rng, 4)
    w = rng.normal(size=(4, 3))
    c = cost.merge_costs(w, w, h, 2 * h).numpy()
    np.testing.assert_allclose(np.diag(c), 0.0, atol=1e-10)
    assert np.all(c[~np.eye(3, dtype=bool)] > 1e-6)


def test_shape_errors_are_named():
    with pytest.raises(ValueError, match="must have shape"):
        cost.merge_costs(np.ones((3, 2)), np.ones((4, 2)), np.eye(3), np.eye(3))
    with pytest.raises(ValueError, match="must be square"):
        cost.merge_costs(np.ones((3, 2)), np.ones((3, 2)), np.ones((3, 2)), np.eye(3))
    with pytest.raises(ValueError, match="non-negative"):
        cost.merge_costs(np.ones((3, 2)), np.ones((3, 2)), np.eye(3), np.eye(3), damping=-1)
    with pytest.raises(ValueError, match="as many weight matrices"):
        cost.merged_weights([np.ones((3, 2))], [np.eye(3), np.eye(3)])

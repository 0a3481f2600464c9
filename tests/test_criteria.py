"""Tests for mtz_tf.compress.criteria: hand-made layers and an explicit-loop reference."""

import numpy as np
import pytest

from mtz_tf.compress import criteria


def _loop_scores(v, criterion):
    """Obviously-correct per-neuron loops."""
    out = []
    for i in range(len(v)):
        if criterion == "l1-norm":
            out.append(sum(abs(t) for t in v[i]))
        elif criterion == "l2-norm":
            out.append(sum(t * t for t in v[i]) ** 0.5)
        else:
            out.append(sum(np.sqrt(np.sum((v[i] - v[j]) ** 2)) for j in range(len(v))))
    return np.array(out)


@pytest.mark.parametrize("criterion", criteria.CRITERIA)
@pytest.mark.parametrize("n", [0, 1, 7])
def test_scores_match_loops(criterion, n):
    v = np.random.default_rng(n).normal(size=(n, 5))
    np.testing.assert_allclose(criteria.scores(v, criterion), _loop_scores(v, criterion))


def test_l1_and_l2_disagree_on_hand_made_neurons():
    # l1: 3, 4, 1; l2: 3, 2.83, 0.71 -> l1 keeps neuron 1, l2 keeps neuron 0.
    v = np.array([[3.0, 0.0], [2.0, 2.0], [0.5, 0.5]])
    assert criteria.select(v, 1, "l1-norm").tolist() == [1]
    assert criteria.select(v, 1, "l2-norm").tolist() == [0]
    assert criteria.select(v, 2, "l1-norm").tolist() == [0, 1]


def test_l2_gm_removes_the_neurons_nearest_the_geometric_median():
    # Distance sums: 13, 11, 11, 27 -> the two middle points are removed, not the small one.
    v = np.array([[0.0], [1.0], [2.0], [10.0]])
    assert criteria.select(v, 2, "l2-GM").tolist() == [0, 3]
    # The norm criteria would keep the two largest instead.
    assert criteria.select(v, 2, "l1-norm").tolist() == [2, 3]


def test_ties_keep_the_higher_index():
    v = np.array([[1.0], [1.0], [1.0], [0.5]])
    assert criteria.select(v, 2, "l1-norm").tolist() == [1, 2]


def test_select_returns_sorted_distinct_indices():
    v = np.random.default_rng(0).normal(size=(50, 9))
    for criterion in criteria.CRITERIA:
        keep = criteria.select(v, 20, criterion)
        assert keep.dtype == np.int64
        assert np.all(np.diff(keep) > 0) and len(keep) == 20
        # Every kept score is at least every removed score.
        s = criteria.scores(v, criterion)
        removed = np.setdiff1d(np.arange(50), keep)
        assert s[keep].min() >= s[removed].max()


def test_bad_input():
    v = np.ones((3, 2))
    with pytest.raises(ValueError, match="`criterion` must be one of"):
        criteria.select(v, 1, "l3-norm")
    with pytest.raises(ValueError, match=r"`keep` must be in \[0, 3\]"):
        criteria.select(v, 4, "l1-norm")
    with pytest.raises(ValueError, match=r"must have shape \(n, d\)"):
        criteria.scores(np.ones(3), "l1-norm")

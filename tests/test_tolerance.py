"""The shared magnitude-scaled comparison that every float check in the suite uses."""

import numpy as np
import pytest
from conftest import assert_close


def test_rounding_on_large_logits_passes_and_real_errors_fail():
    logits = np.random.default_rng(0).normal(scale=10.0, size=(64, 10))
    assert_close(logits * (1 + 1e-6), logits)  # the 1.14e-5 seen on logits of order 10
    assert_close(logits + 1.14e-5, logits)
    with pytest.raises(AssertionError, match="differ by up to"):
        assert_close(logits + 1e-2, logits)
    with pytest.raises(AssertionError, match=r"allowed 0\.0001 x scale"):
        assert_close(logits * (1 + 1e-2), logits)


def test_small_values_get_an_absolute_floor():
    tiny = np.full(5, 1e-3)
    assert_close(tiny + 5e-5, tiny)
    with pytest.raises(AssertionError):
        assert_close(tiny + 5e-4, tiny)


def test_an_explicit_tolerance_for_float64_and_non_finite_values():
    values = np.linspace(-3.0, 3.0, 7)
    assert_close(values * (1 + 1e-12), values, tol=1e-9)
    with pytest.raises(AssertionError):
        assert_close(values * (1 + 1e-7), values, tol=1e-9)
    with pytest.raises(AssertionError):
        assert_close(np.where(values > 0, np.nan, values), values)


def test_dicts_of_task_outputs_are_compared_leaf_by_leaf():
    outputs = {"a": np.ones((2, 3)), "b": np.zeros((2, 3))}
    assert_close({"a": np.ones((2, 3)), "b": np.zeros((2, 3))}, outputs)
    with pytest.raises(AssertionError, match=r"\['b'\]"):
        assert_close({"a": np.ones((2, 3)), "b": np.ones((2, 3))}, outputs)
    with pytest.raises(AssertionError, match="keys"):
        assert_close({"a": np.ones((2, 3))}, outputs)
    with pytest.raises(AssertionError, match="expected a dict"):
        assert_close(np.ones((2, 3)), outputs)
    with pytest.raises(AssertionError, match="shape"):
        assert_close(np.ones((2, 3)), np.ones((3, 2)))


def test_lists_of_arrays_are_compared_item_by_item():
    weights = [np.ones((2, 2)), np.full(3, 20.0)]
    assert_close([w * (1 + 1e-6) for w in weights], weights)
    with pytest.raises(AssertionError, match=r"\[1\]"):
        assert_close([weights[0], weights[1] + 0.1], weights)
    with pytest.raises(AssertionError, match="items"):
        assert_close(weights[:1], weights)

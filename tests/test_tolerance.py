"""The shared magnitude-scaled comparison that every float check in the suite uses."""

import numpy as np
import pytest
from conftest import assert_close


def test_rounding_on_large_logits_passes_and_real_errors_fail():
    logits = np.random.default_rng(0).normal(scale=10.0, size=(64, 10))
    assert_close(logits * (1 + 1.2e-6), logits)  # the 1.14e-5 seen on logits of order 10
    with pytest.raises(AssertionError, match="differ by up to"):
        assert_close(logits + 1e-2, logits)


def test_small_values_get_an_absolute_floor():
    tiny = np.full(5, 1e-3)
    assert_close(tiny + 5e-5, tiny)
    with pytest.raises(AssertionError):
        assert_close(tiny + 5e-4, tiny)


def test_dicts_of_task_outputs_are_compared_leaf_by_leaf():
    outputs = {"a": np.ones((2, 3)), "b": np.zeros((2, 3))}
    assert_close({"a": np.ones((2, 3)), "b": np.zeros((2, 3))}, outputs)
    with pytest.raises(AssertionError, match=r"\['b'\]"):
        assert_close({"a": np.ones((2, 3)), "b": np.ones((2, 3))}, outputs)
    with pytest.raises(AssertionError, match="keys"):
        assert_close({"a": np.ones((2, 3))}, outputs)
    with pytest.raises(AssertionError, match="shape"):
        assert_close(np.ones((2, 3)), np.ones((3, 2)))

"""ZippedDense: shapes, weights, the formula, config and .keras round trips."""

import keras
import numpy as np
import pytest
from conftest import assert_close

from mtz_tf import ZippedDense


def make_layer(common=True, k=3):
    if common:
        return ZippedDense(
            ["a", "b"],
            units=[4, 5],
            shared_units=k,
            input_units=[6, 6],
            input_shared_units=6,
            common_input=True,
            activation="relu",
        )
    return ZippedDense(
        ["a", "b"],
        units=[4, 5],
        shared_units=k,
        input_units=[6, 7],
        input_shared_units=2,
        common_input=False,
        activation="tanh",
    )


def test_common_input_formula_and_shapes():
    layer = make_layer(common=True)
    x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    out_a, out_b = layer(x)
    assert out_a.shape == (3, 4) and out_b.shape == (3, 5)
    shared = np.maximum(x @ layer.shared_kernel.numpy() + layer.shared_bias.numpy(), 0)
    spec_b = np.maximum(x @ layer.task_kernels[1].numpy() + layer.task_biases[1].numpy(), 0)
    assert_close(out_b, np.hstack([shared, spec_b]), tol=1e-5)
    # Weights: shared (6x3 + 3), cross (0x3 each), specific (6x1 + 1, 6x2 + 2).
    assert layer.parameter_counts() == (21, 7 + 14)
    assert sum(int(np.prod(w.shape)) for w in layer.weights) == 21 + 21


def test_specific_inputs_feed_shared_neurons_per_task():
    layer = make_layer(common=False)
    rng = np.random.default_rng(1)
    x_a = rng.normal(size=(2, 6)).astype(np.float32)
    x_b = rng.normal(size=(2, 7)).astype(np.float32)
    layer.build(None)
    for v in layer.cross_kernels:
        v.assign(rng.normal(size=v.shape))
    out_a, out_b = layer([x_a, x_b])
    pre = x_b[:, :2] @ layer.shared_kernel.numpy() + x_b[:, 2:] @ layer.cross_kernels[1].numpy()
    assert_close(out_b[:, :3], np.tanh(pre + layer.shared_bias.numpy()), tol=1e-5)


def test_fully_shared_common_layer_returns_one_tensor():
    layer = ZippedDense(
        ["a", "b"],
        units=[3, 3],
        shared_units=3,
        input_units=[4, 4],
        input_shared_units=4,
        common_input=True,
    )
    assert layer.common_output
    out = layer(np.ones((2, 4), np.float32))
    assert not isinstance(out, list) and out.shape == (2, 3)
    assert layer.parameter_counts() == (15, 0)


def test_config_and_keras_file_round_trip(tmp_path):
    inputs = keras.Input((6,))
    outputs = make_layer(common=True)(inputs)
    model = keras.Model(inputs, {"a": outputs[0], "b": outputs[1]})
    restored_layer = ZippedDense.from_config(model.layers[1].get_config())
    assert restored_layer.get_config() == model.layers[1].get_config()
    path = str(tmp_path / "m.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    x = np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32)
    for task in "ab":
        np.testing.assert_array_equal(model(x)[task], restored(x)[task])


def test_validation_errors():
    with pytest.raises(ValueError, match="shared_units"):
        ZippedDense(["a", "b"], [2, 3], 3, [4, 4], 4, True)
    with pytest.raises(ValueError, match="one entry per task"):
        ZippedDense(["a", "b"], [2], 1, [4, 4], 4, True)
    with pytest.raises(ValueError, match="distinct"):
        ZippedDense(["a", "a"], [2, 2], 1, [4, 4], 4, True)
    with pytest.raises(ValueError, match="common_input"):
        ZippedDense(["a", "b"], [2, 2], 1, [4, 5], 4, True)

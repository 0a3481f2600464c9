"""Reading Keras models into plans."""

import keras
import pytest

from mtz_tf import graph, models


def test_plan_of_lenet():
    plan = graph.read_plan(models.lenet_300_100())
    assert [u.name for u in plan.units] == ["fc1", "fc2", "fc3"]
    assert [u.activation for u in plan.units] == ["relu", "relu", "linear"]
    assert plan.input_shape == (28, 28, 1)


def test_activation_layers_fold_into_dense_and_dropout_is_kept():
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(4),
            keras.layers.ReLU(),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(3),
            keras.layers.Activation("softmax"),
        ]
    )
    plan = graph.read_plan(model)
    assert [u.activation for u in plan.units] == ["relu", "softmax"]
    kinds = [s.kind if isinstance(s, graph.PassThrough) else "Dense" for s in plan.steps]
    assert kinds == ["Dense", "Dropout", "Dense"]


def test_unsupported_layers_are_named():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.DepthwiseConv2D(3, name="myconv"),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    with pytest.raises(ValueError, match="'myconv' of type DepthwiseConv2D is not supported"):
        graph.read_plan(model)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(4, activation="softmax", name="h"),
            keras.layers.Dense(2),
        ]
    )
    with pytest.raises(ValueError, match="'h' uses activation 'softmax'"):
        graph.read_plan(model)
    with pytest.raises(ValueError, match="at least one hidden Dense"):
        graph.read_plan(keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)]))


def test_non_chain_model_is_rejected():
    inputs = keras.Input((4,))
    a = keras.layers.Dense(3)(inputs)
    b = keras.layers.Dense(3)(inputs)
    model = keras.Model(inputs, keras.layers.Add(name="sum")([a, b]))
    with pytest.raises(ValueError, match="chains of layers|not supported"):
        graph.read_plan(model)

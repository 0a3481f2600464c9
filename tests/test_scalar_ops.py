"""Keras-ops nodes of one tensor and a scalar read as Rescaling layers (mtz_tf.scalar_ops)."""

import keras
import numpy as np
import pytest
from conftest import assert_close

import mtz_tf
from mtz_tf import data, scalar_ops


def _ops_model():
    """Conv -> x + 3 -> 2 - x -> x * 0.5 -> 4 * x -> x / 8 -> x - 1 -> Dense."""
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = 2.0 - (x + 3.0)
    x = 4.0 * (x * 0.5)
    x = x / 8.0 - 1.0
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def test_scalar_ops_become_rescaling_layers_computing_the_same():
    keras.utils.set_random_seed(0)
    model = _ops_model()
    nodes = [len(layer._inbound_nodes) for layer in model.layers]
    converted = scalar_ops.as_layers(model)
    assert scalar_ops.has_ops_nodes(model) and not scalar_ops.has_ops_nodes(converted)
    rescalings = [x for x in converted.layers if isinstance(x, keras.layers.Rescaling)]
    assert [(r.scale, r.offset) for r in rescalings] == [
        (1.0, 3.0),
        (-1.0, 2.0),
        (0.5, 0.0),
        (4.0, 0.0),
        (0.125, 0.0),
        (1.0, -1.0),
    ]
    x = np.random.default_rng(1).normal(size=(5, 6, 6, 2)).astype(np.float32)
    expected = (2.0 - (model.get_layer("conv")(x).numpy() + 3.0)) * 2.0 / 8.0 - 1.0
    head = model.get_layer("head")
    expected = expected.reshape(5, -1) @ head.kernel.numpy() + head.bias.numpy()
    assert_close(converted(x), expected)
    assert_close(model(x), expected)
    assert [len(layer._inbound_nodes) for layer in model.layers] == nodes  # not modified


def test_a_model_of_layers_only_is_returned_as_is():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    assert scalar_ops.as_layers(model) is model


@pytest.mark.parametrize(
    "op, named",
    [
        (lambda x: keras.ops.exp(x), "Exp"),
        (lambda x: x * x, "Multiply"),
        (lambda x: 1.0 / x, "Divide"),
    ],
)
def test_other_ops_nodes_are_refused_by_name(op, named):
    inputs = keras.Input((4,))
    x = keras.layers.Dense(4)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(op(x)))
    with pytest.raises(ValueError, match=f"{named}.*Keras-ops node"):
        scalar_ops.as_layers(model)
    lines = []
    assert not mtz_tf.describe(model, print_fn=lines.append)
    assert "Keras-ops node" in lines[0]


def test_hard_sigmoid_written_with_ops_zips_with_a_permuted_copy():
    """ReLU6(x + 3) / 6 between two Dense layers: the ops nodes are element-wise steps."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    x = keras.layers.Dense(8, name="hidden")(inputs)
    x = keras.layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    x = np.random.default_rng(2).normal(size=(64, 5)).astype(np.float32)
    permuted = mtz_tf.models.permute_hidden(model, seed=1)
    calibration = data.to_dataset(x, batch_size=32)
    zipped, report = mtz_tf.zip_models(
        {"a": model, "b": permuted}, {"a": calibration, "b": calibration}, verbose=0
    )
    assert report.layers[0].shared == 8
    assert_close(zipped(x)["a"], model(x))
    assert_close(zipped(x)["b"], model(x))

"""Model builders used by the papers' experiments, and function-preserving unit permutation."""

from __future__ import annotations

import keras
import numpy as np

from mtz_tf import graph


def lenet_300_100(
    input_shape: tuple = (28, 28, 1),
    num_classes: int = 10,
    seed: int | None = None,
    name: str = "lenet_300_100",
) -> keras.Model:
    """LeNet-300-100: Flatten -> Dense(300, ReLU) -> Dense(100, ReLU) -> Dense(classes).

    The output layer returns logits (no softmax), the convention of every model here.

    Args:
        input_shape: tuple, input shape without the batch dimension.
        num_classes: int, number of output classes.
        seed: int or None, seeds the Glorot-uniform initialisers.
        name: str, the model name.

    Returns:
        An uncompiled ``keras.Model``.

    Reference: LeCun et al., "Gradient-based learning applied to document recognition", 1998.
    """

    def init(offset: int):
        return keras.initializers.GlorotUniform(seed=None if seed is None else seed + offset)

    inputs = keras.Input(shape=input_shape, name="image")
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = keras.layers.Dense(300, activation="relu", kernel_initializer=init(0), name="fc1")(x)
    x = keras.layers.Dense(100, activation="relu", kernel_initializer=init(1), name="fc2")(x)
    outputs = keras.layers.Dense(num_classes, kernel_initializer=init(2), name="fc3")(x)
    return keras.Model(inputs, outputs, name=name)


def permute_hidden(model: keras.Model, seed: int) -> keras.Model:
    """Returns a new model computing the same function with hidden units randomly permuted.

    Every hidden ``Dense`` layer's units are reordered by a seeded random permutation p:
    kernel columns and bias entries move to ``[:, p]`` and ``[p]``, and the next layer's
    kernel rows to ``[p, :]``, so outputs are unchanged up to float rounding. MTZ experiments
    do this after training so that zipping cannot rely on index order. ``model`` is not
    modified.
    """
    plan = graph.read_plan(model)
    rng = np.random.default_rng(seed)
    permuted = keras.models.clone_model(model)
    permuted.set_weights(model.get_weights())
    units = plan.units
    for unit, consumer in zip(units[:-1], units[1:]):
        order = rng.permutation(unit.units)
        layer = permuted.get_layer(unit.name)
        layer.kernel.assign(layer.kernel.numpy()[:, order])
        if unit.use_bias:
            layer.bias.assign(layer.bias.numpy()[order])
        next_layer = permuted.get_layer(consumer.name)
        next_layer.kernel.assign(next_layer.kernel.numpy()[order, :])
    return permuted

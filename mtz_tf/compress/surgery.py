"""Rebuilds a Keras model with new layer widths and new weights (physical shrinking)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import numpy as np

_WIDTH_KEYS = {"Dense": "units", "Conv2D": "filters"}


def rebuild(
    model: keras.Model,
    widths: Mapping[str, int],
    weights: Mapping[str, Sequence[np.ndarray]],
) -> keras.Model:
    """Returns a new model like ``model`` with some layers resized and re-weighted.

    Args:
        model: keras.Model, Sequential or functional; not modified.
        widths: {layer name: new ``units``/``filters``} for Dense and Conv2D layers.
            Layers that infer their width from their input (BatchNormalization, Add,
            pooling) follow automatically.
        weights: {layer name: list of arrays in ``layer.get_weights()`` order} for every
            layer whose weights change (resized layers, their consumers, their BatchNorms).
            Every other layer keeps a copy of its current weights.

    Returns:
        The new, built model.

    Raises:
        ValueError: for an unknown layer name, a layer without a width, or weights whose
            shapes do not fit the rebuilt layer.
    """
    names = {layer.name for layer in model.layers}
    for name in list(widths) + list(weights):
        if name not in names:
            raise ValueError(f"Model {model.name!r} has no layer {name!r}.")
    config = model.get_config()
    for layer_config in config["layers"]:
        # Saved build shapes would rebuild every layer at its old width.
        layer_config.pop("build_config", None)
        name = layer_config["config"]["name"]
        _open_channel_reshape(layer_config)
        if name in widths:
            key = _WIDTH_KEYS.get(layer_config["class_name"])
            if key is None:
                raise ValueError(
                    f"Layer {name!r} ({layer_config['class_name']}) has no width to change; "
                    f"only {sorted(_WIDTH_KEYS)} layers can be resized."
                )
            layer_config["config"][key] = int(widths[name])
    new_model = model.__class__.from_config(config)
    for layer in new_model.layers:
        new_weights = weights.get(layer.name)
        if new_weights is None:
            new_weights = model.get_layer(layer.name).get_weights()
        expected = [tuple(w.shape) for w in layer.weights]
        received = [tuple(np.shape(w)) for w in new_weights]
        if expected != received:
            raise ValueError(
                f"Weights for layer {layer.name!r} have shapes {received}; the rebuilt layer "
                f"expects {expected}."
            )
        layer.set_weights(list(new_weights))
    return new_model


def _open_channel_reshape(layer_config: dict) -> None:
    """Leaves the channel count of a ``Reshape`` to (1, ..., 1, C) open (-1), so that it
    follows a resized layer before it (a squeeze-excite block's (C,) -> (1, 1, C)); with
    every other axis 1, -1 always stands for the input's size."""
    if layer_config["class_name"] == "Reshape":
        shape = list(layer_config["config"]["target_shape"])
        if all(d == 1 for d in shape[:-1]):
            layer_config["config"]["target_shape"] = tuple(shape[:-1]) + (-1,)

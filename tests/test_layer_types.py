"""The layer-type registry against the Keras layers themselves: every property it states
holds numerically, and every property it denies fails on a sample input."""

import keras
import numpy as np
import pytest

from mtz_tf import layer_types

SAMPLES = {
    "Dropout": lambda: keras.layers.Dropout(0.5),
    "SpatialDropout2D": lambda: keras.layers.SpatialDropout2D(0.5),
    "GaussianNoise": lambda: keras.layers.GaussianNoise(0.3),
    "GaussianDropout": lambda: keras.layers.GaussianDropout(0.3),
    "Identity": lambda: keras.layers.Identity(),
    "Flatten": lambda: keras.layers.Flatten(),
    "MaxPooling2D": lambda: keras.layers.MaxPooling2D(2),
    "AveragePooling2D": lambda: keras.layers.AveragePooling2D(3, 2, padding="same"),
    "GlobalAveragePooling2D": lambda: keras.layers.GlobalAveragePooling2D(),
    "GlobalMaxPooling2D": lambda: keras.layers.GlobalMaxPooling2D(keepdims=True),
    "ZeroPadding2D": lambda: keras.layers.ZeroPadding2D(1),
    "Cropping2D": lambda: keras.layers.Cropping2D(1),
    "UpSampling2D": lambda: keras.layers.UpSampling2D(2, interpolation="bilinear"),
    "Rescaling": lambda: keras.layers.Rescaling(2.0, offset=1.0),
    "Normalization": lambda: keras.layers.Normalization(
        mean=[0.5, -1.0, 2.0, 0.0], variance=[1.0, 4.0, 0.25, 9.0]
    ),
    "Reshape": lambda: keras.layers.Reshape((36, 4)),
    "Add": lambda: keras.layers.Add(),
    "Subtract": lambda: keras.layers.Subtract(),
    "Average": lambda: keras.layers.Average(),
    "Maximum": lambda: keras.layers.Maximum(),
    "Minimum": lambda: keras.layers.Minimum(),
    "Multiply": lambda: keras.layers.Multiply(),
    "Concatenate": lambda: keras.layers.Concatenate(),
}
C = 4


def test_every_registered_type_has_a_sample():
    assert set(SAMPLES) == set(layer_types.REGISTRY)


def _apply(layer, inputs):
    out = layer(inputs if len(inputs) > 1 else inputs[0], training=False)
    out = np.asarray(out)
    return out.reshape(out.shape[0], -1, C) if out.ndim == 2 else out  # Flatten: (N, HW, C)


def _holds(a, b) -> bool:
    return np.allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("name", sorted(layer_types.REGISTRY))
def test_stated_properties_hold_and_denied_ones_fail(name):
    entry = layer_types.REGISTRY[name]
    assert layer_types.lookup(SAMPLES[name]()) is entry
    rng = np.random.default_rng(0)
    arity = 2 if entry.coupling else 1
    x = [rng.normal(size=(2, 6, 6, C)).astype(np.float32) for _ in range(arity)]
    layer = SAMPLES[name]()
    y = _apply(layer, x)
    width = y.shape[-1]

    # A channel permutation (for Concatenate: the same one within each input's block).
    order = np.array([2, 0, 3, 1])
    block = np.concatenate([order + C * i for i in range(width // C)])
    permuted = _apply(layer, [v[..., order] for v in x])
    assert _holds(permuted, y[..., block]) == entry.permutation

    scale = np.array([0.5, 2.0, 3.0, 1.5], np.float32)
    scaled = _apply(layer, [v * scale for v in x])
    assert _holds(scaled, y * np.tile(scale, width // C)) == entry.positive_scale

    constant = [np.full_like(v, 0.0) + np.arange(1, C + 1, dtype=np.float32) for v in x]
    out = _apply(layer, constant)
    flat = out.reshape(out.shape[0], -1, out.shape[-1])
    assert _holds(flat, np.broadcast_to(flat[:, :1], flat.shape)) == entry.constant


def test_types_with_selects_by_every_property():
    chosen = layer_types.types_with(positive_scale=True, constant=True, coupling=False)
    assert keras.layers.Cropping2D in chosen and keras.layers.MaxPooling2D in chosen
    assert keras.layers.ZeroPadding2D not in chosen and keras.layers.Rescaling not in chosen
    assert keras.layers.Add not in chosen
    assert set(layer_types.types_with(coupling=True)) == {
        keras.layers.Add,
        keras.layers.Subtract,
        keras.layers.Average,
        keras.layers.Maximum,
        keras.layers.Minimum,
        keras.layers.Multiply,
        keras.layers.Concatenate,
    }


def test_subclasses_and_unknown_types_are_not_registered():
    class MyDropout(keras.layers.Dropout):
        pass

    assert layer_types.lookup(MyDropout(0.1)) is None
    assert layer_types.lookup(keras.layers.DepthwiseConv2D(3)) is None

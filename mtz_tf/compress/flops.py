"""Compute cost of a Keras model: multiply-accumulate operations per example."""

from __future__ import annotations

import keras
import numpy as np


def count_flops(model: keras.Model) -> int:
    """Multiply-accumulates (MACs) of the ``Conv2D`` and ``Dense`` layers for one example.

    Conv2D: H_out * W_out * k_h * k_w * (C_in / groups) * C_out. Dense:
    (positions) * inputs * units, positions being the product of the non-batch, non-feature
    input dimensions (1 for a flat input). BatchNorm, activations, pooling and additions are
    not counted (they are linear in the activation count and small next to these). This is
    the "FLOPs" convention of the channel-pruning literature (one MAC = one FLOP).
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            k_h, k_w, c_in, c_out = layer.kernel.shape
            total += int(np.prod(layer.output.shape[1:-1])) * k_h * k_w * c_in * c_out
        elif isinstance(layer, keras.layers.Dense):
            positions = int(np.prod(layer.input.shape[1:-1])) if len(layer.input.shape) > 2 else 1
            total += positions * int(np.prod(layer.kernel.shape))
    return int(total)

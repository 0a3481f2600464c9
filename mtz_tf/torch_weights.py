"""Loads models published as PyTorch weights (NumPy ``.npz`` in PyTorch layout) into Keras."""

from __future__ import annotations

import keras
import numpy as np

from mtz_tf import models

_LENET_300_100_LAYERS = (("ip1", "fc1"), ("ip2", "fc2"), ("ip3", "fc3"))


def lenet_300_100_from_torch_npz(path: str) -> keras.Model:
    """LeNet-300-100 with the weights of a PyTorch ``nn.Linear`` stack saved as ``.npz``.

    The file holds ``ip{1,2,3}_weight`` of shape (out, in) and ``ip{1,2,3}_bias`` (out,), the
    Neuron Merging reference code's names. PyTorch computes x W^T + b, so the Keras kernel is
    W^T (in, out); PyTorch's row-major flattening of a 28x28 image equals Keras ``Flatten`` on
    (28, 28, 1), so no input permutation is needed.

    Args:
        path: str, the ``.npz`` file.

    Returns:
        ``mtz_tf.models.lenet_300_100`` with those weights (input (28, 28, 1), 10 logits).
    """
    with np.load(path) as arrays:
        missing = [
            f"{prefix}_{kind}"
            for prefix, _ in _LENET_300_100_LAYERS
            for kind in ("weight", "bias")
            if f"{prefix}_{kind}" not in arrays.files
        ]
        if missing:
            raise ValueError(
                f"{path!r} is not a LeNet-300-100 in PyTorch layout: it lacks {missing} "
                f"(it holds {sorted(arrays.files)})."
            )
        weights = {name: np.asarray(arrays[name]) for name in arrays.files}
    num_classes, hidden = weights["ip3_weight"].shape
    model = models.lenet_300_100(num_classes=num_classes)
    for prefix, name in _LENET_300_100_LAYERS:
        layer = model.get_layer(name)
        kernel = weights[f"{prefix}_weight"].T
        if kernel.shape != tuple(layer.kernel.shape):
            raise ValueError(
                f"{prefix}_weight in {path!r} has shape {kernel.shape[::-1]}; LeNet-300-100 "
                f"expects {tuple(layer.kernel.shape)[::-1]} (out, in)."
            )
        layer.set_weights([kernel, weights[f"{prefix}_bias"]])
    return model

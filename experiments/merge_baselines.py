"""Permutation-alignment baselines for merging same-architecture MLPs, without MTZ.

For a chain of Dense layers (hidden layers 1..L, then a head), model B's hidden neurons are
permuted to align with model A's, and the aligned weights are averaged:

* **activation matching** (as in Git Re-Basin's and ZipIt!'s activation baseline): layer by
  layer, B's neurons are assigned to A's by the maximum total correlation of their
  post-activation outputs on calibration data (an exact assignment problem);
* **weight matching** (Ainsworth, Hayase, Srinivasa, "Git Re-Basin", ICLR 2023, Algorithm 1):
  the permutations of all hidden layers jointly maximise Σ_l ⟨W_l^A, P_l W_l^B P_(l−1)ᵀ⟩
  (biases included), by coordinate ascent: each layer's permutation is the exact assignment
  given its neighbours', until no permutation changes.

:func:`merged_models` then averages the hidden layers and gives each task its own head
(aligned), or one model with every layer averaged, the head included.
"""

from __future__ import annotations

import keras
import numpy as np
import scipy.optimize


def dense_weights(model: keras.Model) -> list:
    """[(kernel (d, n), bias (n,)), ...] of the model's Dense layers, input to output."""
    return [
        tuple(np.asarray(w, np.float64) for w in layer.get_weights())
        for layer in model.layers
        if isinstance(layer, keras.layers.Dense)
    ]


def _assignment(similarity: np.ndarray) -> np.ndarray:
    """perm with perm[i] = the B neuron assigned to A neuron i, maximising Σ similarity."""
    rows, cols = scipy.optimize.linear_sum_assignment(similarity, maximize=True)
    return cols[np.argsort(rows)]


def permute(weights: list, perms: list) -> list:
    """B's weights with hidden layer l's neurons reordered by ``perms[l]``."""
    out, previous = [], None
    for index, (kernel, bias) in enumerate(weights):
        if previous is not None:
            kernel = kernel[previous]
        if index < len(perms):
            kernel, bias = kernel[:, perms[index]], bias[perms[index]]
            previous = perms[index]
        out.append((kernel, bias))
    return out


def activation_matching(model_a, model_b, x: np.ndarray) -> list:
    """Per hidden layer, B's neurons assigned to A's by the correlation of activations."""
    perms = []
    for layer in [la for la in model_a.layers if isinstance(la, keras.layers.Dense)][:-1]:
        outputs = []
        for model in (model_a, model_b):
            probe = keras.Model(model.input, model.get_layer(layer.name).output)
            h = np.asarray(probe.predict(x, verbose=0), np.float64)
            outputs.append((h - h.mean(0)) / (h.std(0) + 1e-8))
        perms.append(_assignment(outputs[0].T @ outputs[1] / len(x)))
    return perms


def weight_matching(weights_a: list, weights_b: list, max_sweeps: int = 100, seed: int = 0):
    """Re-Basin weight matching of all hidden layers jointly (module docstring)."""
    hidden = len(weights_a) - 1
    perms = [np.arange(weights_a[h][1].shape[0]) for h in range(hidden)]
    rng = np.random.default_rng(seed)
    for _ in range(max_sweeps):
        changed = False
        for h in rng.permutation(hidden):
            (k_a, b_a), (k_b, b_b) = weights_a[h], weights_b[h]
            incoming = k_b if h == 0 else k_b[perms[h - 1]]
            similarity = k_a.T @ incoming + np.outer(b_a, b_b)
            next_a, next_b = weights_a[h + 1][0], weights_b[h + 1][0]
            if h + 1 < hidden:
                next_b = next_b[:, perms[h + 1]]
            similarity += next_a @ next_b.T
            perm = _assignment(similarity)
            changed |= not np.array_equal(perm, perms[h])
            perms[h] = perm
        if not changed:
            break
    return perms


def merged_models(model_a, model_b, perms: list, own_heads: bool) -> list:
    """Copies of model A holding the average of A and aligned B: [for task a, for task b]
    with own heads, or one fully averaged model (the head too)."""
    weights_a = dense_weights(model_a)
    weights_b = permute(dense_weights(model_b), perms)
    average = [((ka + kb) / 2, (ba + bb) / 2) for (ka, ba), (kb, bb) in zip(weights_a, weights_b)]
    heads = [weights_a[-1], weights_b[-1]] if own_heads else [average[-1]]
    merged = []
    for head in heads:
        model = keras.models.clone_model(model_a)
        dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
        for layer, (kernel, bias) in zip(dense, average[:-1] + [head]):
            layer.set_weights([kernel.astype("float32"), bias.astype("float32")])
        merged.append(model)
    return merged

"""One step of zipping: Hessians of a layer's inputs, costs, matching, and the new weights.

Weight layouts for the cost (``hessian`` mode):

* Dense: a neuron is its column of the kernel rows at shared input positions, with the bias
  as an extra row: (k_in + 1, n).
* Conv2D, ``"channel"`` (the reference code): every kernel position p sees the same
  per-pixel input-channel covariance H (k_in + 1)², so the weights are (P = kh·kw,
  k_in + 1, n), the bias appended at every position, costs summed over positions; the
  merged bias is the mean over positions.
* Conv2D, ``"patch"`` (exact, L-OBS style): H is the covariance of whole im2col patches
  (kh·kw·k_in + 1)², with the layer's strides and padding; weights (kh·kw·k_in + 1, n).
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf

from mtz_tf import cost, graph, hessian, zipped_network
from mtz_tf.zipped_network import LayerState

HESSIAN_MODES = ("channel", "patch")
PAIRINGS = ("hessian", "euclidean", "random")
TIES = ("hessian", "average")


def patches(x: tf.Tensor, state: LayerState) -> tf.Tensor:
    """im2col rows of a channels-last batch for a conv layer: (n·H_out·W_out, kh·kw·c).

    Row order within a patch is (kh, kw, c), the order of a Keras kernel reshaped to
    (kh·kw·c, filters); padding and strides are the layer's.
    """
    (kh, kw), (sh, sw), padding = state.conv
    rows = tf.image.extract_patches(
        x,
        sizes=[1, kh, kw, 1],
        strides=[1, sh, sw, 1],
        rates=[1, 1, 1, 1],
        padding=padding.upper(),
    )  # (n, H_out, W_out, kh·kw·c)
    return tf.reshape(rows, [tf.reduce_prod(tf.shape(rows)[:-1]), rows.shape[-1]])


def hessian_rows(x: tf.Tensor, state: LayerState, mode: str) -> tf.Tensor:
    """The rows whose mean outer product is the Hessian of a layer input x (channels-last,
    already cut to the input channels the Hessian covers, :func:`hessian_width`).

    A channel-wise unit (:func:`mtz_tf.graph.is_channelwise`) gets one Hessian per channel,
    of that channel's kh·kw patch: :class:`mtz_tf.hessian.PerChannel` rows
    (n·H_out·W_out, kh·kw, C), C Hessians.
    """
    if graph.is_channelwise(state):
        positions = int(np.prod(state.kernel_prefix)) * state.kernels[0].shape[-2]
        rows = patches(x, state)  # positions 0 for no weights (a BatchNorm kept per task)
        rows = tf.reshape(rows, [tf.shape(rows)[0], -1, x.shape[-1]])[:, :positions]
        return hessian.PerChannel(rows)
    if state.kind == "Dense":
        return x
    if mode == "patch":
        return patches(x, state)
    return tf.reshape(x, [tf.reduce_prod(tf.shape(x)[:-1]), x.shape[-1]])  # a row per pixel


def hessian_width(state: LayerState) -> int | None:
    """Input channels a layer's Hessian covers: its shared inputs, or every channel (None)
    for a channel-wise unit, whose Hessians are per channel."""
    return None if graph.is_channelwise(state) else state.input_shared_units


def task_inputs(model: keras.Model, layers: list, widths: list | None = None):
    """A function ``(batch, t) -> [x_l]``: task t's input to each of ``layers`` (zipped layers
    of ``model``) on a batch, cut to its first ``widths[l]`` channels (None: all).

    ``t`` is a scalar int32 tensor, so one trace serves every task: a layer taking one input
    per task has task t's picked by ``tf.switch_case``, which computes only that one.
    """
    widths = [None] * len(layers) if widths is None else widths
    # Keras flattens nested outputs, so a layer taking one input per task contributes T
    # outputs; `spans` regroups them.
    outputs, spans = [], []
    for layer in layers:
        symbolic = zipped_network.layer_input(model, layer)
        per_task_input = isinstance(symbolic, (list, tuple))
        items = list(symbolic) if per_task_input else [symbolic]
        spans.append((len(outputs), len(items), per_task_input))
        outputs += items
    feature_model = keras.Model(model.input, outputs)

    def features(batch, t):
        flat = feature_model(batch, training=False)
        flat = list(flat) if isinstance(flat, (list, tuple)) else [flat]
        picked = []
        for (start, count, listed), width in zip(spans, widths):
            if listed:  # one tensor per task: task t's, picked by the traced index
                branches = [
                    functools.partial(lambda x, k: x[..., :k], x, width)
                    for x in flat[start : start + count]
                ]
                picked.append(tf.switch_case(t, branches))
            else:  # one tensor common to all tasks
                picked.append(flat[start][..., :width])
        return picked

    return features


def layers_hessians(
    model: keras.Model,
    layers: list,
    states: list,
    feed,
    mode: str,
) -> list[list[tf.Tensor]]:
    """Each task's Hessian of every layer's inputs at shared positions (+ bias), per layer,
    per task: task t's Hessian uses task t's calibration data through the current zipped
    ``model``, as ``feed`` serves it (:mod:`mtz_tf.frontier`: kept frontier activations, or
    full passes); one pass over each task's data serves all ``layers``."""
    inputs = feed.task_inputs(model, layers, [hessian_width(state) for state in states])

    def features(batch, t):
        return [hessian_rows(x, state, mode) for x, state in zip(inputs(batch, t), states)]

    per_task = feed.moments(features, [state.use_bias for state in states])
    return [list(h) for h in zip(*per_task)]


def cost_layout(state: LayerState, kernel: np.ndarray, bias: np.ndarray, mode: str):
    """Neurons' shared-input weights in the layout of the Hessian (module docstring)."""
    k_in, n = state.input_shared_units, kernel.shape[-1]
    positions = int(np.prod(state.kernel_prefix))
    rows = kernel[..., :k_in, :]
    if state.kind == "Conv2D" and mode == "channel":
        rows = rows.reshape(positions, k_in, n)  # (P, k_in, n)
        if state.use_bias:
            rows = np.concatenate([rows, np.broadcast_to(bias, (rows.shape[0], 1, n))], 1)
        return rows
    rows = rows.reshape(positions * k_in, n)  # (kh·kw·k_in, n) patch mode, (k_in, n) Dense
    return np.vstack([rows, bias[None]]) if state.use_bias else rows


def unpack_merged(state: LayerState, merged: np.ndarray, mode: str):
    """Inverse of :func:`cost_layout` for merged weights: (kernel (..., k_in, k), bias (k,))."""
    k_in, k = state.input_shared_units, merged.shape[-1]
    shape = state.kernel_prefix + (k_in, k)
    if state.kind == "Conv2D" and mode == "channel":
        kernel = merged[:, :k_in, :].reshape(shape)
        bias = merged[:, k_in, :].mean(0) if state.use_bias else np.zeros(k)
        return kernel, bias
    if state.use_bias:
        return merged[:-1].reshape(shape), merged[-1]
    return merged.reshape(shape), np.zeros(k)


def pair_costs(w_group, w_t, h_group, h_t, config: dict, rng: np.random.Generator) -> np.ndarray:
    """The (n_group, n_t) pairing costs under ``config["pairing"]``: the MTZ merge cost
    (``"hessian"``), the squared weight distance (``"euclidean"``, H = I) or uniform
    random numbers (``"random"``)."""
    if config["pairing"] == "random":
        return rng.random((w_group.shape[-1], w_t.shape[-1]))
    if config["pairing"] == "euclidean":
        identity = [np.broadcast_to(np.eye(np.shape(h)[-1]), np.shape(h)) for h in (h_group, h_t)]
        h_group, h_t = identity
    return cost.merge_costs(w_group, w_t, h_group, h_t, config["damping"]).numpy()


def neurons(hessian, index):
    """The Hessians of neurons ``index`` (a slice or indices): a layer's Hessian is every
    neuron's, per-neuron Hessians (n, d, d) are picked (:func:`mtz_tf.cost.is_per_neuron`)."""
    if not cost.is_per_neuron(hessian):
        return hessian
    if isinstance(index, slice):
        return hessian[index]
    return tf.gather(hessian, index) if tf.is_tensor(hessian) else hessian[index]


def saving_per_pair(state: LayerState, num_tasks: int) -> int:
    """Parameters saved by sharing one more neuron of this layer across ``num_tasks``
    tasks, counted on the full fan-in (:mod:`mtz_tf.allocation`): (T − 1)·(P·d_in + 1)."""
    positions = int(np.prod(state.kernel_prefix)) if state.kernel_prefix else 1
    return (num_tasks - 1) * (positions * min(state.input_units) + int(state.use_bias))


def align_inputs(state: LayerState, k_in: int) -> None:
    """Marks the first ``k_in`` input rows of a layer with no shared neurons yet as aligned
    across tasks (shared inputs), with empty shared and cross kernels to match."""
    state.input_shared_units = k_in
    state.shared_kernel = np.zeros(state.kernel_prefix + (k_in, 0))
    state.cross_kernels = [
        np.zeros(state.kernel_prefix + (kernel.shape[-2] - k_in, 0)) for kernel in state.kernels
    ]

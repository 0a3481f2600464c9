"""Neuron Merging: data-free structured pruning with compensation (Kim et al., NeurIPS 2020).

A hidden layer with n neurons (units of a ``Dense``, filters of a ``Conv2D``) computes
a = f(W x) with W of shape (d, n) (bias appended to x), f element-wise. Pruning keeps k of the
n neurons, Y = W[:, keep] (d, k). Neuron Merging approximates

    W ≈ Y Z,    Z (k, n) >= 0 with at most one positive entry per column,

i.e. every pruned neuron w_i is replaced by z·y_j, a positive multiple of one kept neuron.
Because f is *positively homogeneous* (f(z·t) = z·f(t) for z > 0: ReLU, leaky ReLU, linear),
a_i = f(w_i·x) ≈ f(z·y_j·x) = z·a_j. The next layer, with kernel K (n, q) (Keras layout),
computes K^T a ≈ (Z K)^T a_keep, so the compensation folds into it: its kernel becomes Z K
(k, q). Kept neuron j has Z[j, keep[j]] = 1; a neuron pruned without a partner has a zero column
(plain pruning). Nothing else changes, and when a pruned neuron *is* a positive multiple of a
kept one the merged model computes exactly what the original did.

MostSim (layers without BatchNorm): neuron i's vector v_i is its incoming weights followed by
its bias. Each pruned i picks the kept j with the largest cosine similarity; if that is at
least the threshold t, Z[j, i] = ||v_i|| / ||v_j||; otherwise i is only pruned.

BatchNorm variant (Dense/Conv2D -> BatchNormalization -> activation): channel i outputs
y_i = γ_i (w_i·x − μ_i)/σ_i + β_i (a conv bias is folded into μ_i). With w_i = s·w_j the
exact relation is y_i = S y_j + c with slope

    S = s (γ_i/γ_j)(σ_j/σ_i),   σ = sqrt(running variance + ε)          ("exact")

and merging is exact when c = 0 and S > 0. The reference code instead uses

    S_ref = s (γ_j/γ_i)(var_i/var_j)                                        ("reference")

(γ ratio inverted, running variance in place of σ); published numbers need it. The partner j
minimises λ·(1 − cos(w_i, w_j)) + (1 − λ)·B̂_ij, B̂ the bias-mismatch term B_ij min-max
normalised over the candidates j of i:

* reference: B_ij = |(γ_j/var_j)(s(μ_i − var_i β_i/γ_i) − μ_j) + β_j| / S_ref
* exact: B_ij = |γ_j (t_i/s − μ_j)/σ_j + β_j| = |c|/S, the kept channel's output where the
  pruned one crosses zero (t_i = μ_i − σ_i β_i/γ_i); candidates with S <= 0 are excluded.

Then the threshold applies to cos(w_i, w_j) as above, and Z[j, i] = S (or S_ref).

Which neurons are kept comes from :mod:`mtz_tf.compress.criteria` (l1-norm, l2-norm, l2-GM) on
the same vectors (weights + bias without BN; kernel only with BN). Criteria and similarities
use each layer's original weights, before the compensation from the layer below is folded in,
as the reference code does.

Reference: Kim, Kim, Park, Jeon, "Neuron Merging: Compensating for Pruned Neurons",
NeurIPS 2020.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import keras
import numpy as np

from mtz_tf import activations as activation_lib
from mtz_tf import layer_types, scalar_ops
from mtz_tf.compress import criteria as criteria_lib
from mtz_tf.compress import surgery
from mtz_tf.layers import _ZippedLayer
from mtz_tf.report import Report

SCALES = ("reference", "exact")
"""Scale formulas of the BatchNorm variant (identical for layers without BatchNorm)."""

DEFAULT_THRESHOLD = 0.45
"""Cosine-similarity threshold for layers without BatchNorm (reference LeNet-300-100 script)."""

DEFAULT_THRESHOLD_BN = 0.1
"""Cosine-similarity threshold for layers followed by BatchNorm (reference VGG/ResNet scripts)."""

DEFAULT_LAMDA = 0.85
"""λ of the BatchNorm variant (reference VGG-16 and ResNet-56 scripts)."""

_CAPPED_RELU = "relu (max_value/threshold)"
"""A ReLU layer with a cap or threshold: element-wise, but not positively homogeneous."""

_AFFINE = "scalar Rescaling with an offset or a negative scale"
"""x·s + o on every channel (MobileNetV3's hard sigmoid, :mod:`mtz_tf.scalar_ops`):
pruning passes through it, a positive per-channel scale does not."""

_STANDALONE_BATCH_NORM = "a BatchNormalization reached through other layers"
"""A BatchNorm that is not the layer's own (DenseNet's before each block): an affine map
per channel, whose parameters go with a pruned channel but whose offset stops merging."""

HOMOGENEOUS_ACTIVATIONS = frozenset({"linear", "relu", "leaky_relu"})
"""Activations f with f(z·t) = z·f(t) for every z > 0: merging through them is exact."""

# Layers that move each channel on its own and commute with a positive per-channel scale.
_CHANNELWISE = layer_types.types_with(positive_scale=True, coupling=False)
_OTHER_WEIGHT_LAYERS = (
    keras.layers.Conv1D,
    keras.layers.Conv3D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
    keras.layers.EinsumDense,
)
# Layers that tie channels of several tensors together: the producers cannot be pruned alone.
_COUPLING = layer_types.types_with(coupling=True) + (keras.layers.Dot,)


@dataclasses.dataclass(frozen=True)
class PrunedLayer:
    """What :func:`compress` did to one layer.

    Attributes:
        name: str, the Dense/Conv2D layer.
        units: int, neurons before.
        kept: int, neurons after.
        merged: int, pruned neurons folded into a kept one (the rest were only pruned).
        batch_norm: str or None, the BatchNormalization layer used by the BN variant.
    """

    name: str
    units: int
    kept: int
    merged: int
    batch_norm: str | None


@dataclasses.dataclass(frozen=True)
class NeuronMergingReport(Report):
    """What :func:`compress` did (``to_dict()``/``to_json()``), in the pattern of
    :class:`mtz_tf.report.Report`: the settings, the parameter counts and the per-layer
    entries.

    Attributes:
        criterion: str, how the kept neurons were chosen.
        merge: bool, whether pruned neurons were folded into kept ones.
        params_before, params_after: int, ``count_params`` of the input and new models.
        layers: list of :class:`PrunedLayer`, one per pruned layer, in model order.
    """

    criterion: str
    merge: bool
    params_before: int
    params_after: int
    layers: list


@dataclasses.dataclass(frozen=True)
class _Unit:
    """A prunable layer: its BatchNorm, activations, and the layers that read its channels."""

    name: str
    units: int
    batch_norm: str | None
    activations: tuple[str, ...]
    # (consumer layer name, number of spatial positions per channel in its input rows).
    consumers: tuple[tuple[str, int], ...]
    # Depthwise convolutions (and the BatchNorm right after each) on the way: channel c of
    # each is the pruned layer's channel c, so it goes with it.
    channelwise: tuple[str, ...] = ()
    # Dense/Conv2D layers writing squeeze-excite gates that scale its channels: output c of
    # each goes with channel c.
    gates: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Blocked:
    """A layer that cannot be pruned.

    ``kind`` is ``"output"`` (its units are the model's outputs: never pruned), ``"coupled"``
    (channels tied to others by ``Add``/``Concatenate``: left alone by design), ``"skipped"``
    (a weight layer of a kind Neuron Merging does not prune, such as ``DepthwiseConv2D``) or
    ``"unsupported"`` (a Dense/Conv2D whose channels reach a layer the tracer cannot follow:
    an error, since the result might be wrong).
    """

    name: str
    kind: str
    reason: str


# --------------------------------------------------------------------------------------------
# Numerics: pure functions, NumPy in and out.


def keep_count(units: int, prune_fraction: float) -> int:
    """Neurons kept out of ``units`` when ``prune_fraction`` of them go: round(units·(1 −
    prune_fraction)), at least 1.

    Python's ``round`` (half to even), as the reference code computes its layer widths.
    """
    return max(1, int(round(units * (1.0 - prune_fraction))))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(p, k) cosine similarities of the rows of a (p, d) and b (k, d); 0 for zero rows."""
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    a_hat = np.divide(a, na, out=np.zeros_like(a), where=na > 0)
    b_hat = np.divide(b, nb, out=np.zeros_like(b), where=nb > 0)
    return a_hat @ b_hat.T


def _selection(n: int, keep: np.ndarray) -> np.ndarray:
    """Z (k, n) of plain pruning: Z[j, keep[j]] = 1, every other entry 0."""
    z = np.zeros((len(keep), n))
    z[np.arange(len(keep)), keep] = 1.0
    return z


def _pruned_indices(n: int, keep: np.ndarray) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    mask[keep] = False
    return np.flatnonzero(mask)


def merge_matrix(
    vectors: np.ndarray, keep: np.ndarray, threshold: float | None = DEFAULT_THRESHOLD
) -> np.ndarray:
    """MostSim compensation matrix Z of a layer without BatchNorm.

    Args:
        vectors: array (n, d), neuron i's incoming weights and bias in row i.
        keep: int array (k,), the kept neurons (distinct).
        threshold: float or None, least cosine similarity to merge; None (or 0, as in the
            reference code) merges every pruned neuron into its most similar kept one.

    Returns:
        float64 Z (k, n): Z[j, keep[j]] = 1; for pruned i with best partner j (largest
        cos(v_i, v_keep[j])) and cos >= threshold, Z[j, i] = ||v_i|| / ||v_keep[j]||.
    """
    v = np.asarray(vectors, dtype=np.float64)
    keep = np.asarray(keep, dtype=np.int64)
    n = len(v)
    z = _selection(n, keep)
    pruned = _pruned_indices(n, keep)
    if len(pruned) == 0 or len(keep) == 0:
        return z
    norms = np.linalg.norm(v, axis=1)
    cos = _cosine(v[pruned], v[keep])  # (p, k)
    cos[:, norms[keep] == 0] = -np.inf  # A zero neuron cannot absorb anything.
    best = np.argmax(cos, axis=1)  # (p,)
    similarity = cos[np.arange(len(pruned)), best]
    merge = np.isfinite(similarity)
    if threshold:
        merge &= similarity >= threshold
    z[best[merge], pruned[merge]] = norms[pruned[merge]] / norms[keep[best[merge]]]
    return z


def merge_matrix_bn(
    vectors: np.ndarray,
    keep: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    variance: np.ndarray,
    epsilon: float = 1e-3,
    threshold: float | None = DEFAULT_THRESHOLD_BN,
    lamda: float = DEFAULT_LAMDA,
    scale: str = "reference",
) -> np.ndarray:
    """Compensation matrix Z of a layer followed by BatchNorm (see the module docstring).

    Args:
        vectors: array (n, d), neuron i's incoming weights (no bias) in row i.
        keep: int array (k,), the kept neurons.
        gamma, beta, mean, variance: arrays (n,), the BatchNorm scale, offset, moving mean
            (minus the layer's own bias, if any) and moving variance.
        epsilon: float, the BatchNorm ε (used by ``scale="exact"`` only, as in the reference).
        threshold: float or None, least cosine similarity of the chosen pair to merge.
        lamda: float in [0, 1], weight of the cosine distance against the bias mismatch.
        scale: ``"reference"`` (the reference code's formulas) or ``"exact"``.

    Returns:
        float64 Z (k, n), one entry per merged pruned neuron at its chosen partner's row.
    """
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {SCALES}. Received: scale={scale!r}")
    v = np.asarray(vectors, dtype=np.float64)
    keep = np.asarray(keep, dtype=np.int64)
    n = len(v)
    z = _selection(n, keep)
    pruned = _pruned_indices(n, keep)
    if len(pruned) == 0 or len(keep) == 0:
        return z
    g, b, mu, var = (np.asarray(t, dtype=np.float64) for t in (gamma, beta, mean, variance))
    norms = np.linalg.norm(v, axis=1)
    cos_dist = 1.0 - _cosine(v[pruned], v[keep])  # (p, k)
    # Pruned i along axis 0, kept j along axis 1.
    gi, bi, mi = g[pruned, None], b[pruned, None], mu[pruned, None]
    gj, bj, mj = g[None, keep], b[None, keep], mu[None, keep]
    with np.errstate(divide="ignore", invalid="ignore"):
        s = norms[pruned, None] / norms[None, keep]  # (p, k)
        if scale == "reference":
            vi, vj = var[pruned, None], var[None, keep]
            slope = s * (gj / gi) * (vi / vj)
            mismatch = np.abs((gj / vj) * (s * (-(vi * bi / gi) + mi) - mj) + bj) / slope
            valid = np.isfinite(slope) & np.isfinite(mismatch)
        else:
            sigma = np.sqrt(var + epsilon)
            si, sj = sigma[pruned, None], sigma[None, keep]
            slope = s * (gi / gj) * (sj / si)
            zero_crossing = mi - si * bi / gi  # Pre-BN input where channel i's output is 0.
            mismatch = np.abs(gj * (zero_crossing / s - mj) / sj + bj)
            valid = np.isfinite(slope) & np.isfinite(mismatch) & (slope > 0)
    lo = np.min(np.where(valid, mismatch, np.inf), axis=1, keepdims=True)
    hi = np.max(np.where(valid, mismatch, -np.inf), axis=1, keepdims=True)
    span = hi - lo
    with np.errstate(divide="ignore", invalid="ignore"):
        b_hat = np.where(span > 0, (mismatch - lo) / span, 0.0)
    score = np.where(valid, lamda * cos_dist + (1.0 - lamda) * b_hat, np.inf)
    best = np.argmin(score, axis=1)
    rows = np.arange(len(pruned))
    merge = np.isfinite(score[rows, best])
    if threshold:
        merge &= 1.0 - cos_dist[rows, best] >= threshold
    z[best[merge], pruned[merge]] = slope[rows, best][merge]
    return z


# --------------------------------------------------------------------------------------------
# Reading the model: which layers can be pruned, and what reads their channels.


def _activation_of(layer) -> str | None:
    """Name of the element-wise activation a layer applies, or None if it is not one."""
    if isinstance(layer, keras.layers.ReLU):
        if layer.max_value is not None or layer.threshold:
            return _CAPPED_RELU
        return "leaky_relu" if layer.negative_slope else "relu"
    if isinstance(layer, keras.layers.LeakyReLU):
        return "leaky_relu"
    if isinstance(layer, keras.layers.Activation):
        return activation_lib.label(layer.activation)
    return None


def _inputs_of(layer) -> list:
    inputs = layer.input
    return list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]


def _consumer_map(model: keras.Model) -> dict[str, list]:
    consumers: dict[str, list] = {layer.name: [] for layer in model.layers}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        for tensor in _inputs_of(layer):
            history = getattr(tensor, "_keras_history", None)
            if history is not None and history.operation.name in consumers:
                consumers[history.operation.name].append(layer)
    return consumers


def _check_weight_layer(layer) -> str | None:
    """Why a Dense/Conv2D cannot take part in pruning (as producer or consumer), or None."""
    if isinstance(layer, keras.layers.Conv2D) and not isinstance(
        layer, keras.layers.Conv2DTranspose
    ):
        if layer.data_format != "channels_last":
            return f"Conv2D {layer.name!r} uses data_format={layer.data_format!r}"
        if layer.groups != 1:
            return f"Conv2D {layer.name!r} is a grouped convolution (groups={layer.groups})"
        return None
    if isinstance(layer, keras.layers.Dense):
        return None
    return f"layer {layer.name!r} ({type(layer).__name__}) is not Dense or Conv2D"


def _is_weight_layer(layer) -> bool:
    return isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))


def _output_units(model: keras.Model) -> set[str]:
    """Names of the layers with weights whose units are a model output: reached from an
    output walking back through weightless layers (an activation such as softmax, a
    Reshape, ...). Their units are what the model returns, so no method removes them."""
    found, seen = set(), set()
    pending = list(model.outputs)
    while pending:
        tensor = pending.pop()
        history = getattr(tensor, "_keras_history", None)
        if history is None or id(history.operation) in seen:
            continue
        layer = history.operation
        seen.add(id(layer))
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if layer.weights and not isinstance(layer, keras.layers.BatchNormalization):
            found.add(layer.name)
            continue
        node = layer._inbound_nodes[history.node_index]
        pending.extend(node.input_tensors)
    return found


def _trace(
    model: keras.Model, layer, consumers: dict[str, list], outputs: set[str]
) -> _Unit | _Blocked:
    """Follows a Dense/Conv2D layer's channels to the weight layers that read them."""
    name = layer.name
    if name in outputs:
        return _Blocked(name, "output", "its units are the model's output (never pruned)")
    problem = _check_weight_layer(layer)
    if problem:  # Not a candidate; an error only if asked for by name.
        return _Blocked(name, "skipped", problem)
    output_ids = {id(t) for t in model.outputs}
    batch_norm = None
    activations = []
    own = activation_lib.label(layer.activation)
    if not activation_lib.is_elementwise(own):
        unchecked = activation_lib.unverifiable(own)
        reason = (
            f"its activation is {unchecked}"
            if unchecked
            else f"its activation {own!r} is not element-wise"
        )
        return _Blocked(name, "unsupported", reason)
    if own != "linear":
        activations.append(own)
    found: list[tuple[str, int]] = []
    channelwise: list[str] = []
    gates: list[str] = []
    # Depth-first over the layers that read the channels: (layer, flattened positions or 0).
    stack = [(layer, 0)]
    while stack:
        current, flat = stack.pop()
        if id(current.output) in output_ids:
            return _Blocked(name, "coupled", f"{current.name!r} is a model output")
        readers = consumers[current.name]
        if not readers:
            return _Blocked(name, "coupled", f"{current.name!r} has no consumer")
        for reader in readers:
            kind = type(reader).__name__
            if _is_weight_layer(reader):
                problem = _check_weight_layer(reader)
                if problem:
                    return _Blocked(name, "unsupported", problem)
                if flat and not isinstance(reader, keras.layers.Dense):
                    return _Blocked(
                        name, "unsupported", f"{reader.name!r} reads a Flatten but is not Dense"
                    )
                found.append((reader.name, max(flat, 1)))
            elif isinstance(reader, keras.layers.DepthwiseConv2D):
                if reader.depth_multiplier != 1 or reader.data_format != "channels_last":
                    return _Blocked(
                        name,
                        "unsupported",
                        f"DepthwiseConv2D {reader.name!r} has depth_multiplier="
                        f"{reader.depth_multiplier} / data_format={reader.data_format!r}",
                    )
                channelwise.append(reader.name)
                stack.append((reader, flat))
            elif (
                isinstance(reader, keras.layers.BatchNormalization)
                and channelwise
                and current.name == channelwise[-1]
                and len(readers) == 1
            ):  # a depthwise convolution's own BatchNorm
                channelwise.append(reader.name)
                stack.append((reader, flat))
            elif isinstance(reader, keras.layers.BatchNormalization):
                axis = reader.axis if isinstance(reader.axis, int) else reader.axis[0]
                rank = len(reader.input.shape)
                if axis not in (-1, rank - 1):
                    return _Blocked(
                        name, "unsupported", f"BatchNormalization {reader.name!r} has axis={axis}"
                    )
                if current is layer and len(readers) == 1 and not activations:
                    batch_norm = reader.name  # the layer's own BatchNorm
                else:  # a standalone one (DenseNet's, before each block): channel by channel
                    channelwise.append(reader.name)
                    activations.append(_STANDALONE_BATCH_NORM)
                stack.append((reader, flat))
            elif (activation := _activation_of(reader)) is not None:
                if activation != _CAPPED_RELU and not activation_lib.is_elementwise(activation):
                    unchecked = activation_lib.unverifiable(activation)
                    return _Blocked(
                        name,
                        "unsupported",
                        f"the activation of {reader.name!r} is {unchecked}"
                        if unchecked
                        else f"activation {activation!r} of {reader.name!r} is not element-wise",
                    )
                activations.append(activation)
                stack.append((reader, flat))
            elif isinstance(reader, keras.layers.Rescaling):
                if np.ndim(reader.scale) or np.ndim(reader.offset):
                    return _Blocked(
                        name, "unsupported", f"Rescaling {reader.name!r} is per-channel"
                    )
                if reader.offset or reader.scale <= 0:  # x·s + o: selection passes, scaling not
                    activations.append(_AFFINE)
                stack.append((reader, flat))
            elif isinstance(reader, keras.layers.Flatten):
                if reader.data_format != "channels_last":
                    return _Blocked(name, "unsupported", f"{reader.name!r} is not channels_last")
                shape = reader.input.shape[1:]
                positions = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
                stack.append((reader, flat or positions))
            elif isinstance(reader, _CHANNELWISE):
                if getattr(reader, "data_format", "channels_last") != "channels_last":
                    return _Blocked(name, "unsupported", f"{reader.name!r} is not channels_last")
                stack.append((reader, flat))
            elif (gate := _squeeze_excite_gate(reader, current, consumers)) is not None:
                gates.append(gate)  # its channel c scales channel c: it goes with it
                stack.append((reader, flat))
            elif isinstance(reader, _COUPLING):
                return _Blocked(
                    name, "coupled", f"its channels join others in {kind} {reader.name!r}"
                )
            else:
                return _Blocked(
                    name,
                    "unsupported",
                    f"its channels reach {kind} {reader.name!r}, which Neuron Merging cannot "
                    "trace through",
                )
    return _Unit(
        name=name,
        units=int(layer.units if isinstance(layer, keras.layers.Dense) else layer.filters),
        batch_norm=batch_norm,
        activations=tuple(activations),
        consumers=tuple(found),
        channelwise=tuple(channelwise),
        gates=tuple(gates),
    )


_GATE_PATH = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.Rescaling,
    keras.layers.Reshape,
)
"""Weightless layers between a squeeze-excite gate's Dense/Conv2D and its ``Multiply``."""


def _squeeze_excite_gate(multiply, current, consumers: dict) -> str | None:
    """The Dense/Conv2D writing the squeeze-excite gate that ``multiply`` applies to
    ``current``'s channels, or None when ``multiply`` is not such a gate.

    A gate is the other input of a two-input ``Multiply`` that broadcasts (B, 1, 1, C) over
    ``current``'s feature map, written by a Dense/Conv2D through activations, scalar
    ``Rescaling`` and ``Reshape`` only, each read by nothing else: its channel c scales
    channel c, so pruning channel c removes the gate's output c too.
    """
    if not isinstance(multiply, keras.layers.Multiply) or len(_inputs_of(multiply)) != 2:
        return None
    mine, other = sorted(_inputs_of(multiply), key=lambda t: t is not current.output)
    if mine is not current.output or all(d == 1 for d in mine.shape[1:-1]):
        return None
    if len(other.shape) != len(mine.shape) or any(d != 1 for d in other.shape[1:-1]):
        return None
    layer = other._keras_history.operation
    while isinstance(layer, _GATE_PATH) and len(consumers[layer.name]) == 1:
        layer = layer.input._keras_history.operation
    if not _is_weight_layer(layer) or len(consumers[layer.name]) != 1:
        return None
    return layer.name


def _read(model: keras.Model) -> dict[str, _Unit | _Blocked]:
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model. Received: {type(model).__name__}")
    zipped = [layer.name for layer in model.layers if isinstance(layer, _ZippedLayer)]
    if zipped:
        raise ValueError(
            f"Model {model.name!r} is a zipped multi-task model (layers {zipped[:3]} hold "
            "several tasks' neurons); Neuron Merging prunes ordinary Dense/Conv2D layers. "
            "Turn a fully zipped model into an ordinary multi-head model with "
            "`mtz_tf.zipped_network.multi_head_model(zipped)` first, or compress the input models."
        )
    if not model.built or not model.inputs:
        raise ValueError(f"Model {model.name!r} has no defined input; build it on an `Input`.")
    consumers = _consumer_map(model)
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            raise ValueError(
                f"Model {model.name!r} nests model {layer.name!r}; Neuron Merging needs a flat "
                "functional or Sequential model."
            )
    outputs = _output_units(model)
    return {
        layer.name: _trace(model, layer, consumers, outputs)
        for layer in model.layers
        if _is_weight_layer(layer) or isinstance(layer, _OTHER_WEIGHT_LAYERS)
    }


def prunable_layers(model: keras.Model) -> list[str]:
    """Names of the Dense/Conv2D layers :func:`compress` can prune, in model order.

    Excluded: output layers and layers whose channels meet others in a residual ``Add`` or a
    ``Concatenate`` (in a residual block only the inner conv qualifies, as in the reference
    code). Raises ``ValueError`` if a Dense/Conv2D leads into a layer that cannot be traced.
    """
    model = scalar_ops.as_layers(model)  # Keras-ops nodes read as layers
    units = _read(model)
    for entry in units.values():
        if isinstance(entry, _Blocked) and entry.kind == "unsupported":
            raise ValueError(f"Cannot prune layer {entry.name!r}: {entry.reason}.")
    return [name for name, entry in units.items() if isinstance(entry, _Unit)]


# --------------------------------------------------------------------------------------------
# The driver.


def _float(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


def _prune_fractions(model, units, prune_fraction) -> dict[str, float]:
    def check(name, r):
        if isinstance(r, bool) or not isinstance(r, (int, float, np.floating, np.integer)):
            raise TypeError(
                f"`prune_fraction` for layer {name!r} must be a number. Received: {r!r}"
            )
        if not 0.0 <= float(r) < 1.0:
            raise ValueError(
                f"`prune_fraction` for layer {name!r} must be in [0, 1) (the fraction of "
                f"neurons to remove). Received: prune_fraction={r}"
            )
        return float(r)

    if isinstance(prune_fraction, Mapping):
        out = {}
        for name, r in prune_fraction.items():
            entry = units.get(name)
            if entry is None:
                raise ValueError(
                    f"`prune_fraction` names layer {name!r}, which is not a Dense/Conv2D layer "
                    "of model "
                    f"{model.name!r}."
                )
            if isinstance(entry, _Blocked):
                raise ValueError(f"Cannot prune layer {name!r}: {entry.reason}.")
            out[name] = check(name, r)
        return out
    r = check("*", prune_fraction)
    for entry in units.values():
        if isinstance(entry, _Blocked) and entry.kind == "unsupported":
            raise ValueError(
                f"Cannot prune layer {entry.name!r}: {entry.reason}. Pass `prune_fraction` as "
                "a {layer name: fraction} dict that leaves it out."
            )
    return {name: r for name, entry in units.items() if isinstance(entry, _Unit)}


def _vectors(layer, bn) -> tuple[np.ndarray, np.ndarray]:
    """Neuron vectors (n, d) and the layer's bias (n,) (zeros without one)."""
    kernel = _float(layer.kernel.numpy())
    n = kernel.shape[-1]
    v = kernel.reshape(-1, n).T  # (n, fan_in)
    bias = _float(layer.bias.numpy()) if layer.use_bias else np.zeros(n)
    if bn is None and layer.use_bias:
        v = np.concatenate([v, bias[:, None]], axis=1)  # (n, fan_in + 1)
    return v, bias


def _bn_params(bn, n: int) -> tuple[np.ndarray, ...]:
    gamma = _float(bn.gamma.numpy()) if bn.scale else np.ones(n)
    beta = _float(bn.beta.numpy()) if bn.center else np.zeros(n)
    return gamma, beta, _float(bn.moving_mean.numpy()), _float(bn.moving_variance.numpy())


def _is_batch_norm(model: keras.Model, name: str) -> bool:
    return isinstance(model.get_layer(name), keras.layers.BatchNormalization)


def _fold_input(kernel: np.ndarray, z: np.ndarray, positions: int) -> np.ndarray:
    """Consumer kernel with its input channels n replaced by Z (k, n): K' = Z K per position.

    Dense kernels are (positions·n, q) with channels fastest (Keras Flatten order); Conv2D
    kernels are (h, w, n, q).
    """
    k, n = z.shape
    if kernel.ndim == 2:
        blocks = kernel.reshape(positions, n, -1)  # (positions, n, q)
        return np.einsum("kn,pnq->pkq", z, blocks).reshape(positions * k, -1)
    return np.einsum("kn,hwnq->hwkq", z, kernel)


def compress(
    model: keras.Model,
    prune_fraction: float | Mapping[str, float],
    criterion: str = "l1-norm",
    merge: bool = True,
    threshold: float | None = None,
    lamda: float = DEFAULT_LAMDA,
    scale: str = "reference",
) -> tuple[keras.Model, NeuronMergingReport]:
    """Prunes hidden Dense/Conv2D layers and (``merge=True``) folds pruned neurons into kept ones.

    See the module docstring for the mathematics. Every pruned layer keeps
    ``keep_count(n, prune_fraction)`` neurons chosen by ``criterion``; the layers reading its
    channels (directly, or through BatchNorm, activations, pooling, dropout, padding or a Flatten,
    where a channel owns one row per spatial position) get Z folded into their kernels. A
    depthwise convolution on the way (MobileNet's expand -> depthwise -> project) loses the
    pruned channels with its BatchNorm, and the layer after it is the consumer (prune only:
    ``merge=False``). Layers
    whose channels meet others in a residual ``Add``/``Concatenate`` and output layers are not
    pruned by a global fraction (:func:`prunable_layers` lists the candidates).

    Args:
        model: keras.Model, functional or Sequential, built; not modified.
        prune_fraction: float in [0, 1), the fraction of neurons to remove from every
            prunable layer, or {layer name: fraction} for some layers only.
        criterion: str, ``"l1-norm"``, ``"l2-norm"`` or ``"l2-GM"`` (:mod:`criteria`).
        merge: bool, fold pruned neurons into kept ones (Neuron Merging); False only prunes.
        threshold: float or None, least cosine similarity to merge a pair. None uses the
            reference scripts' values: 0.45 for layers without BatchNorm (LeNet-300-100), 0.1
            for layers followed by BatchNorm (VGG-16, ResNet-56). 0 merges every pruned neuron.
        lamda: float in [0, 1], λ of the BatchNorm variant (weight of the cosine distance).
        scale: str, ``"reference"`` (the reference code's BatchNorm slope, needed to reproduce
            published numbers) or ``"exact"`` (s·(γ_i/γ_j)·(σ_j/σ_i)); both are ||v_i||/||v_j||
            for layers without BatchNorm.
    Returns:
        ``(model, report)``: a new, physically smaller keras.Model, and a
        :class:`NeuronMergingReport`.

    Raises:
        ValueError: a fraction outside [0, 1); unknown criterion/scale; a named layer that cannot be
            pruned; a layer whose channels reach a layer that cannot be traced; ``merge=True``
            through an activation that is not positively homogeneous (merging would not be
            exact: use ``merge=False`` there).
        TypeError: ``model`` is not a keras.Model, or a fraction is not a number.
    """
    if criterion not in criteria_lib.CRITERIA:
        raise ValueError(
            f"`criterion` must be one of {criteria_lib.CRITERIA}. Received: criterion={criterion!r}"
        )
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {SCALES}. Received: scale={scale!r}")
    if not 0.0 <= lamda <= 1.0:
        raise ValueError(f"`lamda` must be in [0, 1]. Received: lamda={lamda}")
    model = scalar_ops.as_layers(model)  # Keras-ops nodes read as layers
    units = _read(model)
    fractions = _prune_fractions(model, units, prune_fraction)

    plans: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (keep, Z)
    reports = []
    for name, r in fractions.items():
        unit = units[name]
        if merge:
            bad = [a for a in unit.activations if a not in HOMOGENEOUS_ACTIVATIONS]
            if bad:
                raise ValueError(
                    f"Cannot merge neurons of layer {name!r}: its activation {bad[0]!r} is not "
                    f"positively homogeneous (f(z·t) = z·f(t) for z > 0), so folding a pruned "
                    f"neuron into a kept one would not be exact. Merging supports "
                    f"{sorted(HOMOGENEOUS_ACTIVATIONS)}; use merge=False to prune only."
                )
            if unit.gates:
                raise ValueError(
                    f"Cannot merge neurons of layer {name!r}: squeeze-excite gate "
                    f"{unit.gates[0]!r} scales each of its channels by its own factor, so a "
                    "pruned channel is not a multiple of a kept one after it. Use merge=False "
                    "to prune such layers (the gate's outputs go with them)."
                )
            depthwise = [c for c in unit.channelwise if not _is_batch_norm(model, c)]
            if depthwise:
                raise ValueError(
                    f"Cannot merge neurons of layer {name!r}: its channels pass through "
                    f"DepthwiseConv2D {depthwise[0]!r}, which filters each channel with its own "
                    "kernel, so a pruned channel is not a multiple of a kept one after it. Use "
                    "merge=False to prune such layers (the depthwise channels go with them)."
                )
        layer = model.get_layer(name)
        bn = model.get_layer(unit.batch_norm) if unit.batch_norm else None
        vectors, bias = _vectors(layer, bn)
        keep = criteria_lib.select(vectors, keep_count(unit.units, r), criterion)
        if not merge:
            z = _selection(unit.units, keep)
        elif bn is None:
            t = DEFAULT_THRESHOLD if threshold is None else threshold
            z = merge_matrix(vectors, keep, t)
        else:
            gamma, beta, mean, variance = _bn_params(bn, unit.units)
            t = DEFAULT_THRESHOLD_BN if threshold is None else threshold
            z = merge_matrix_bn(
                vectors, keep, gamma, beta, mean - bias, variance, bn.epsilon, t, lamda, scale
            )
        plans[name] = (keep, z)
        merged = int(np.count_nonzero(z)) - len(keep)
        reports.append(PrunedLayer(name, unit.units, len(keep), merged, unit.batch_norm))

    # Consumer folds and output slices commute, so each layer is updated once from originals.
    weights: dict[str, list[np.ndarray]] = {}
    widths: dict[str, int] = {}
    dtypes: dict[str, list[np.dtype]] = {}

    def current(layer_name):
        if layer_name not in weights:
            arrays = model.get_layer(layer_name).get_weights()
            dtypes[layer_name] = [w.dtype for w in arrays]
            weights[layer_name] = [_float(w) for w in arrays]
        return weights[layer_name]

    for name, (keep, z) in plans.items():
        unit = units[name]
        own = current(name)
        own[0] = own[0][..., keep]
        if len(own) > 1:
            own[1] = own[1][keep]
        if unit.batch_norm:
            weights[unit.batch_norm] = [w[keep] for w in current(unit.batch_norm)]
        for channel_layer in unit.channelwise:
            if _is_batch_norm(model, channel_layer):
                weights[channel_layer] = [w[keep] for w in current(channel_layer)]
            else:  # depthwise kernel (kh, kw, C, 1), bias (C,)
                arrays = current(channel_layer)
                weights[channel_layer] = [arrays[0][..., keep, :]] + [b[keep] for b in arrays[1:]]
        for gate in unit.gates:
            arrays = current(gate)
            weights[gate] = [arrays[0][..., keep]] + [b[keep] for b in arrays[1:]]
            widths[gate] = len(keep)
        for consumer, positions in unit.consumers:
            kernel_and_bias = current(consumer)
            kernel_and_bias[0] = _fold_input(kernel_and_bias[0], z, positions)
    widths.update({name: len(keep) for name, (keep, _) in plans.items()})
    cast = {
        name: [w.astype(dtype) for w, dtype in zip(ws, dtypes[name], strict=True)]
        for name, ws in weights.items()
    }
    new_model = surgery.rebuild(model, widths, cast)
    report = NeuronMergingReport(
        criterion, merge, int(model.count_params()), int(new_model.count_params()), reports
    )
    return new_model, report

"""ISTA channel pruning on BatchNorm scales (Ye, Lu, Lin, Wang, ICLR 2018).

A layer computes x_{l+1} = ReLU(gamma_l * BN(W_l * x_l) + beta_l). Training minimises

    loss(W, gamma, beta) + rho * sum_l lambda_l * ||gamma_l||_1

with an ordinary SGD(+momentum) step on every parameter except gamma, and for gamma a plain
(momentum-free) proximal gradient step, the ISTA update

    gamma <- soft_threshold(gamma - mu_t * grad, mu_t * rho * lambda_l),
    soft_threshold(x, t) = sign(x) * max(|x| - t, 0),

mu_t being the current learning rate. A channel whose gamma is exactly zero outputs the
constant ReLU(beta) whatever the input (the BatchNorm statistics no longer matter); that
constant is pushed through ReLU, pooling and residual ``Add`` layers and absorbed into the
layers that read the channel, after which the channel is removed for real
(:func:`remove_zero_channels`). The gamma-W rescaling trick (:func:`rescale_gamma`) and
fine-tuning with rho = 0 (:func:`fine_tune`) complete the method; :func:`ista_prune` runs
the whole pipeline.

Reference: J. Ye, X. Lu, Z. Lin, J. Z. Wang, "Rethinking the Smaller-Norm-Less-Informative
Assumption in Channel Pruning of Convolution Layers", ICLR 2018.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from mtz_tf import data, fitting, retrain, scalar_ops, training
from mtz_tf.compress import bn_graph, flops, surgery
from mtz_tf.report import Report


def soft_threshold(x, threshold):
    """The proximal operator of ``threshold * ||x||_1``: sign(x) * max(|x| - threshold, 0).

    Args:
        x: tensor or array of any shape.
        threshold: non-negative scalar or tensor broadcastable to ``x``.

    Returns:
        A tensor of ``x``'s shape and dtype; entries with |x| <= threshold are exactly 0.
    """
    return ops.sign(x) * ops.maximum(ops.abs(x) - threshold, 0.0)


def _require_bn(model: keras.Model, graph: bn_graph.BNGraph) -> None:
    if not graph.groups:
        raise ValueError(
            f"ISTA needs BatchNorm scales (gamma) to prune, but model {model.name!r} has no "
            "BatchNormalization layer with `scale=True`. Add Conv2D/Dense -> "
            "BatchNormalization -> activation blocks (e.g. `mtz_tf.models.vgg16`)."
        )
    if not graph.prunable_groups:
        reasons = "; ".join(g.reason for g in graph.groups)
        raise ValueError(
            f"ISTA needs BatchNorm scales (gamma) of prunable channels, but no BatchNorm of "
            f"model {model.name!r} writes channels that can be removed: {reasons}."
        )


def memory_lambdas(model: keras.Model) -> dict[str, float]:
    """Per-layer penalty weights lambda_l, the authors' "memory" cost of one channel.

    For a BatchNorm l after a producer with a k_h x k_w kernel on C_in input channels and an
    H_out x W_out output, read by consumers r (each with a k_h^r x k_w^r kernel and C_out^r
    outputs)::

        lambda_l = [H_out * W_out + k_h * k_w * C_in + sum_r k_h^r * k_w^r * C_out^r] / (H * W)

    where H x W is the model input's spatial size: the activation memory plus the weights
    attached to one channel, per input pixel. A ``Dense`` producer counts as 1 x 1 with
    C_in = its input size; a ``Dense`` consumer reading through ``Flatten`` attaches
    (H' * W') * units weights to a channel (H' x W' the flattened map). In a residual stream
    every BatchNorm adding into it has the stream's consumers. lambda_l = 0 for the last
    layer: a BatchNorm whose channels are read only by the model's output layer(s).

    Args:
        model: keras.Model with BatchNorm layers (see :func:`bn_graph.read_bn_graph`).

    Returns:
        {BatchNorm layer name: lambda_l} for every BatchNorm whose channels can be removed.

    Raises:
        ValueError: if the model has no BatchNorm scale to prune.
    """
    model = scalar_ops.as_layers(model)  # Keras-ops nodes read as layers
    graph = bn_graph.read_bn_graph(model)
    _require_bn(model, graph)
    lambdas = {}
    for group in graph.prunable_groups:
        last = all(r.name in graph.output_layers for r in group.readers)
        consumers = 0
        for r in group.readers:
            kernel_shape = model.get_layer(r.name).kernel.shape
            if len(kernel_shape) == 4:  # Conv2D (k_h, k_w, C_in, C_out)
                consumers += kernel_shape[0] * kernel_shape[1] * kernel_shape[3]
            else:  # Dense (rows, units)
                consumers += r.rows_per_channel * kernel_shape[1]
        for w in group.writers:
            producer = model.get_layer(w.producer)
            kernel_shape = producer.kernel.shape
            fan_in = int(np.prod(kernel_shape[:-1]))  # k_h * k_w * C_in, or Dense inputs
            out_shape = producer.output.shape
            spatial = int(np.prod(out_shape[1:-1])) if len(out_shape) > 2 else 1
            cost = (spatial + fan_in + consumers) / graph.input_spatial_size
            lambdas[w.bn] = 0.0 if last else float(cost)
    return lambdas


def _is_number(value) -> bool:
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.number))


def _check_number(label: str, value, expected: str) -> None:
    if not _is_number(value):
        raise TypeError(
            f"`{label}` must be {expected}. Received: {label}={value!r} of type "
            f"{type(value).__name__}"
        )


@keras.saving.register_keras_serializable(package="mtz_tf")
class ISTASGD(keras.optimizers.SGD):
    """SGD (with momentum) whose BatchNorm scales take momentum-free ISTA steps instead.

    Every variable except the listed BatchNorm gammas gets the ordinary
    ``keras.optimizers.SGD`` update. A gamma of BatchNorm layer l gets

        gamma <- sign(z) * max(|z| - mu_t * rho * lambda_l, 0),  z = gamma - mu_t * grad,

    mu_t being the current (possibly scheduled) learning rate: the proximal step of
    ``rho * lambda_l * ||gamma||_1``, without momentum, as in the authors' code. Gammas are
    also excluded from weight decay. Works with ``model.fit`` and ``tf.distribute``.

    Args:
        lambdas: dict {BatchNorm layer name: lambda_l >= 0}, e.g. from :func:`memory_lambdas`.
        rho: float >= 0, the global sparsity strength.
        learning_rate: float or schedule, mu_t.
        momentum: float, momentum of the non-gamma variables.
        nesterov: bool, Nesterov momentum for the non-gamma variables.
        name: str.
        **kwargs: other ``keras.optimizers.Optimizer`` arguments (``weight_decay``, ...).

    Example:
        >>> model.compile(optimizer=ISTASGD(memory_lambdas(model), rho=1e-3), loss=...)

    Reference: Ye et al., ICLR 2018, Sec. 4.
    """

    def __init__(
        self,
        lambdas: Mapping[str, float],
        rho: float,
        learning_rate=0.01,
        momentum: float = 0.9,
        nesterov: bool = False,
        name: str = "ista_sgd",
        **kwargs,
    ):
        if not isinstance(lambdas, Mapping):
            raise TypeError(
                f"`lambdas` must be a dict {{BatchNorm name: lambda}}. Received: {lambdas!r}"
            )
        _check_number("rho", rho, "a non-negative float")
        if not 0 <= rho < math.inf:
            raise ValueError(f"`rho` must be non-negative and finite. Received: rho={rho}")
        _check_number("momentum", momentum, "a float in [0, 1)")
        if not 0 <= momentum < 1:
            raise ValueError(f"`momentum` must be in [0, 1). Received: momentum={momentum}")
        # A LearningRateSchedule is callable, like the step-to-rate callables Keras takes.
        if not _is_number(learning_rate) and not callable(learning_rate):
            raise TypeError(
                "`learning_rate` must be a positive float, a "
                "`keras.optimizers.schedules.LearningRateSchedule` or a callable. Received: "
                f"learning_rate={learning_rate!r} of type {type(learning_rate).__name__}"
            )
        if _is_number(learning_rate) and not 0 < learning_rate < math.inf:
            raise ValueError(
                f"`learning_rate` must be a positive float. Received: learning_rate={learning_rate}"
            )
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(
                f"`nesterov` must be a bool. Received: nesterov={nesterov!r} of type "
                f"{type(nesterov).__name__}"
            )
        bad = {k: v for k, v in lambdas.items() if not _is_number(v)}
        if bad:
            raise TypeError(f"`lambdas` values must be floats. Received: {bad}")
        negative = {k: v for k, v in lambdas.items() if not float(v) >= 0}
        if negative:
            raise ValueError(f"`lambdas` must be non-negative. Received: {negative}")
        infinite = {k: v for k, v in lambdas.items() if not math.isfinite(float(v))}
        if infinite:
            raise ValueError(f"`lambdas` must be finite. Received: {infinite}")
        if _is_number(learning_rate):
            learning_rate = float(learning_rate)  # Keras takes Python floats only
        super().__init__(
            learning_rate=learning_rate,
            momentum=float(momentum),
            nesterov=bool(nesterov),
            name=name,
            **kwargs,
        )
        self.lambdas = {str(k): float(v) for k, v in lambdas.items()}
        self.rho = float(rho)
        self._gamma_penalties: dict = {}

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        found = set()
        for v in variables:
            parts = v.path.split("/")
            if len(parts) >= 2 and parts[-1] == "gamma" and parts[-2] in self.lambdas:
                self._gamma_penalties[self._var_key(v)] = self.rho * self.lambdas[parts[-2]]
                found.add(parts[-2])
        missing = sorted(set(self.lambdas) - found)
        if missing:
            raise ValueError(
                f"`lambdas` names BatchNorm layers {missing} whose trainable `gamma` is not "
                "among the variables being optimised."
            )

    def update_step(self, gradient, variable, learning_rate):
        penalty = self._gamma_penalties.get(self._var_key(variable))
        if penalty is None:
            return super().update_step(gradient, variable, learning_rate)
        lr = ops.cast(learning_rate, variable.dtype)
        z = variable - lr * ops.cast(gradient, variable.dtype)
        self.assign(variable, soft_threshold(z, lr * penalty))

    def _use_weight_decay(self, variable):
        if self._var_key(variable) in self._gamma_penalties:
            return False
        return super()._use_weight_decay(variable)

    def get_config(self):
        config = super().get_config()
        config.update({"lambdas": dict(self.lambdas), "rho": self.rho})
        return config


def _named_weights(layer) -> dict[str, np.ndarray]:
    return {v.path.split("/")[-1]: np.array(v.numpy()) for v in layer.weights}


def _ordered(layer, named: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return [named[v.path.split("/")[-1]] for v in layer.weights]


def _copy_with(model: keras.Model, named: Mapping[str, Mapping[str, np.ndarray]]):
    """A new model like ``model`` with the given {layer: {weight name: array}} weights."""
    weights = {name: _ordered(model.get_layer(name), w) for name, w in named.items()}
    return surgery.rebuild(model, {}, weights)


def rescale_gamma(model: keras.Model, alpha: float) -> keras.Model:
    """The gamma-W rescaling trick: returns a function-identical model with gammas times alpha.

    In every prunable channel group (see :mod:`mtz_tf.compress.bn_graph`) each writing
    BatchNorm gets gamma <- alpha * gamma and beta <- alpha * beta, so its output is scaled by
    alpha; ReLU, pooling and Add are positively homogeneous, so the whole group's tensors are
    scaled by alpha; every reading layer's kernel gets W <- W / alpha, which cancels it.
    (Scaling gamma alone would not do: beta must follow for ReLU(alpha*y) = alpha*ReLU(y).)
    A small alpha (about 0.01) makes the gammas of a pre-trained model small, so ISTA
    sparsifies them quickly; ``rescale_gamma(pruned, 1 / alpha)`` undoes it after pruning.

    Args:
        model: keras.Model; not modified.
        alpha: float > 0.

    Returns:
        A new model computing the same function up to float rounding.

    Raises:
        ValueError: for alpha <= 0, a model without BatchNorm scales, or a prunable group
            containing a non-homogeneous activation (e.g. sigmoid).
    """
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"`alpha` must be a positive finite number. Received: alpha={alpha}")
    model = scalar_ops.as_layers(model)  # Keras-ops nodes read as layers
    graph = bn_graph.read_bn_graph(model)
    _require_bn(model, graph)
    named = {}
    for group in graph.prunable_groups:
        culprit = bn_graph.is_homogeneous(model, group)
        if culprit is not None:
            raise ValueError(
                f"gamma-W rescaling needs positively homogeneous layers (ReLU, linear, pooling, "
                f"Add) after the BatchNorms, but {culprit!r} is not. Use alpha=1."
            )
        for w in group.writers:
            weights = _named_weights(model.get_layer(w.bn))
            for key in ("gamma", "beta"):
                if key in weights:
                    weights[key] = weights[key] * np.float32(alpha)
            named[w.bn] = weights
        for r in group.readers:
            weights = _named_weights(model.get_layer(r.name))
            weights["kernel"] = weights["kernel"] / np.float32(alpha)
            named[r.name] = weights
    return _copy_with(model, named)


def group_constants(
    model: keras.Model, group: bn_graph.ChannelGroup, parents: Mapping[str, tuple]
) -> dict[str, np.ndarray]:
    """The value every channel of ``group`` would take if all its gammas were zero.

    A writing BatchNorm with gamma = 0 outputs beta (0 without ``center``). Element-wise
    activations are applied to that constant, pooling/Flatten/Dropout keep it, and ``Add``
    sums the constants of its inputs. Only the entries of channels whose gammas are all zero
    are meaningful.

    Returns:
        {member layer name: float64 array (C,)}.
    """
    writers = {w.bn for w in group.writers}
    constants: dict[str, np.ndarray] = {}
    for m in group.members:
        layer = model.get_layer(m)
        if m in writers:
            beta = layer.beta.numpy() if layer.center else np.zeros(group.width)
            constants[m] = np.asarray(beta, np.float64)
        elif isinstance(layer, keras.layers.Add):
            constants[m] = np.sum([constants[p] for p in parents[m]], axis=0)
        elif bn_graph.member_activation(layer) is not None:
            value = layer(np.asarray(constants[parents[m][0]], np.float32)[None])
            constants[m] = np.asarray(value, np.float64)[0]
        else:
            constants[m] = constants[parents[m][0]]
    return constants


_ABSORPTIONS = ("interior", "mean")


def tap_coverage(size: int, kernel: int, stride: int, dilation: int, padding: str) -> np.ndarray:
    """Fraction of output positions at which each kernel tap falls inside the input.

    Along one axis of length n, output i and tap t read input i*s + t*d - p_before, with
    m = ceil(n / s) outputs and p_before = max((m-1)*s + (k-1)*d + 1 - n, 0) // 2 for
    ``same`` padding (TensorFlow's convention); every tap is always inside for ``valid``.

    Returns:
        float64 array (kernel,), entries in [0, 1].
    """
    if padding == "valid":
        return np.ones(kernel)
    outputs = -(-size // stride)
    pad_before = max((outputs - 1) * stride + (kernel - 1) * dilation + 1 - size, 0) // 2
    index = (
        np.arange(outputs)[:, None] * stride + np.arange(kernel)[None, :] * dilation - pad_before
    )  # (outputs, kernel)
    return ((index >= 0) & (index < size)).mean(axis=0)


def _kernel_per_channel(
    layer, kernel: np.ndarray, rows_per_channel: int, width: int, absorption: str
) -> np.ndarray:
    """Sums a reader's kernel over everything but (input channel, output): shape (C, out).

    Conv2D (k_h, k_w, C, out) sums over k_h, k_w, each tap weighted by 1 ("interior") or by
    the fraction of output positions where it lies inside the zero-padded input ("mean");
    a Dense reading through Flatten has rows ordered (position, channel),
    (P*C, out) -> (P, C, out), summed over P.
    """
    if kernel.ndim == 2:
        return kernel.reshape(rows_per_channel, width, kernel.shape[-1]).sum(axis=0)
    if absorption == "interior":
        return kernel.sum(axis=(0, 1))
    height, width_in = layer.input.shape[1:3]
    coverage = [
        tap_coverage(n, k, s, d, layer.padding)
        for n, k, s, d in zip(
            (height, width_in), kernel.shape[:2], layer.strides, layer.dilation_rate, strict=True
        )
    ]
    weights = np.outer(*coverage)  # (k_h, k_w): rows and columns are valid independently
    return np.einsum("hw,hwco->co", weights, kernel)


def _slice_kernel_inputs(kernel, keep, rows_per_channel, width):
    if kernel.ndim == 4:
        return kernel[:, :, keep, :]
    per_position = kernel.reshape(rows_per_channel, width, kernel.shape[-1])  # (P, C, out)
    return per_position[:, keep, :].reshape(rows_per_channel * len(keep), kernel.shape[-1])


def _with_bias(model: keras.Model, names: set[str]) -> keras.Model:
    """A function-identical copy of ``model`` where the named layers get a zero bias."""
    config = model.get_config()
    for layer_config in config["layers"]:
        layer_config.pop("build_config", None)
        if layer_config["config"]["name"] in names:
            layer_config["config"]["use_bias"] = True
    new_model = model.__class__.from_config(config)
    for layer in new_model.layers:
        old = model.get_layer(layer.name)
        if layer.name in names:
            layer.set_weights([old.kernel.numpy(), np.zeros(layer.bias.shape, np.float32)])
        else:
            layer.set_weights(old.get_weights())
    return new_model


def remove_zero_channels(
    model: keras.Model, tolerance: float = 0.0, absorption: str = "interior"
) -> keras.Model:
    """Returns a physically smaller model without the channels whose gammas are all zero.

    Channel c of a prunable group is removed when |gamma_w[c]| <= ``tolerance`` for every
    BatchNorm w writing into the group (for a residual stream: every block adding into it).
    Its producers lose filter c (kernel output c, bias c, BatchNorm entries c); its readers
    lose input channel c, and the constant k_c it carries (:func:`group_constants`) is
    absorbed into each reader r: with K_r summed over kernel positions (and flattened
    positions),

        a_j = sum_{c removed} k_c * sum_{kh,kw} K_r[kh, kw, c, j],

    added to r's bias, or (r without bias, followed by a BatchNorm) subtracted from that
    BatchNorm's moving mean; a reader with neither gets a bias. This is exact for ``valid``
    convolutions, 1x1 convolutions and ``Dense`` readers (through Flatten or global pooling).
    For a k x k ``same``-padded reader it is exact only away from the zero-padded border: at
    border pixels the padding never carried the constant, so those pixels change unless the
    constant is 0 (ReLU(beta) = 0 for beta <= 0, then nothing is absorbed). On small maps
    (VGG's 2x2 and 4x4 stages) nearly every pixel is a border pixel; ``absorption="mean"``
    then weights each tap by the fraction of output positions where it lies inside the input
    (:func:`tap_coverage`), which is the least-squares bias: the error averages to zero over
    positions instead of vanishing in the interior. Identical for ``valid``/1x1 readers.
    BatchNorm recalibration and fine-tuning repair the rest. A group whose channels would
    all go keeps channel 0 (a constant).

    Args:
        model: keras.Model with BatchNorm scales; not modified.
        tolerance: float >= 0, gammas with |gamma| <= tolerance count as zero (0: exact
            zeros, which the ISTA step produces).
        absorption: str, ``"interior"`` (exact away from zero-padded borders) or ``"mean"``
            (zero mean error over positions) for same-padded convolution readers.

    Returns:
        A new, smaller model (``count_params`` reflects the removal).

    Raises:
        ValueError: for a negative tolerance, an unknown ``absorption``, or a model without
            BatchNorm scales to prune.
    """
    if not tolerance >= 0:
        raise ValueError(f"`tolerance` must be non-negative. Received: tolerance={tolerance}")
    if absorption not in _ABSORPTIONS:
        raise ValueError(
            f"`absorption` must be one of {_ABSORPTIONS}. Received: absorption={absorption!r}"
        )
    model = scalar_ops.as_layers(model)  # Keras-ops nodes read as layers
    graph = bn_graph.read_bn_graph(model)
    _require_bn(model, graph)
    named: dict[str, dict[str, np.ndarray]] = {}

    def weights_of(name):
        if name not in named:
            named[name] = _named_weights(model.get_layer(name))
        return named[name]

    keep_out: dict[str, np.ndarray] = {}
    keep_in: dict[str, tuple] = {}
    absorbed: dict[str, np.ndarray] = {}
    for group in graph.prunable_groups:
        gammas = np.stack([weights_of(w.bn)["gamma"] for w in group.writers])  # (n_w, C)
        removed = np.all(np.abs(gammas) <= tolerance, axis=0)
        if removed.all():
            removed[0] = False
        if not removed.any():
            continue
        keep = np.flatnonzero(~removed)
        constants = group_constants(model, group, graph.parents)
        for w in group.writers:
            weights_of(w.producer)
            keep_out[w.producer] = keep
            keep_out[w.bn] = keep
        for r in group.readers:
            kernel = weights_of(r.name)["kernel"]
            k = np.where(removed, constants[r.member], 0.0)  # (C,)
            per_channel = _kernel_per_channel(
                model.get_layer(r.name),
                kernel.astype(np.float64),
                r.rows_per_channel,
                group.width,
                absorption,
            )
            absorbed[r.name] = absorbed.get(r.name, 0.0) + k @ per_channel  # (out,)
            keep_in[r.name] = (keep, r.rows_per_channel, group.width)

    needs_bias = set()
    for name, a in absorbed.items():
        layer = model.get_layer(name)
        children = [c for c, ps in graph.parents.items() if name in ps]
        if layer.use_bias:
            weights_of(name)["bias"] = (weights_of(name)["bias"] + a).astype(np.float32)
        elif len(children) == 1 and isinstance(
            model.get_layer(children[0]), keras.layers.BatchNormalization
        ):
            bn = weights_of(children[0])
            bn["moving_mean"] = (bn["moving_mean"] - a).astype(np.float32)
        else:
            needs_bias.add(name)
            weights_of(name)["bias"] = a.astype(np.float32)

    for name, weights in named.items():
        if name in keep_in:
            weights["kernel"] = _slice_kernel_inputs(weights["kernel"], *keep_in[name])
        if name in keep_out:
            keep = keep_out[name]
            for key, value in weights.items():
                weights[key] = value[..., keep] if key == "kernel" else value[keep]
    source = _with_bias(model, needs_bias) if needs_bias else model
    widths = {
        w.producer: len(keep_out[w.producer])
        for g in graph.prunable_groups
        for w in g.writers
        if w.producer in keep_out
    }
    return surgery.rebuild(
        source,
        widths,
        {name: _ordered(source.get_layer(name), w) for name, w in named.items()},
    )


def bn_channel_counts(model: keras.Model) -> dict[str, dict[str, int]]:
    """{BatchNorm name: {"channels": C, "nonzero": #(gamma != 0)}} for every scaled BatchNorm."""
    counts = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization) and layer.scale:
            gamma = layer.gamma.numpy()
            counts[layer.name] = {
                "channels": int(gamma.size),
                "nonzero": int(np.count_nonzero(gamma)),
            }
    return counts


def recalibrate_batchnorm(
    model: keras.Model, dataset: tf.data.Dataset, examples: int = 2000
) -> None:
    """Resets every BatchNorm's moving mean and variance, in place, to batch statistics.

    One training-mode forward pass over the first ``examples`` inputs of ``dataset`` (a
    batched tf.data.Dataset of inputs or of (inputs, labels)) with every BatchNorm's momentum
    set to 0 makes moving_mean/moving_variance the exact statistics of that batch (each
    layer seeing its inputs normalised by the layers before it, as in training). ISTA drives
    many channels to constants, which leaves some BatchNorms with tiny variances; a moving
    average (momentum 0.99) that lags a fast-changing network then breaks inference-mode
    accuracy (we measured chance level on VGG-16, and 87% after this reset). Also repairs
    the statistics after a border-inexact removal.
    """
    if examples <= 0:
        raise ValueError(f"`examples` must be positive. Received: examples={examples}")
    inputs = data.dataset_inputs(
        dataset, tuple(model.input_shape[1:]), f"model {model.name!r}", "recalibration data"
    )
    x = data.first_inputs(inputs, examples, "recalibration data")
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [bn.momentum for bn in bns]
    try:
        for bn in bns:
            bn.momentum = 0.0
        model(x, training=True)
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum


def _check_labelled(model: keras.Model, dataset, what: str) -> None:
    """``dataset`` is a batched tf.data.Dataset of (inputs of the model's shape, class
    indices), checked from its element_spec before any work."""
    data.dataset_inputs(dataset, tuple(model.input_shape[1:]), f"model {model.name!r}", what)
    retrain.check_labelled_data(dataset, model.name, what, labels="sparse")


def _fit_steps(model, optimizer, train, steps, seed, verbose):
    _check_labelled(model, train, "training data")
    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return fitting.fit(model, train.repeat().take(int(steps)), verbose=verbose)


def train_sparse(
    model: keras.Model,
    train: tf.data.Dataset,
    *,
    rho: float,
    steps: int,
    learning_rate: float = 0.01,
    momentum: float = 0.9,
    seed: int = 0,
    verbose: int = 0,
) -> keras.callbacks.History:
    """Trains ``model`` in place for ``steps`` steps with :class:`ISTASGD` and
    :func:`memory_lambdas` (loss + rho * sum_l lambda_l ||gamma_l||_1) on ``train``, a
    batched tf.data.Dataset of (inputs, class indices), repeated as needed."""
    optimizer = ISTASGD(memory_lambdas(model), rho, learning_rate=learning_rate, momentum=momentum)
    return _fit_steps(model, optimizer, train, steps, seed, verbose)


def fine_tune(
    model: keras.Model,
    train: tf.data.Dataset,
    *,
    steps: int,
    learning_rate: float = 0.01,
    momentum: float = 0.9,
    seed: int = 0,
    verbose: int = 0,
) -> keras.callbacks.History | None:
    """Fine-tunes ``model`` in place for ``steps`` SGD steps (rho = 0) on ``train``, a
    batched tf.data.Dataset of (inputs, class indices); None when steps = 0."""
    if steps <= 0:
        return None
    optimizer = keras.optimizers.SGD(learning_rate, momentum=momentum)
    return _fit_steps(model, optimizer, train, steps, seed, verbose)


@dataclasses.dataclass
class ISTAReport(Report):
    """What :func:`ista_prune` did (``to_dict()``/``to_json()``, the pattern of
    :class:`mtz_tf.report.Report`).

    Attributes:
        rho, alpha, steps, fine_tune_steps: the settings used.
        params_before, params_after: int, ``count_params`` of the input and pruned models.
        flops_before, flops_after: int, multiply-accumulates per example
            (:func:`mtz_tf.compress.flops.count_flops`).
        channels: {BatchNorm name: [channels before, channels after]}.
        sparse_train_loss: float, training loss at the end of the ISTA phase.
        validation_accuracy: {stage: accuracy} on the ``validation`` data when given:
            "input", "sparse" (after ISTA and BN recalibration, before removal), "removed"
            (after removal and undoing the rescaling, before recalibration), "fine_tuned".
    """

    rho: float
    alpha: float
    steps: int
    fine_tune_steps: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    channels: dict
    sparse_train_loss: float
    validation_accuracy: dict = dataclasses.field(default_factory=dict)


def ista_prune(
    model: keras.Model,
    train: tf.data.Dataset,
    *,
    rho: float,
    steps: int,
    fine_tune_steps: int,
    alpha: float = 1.0,
    learning_rate: float = 0.01,
    fine_tune_learning_rate: float | None = None,
    momentum: float = 0.9,
    seed: int = 0,
    absorption: str = "interior",
    recalibration_examples: int = 2000,
    validation: tf.data.Dataset | None = None,
    verbose: int = 0,
) -> tuple[keras.Model, ISTAReport]:
    """The whole method: rescale gammas by alpha, ISTA-train, remove zero channels, undo the
    rescaling, fine-tune with rho = 0 (BatchNorm statistics recalibrated after each stage).

    Args:
        model: keras.Model (logits output) with BatchNorm scales; not modified.
        train: batched tf.data.Dataset of (inputs, class indices), shuffled as you like
            (e.g. ``mtz_tf.data.to_dataset(x, y, shuffle=True)``); repeated as needed.
        rho: float, global sparsity strength.
        steps: int, ISTA training steps (batches).
        fine_tune_steps: int, fine-tuning steps after removal.
        alpha: float, gamma-W rescaling factor (1 from scratch, about 0.01 pre-trained).
        learning_rate: float, SGD learning rate of the ISTA phase (mu_t).
        fine_tune_learning_rate: float or None (None: ``learning_rate``).
        momentum: float, SGD momentum of the non-gamma variables.
        seed: int, seeds Keras (the fine-tuning phase uses ``seed + 1``).
        absorption: str, see :func:`remove_zero_channels`.
        recalibration_examples: int, training examples used by
            :func:`recalibrate_batchnorm` (read from ``train``) after ISTA, after removal
            and after fine-tuning (0: never).
        validation: optional batched tf.data.Dataset of (inputs, class indices);
            accuracies after each stage go into the report.
        verbose: int, Keras progress verbosity.

    Returns:
        ``(pruned_model, report)``: a new, physically smaller model and an :class:`ISTAReport`.
    """
    _check_labelled(model, train, "training data")
    if validation is not None:
        _check_labelled(model, validation, "validation data")
    accuracies = {}

    def evaluate(stage, m):
        if validation is not None:
            accuracies[stage] = training.dataset_accuracy(m, validation)

    evaluate("input", model)
    sparse = rescale_gamma(model, alpha)
    history = train_sparse(
        sparse,
        train,
        rho=rho,
        steps=steps,
        learning_rate=learning_rate,
        momentum=momentum,
        seed=seed,
        verbose=verbose,
    )

    def recalibrate(m):
        if recalibration_examples > 0:
            recalibrate_batchnorm(m, train, recalibration_examples)

    recalibrate(sparse)
    evaluate("sparse", sparse)
    pruned = rescale_gamma(remove_zero_channels(sparse, absorption=absorption), 1.0 / alpha)
    evaluate("removed", pruned)  # before recalibration: shows the border effect alone
    recalibrate(pruned)
    fine_tune(
        pruned,
        train,
        steps=fine_tune_steps,
        learning_rate=learning_rate if fine_tune_learning_rate is None else fine_tune_learning_rate,
        momentum=momentum,
        seed=seed + 1,
        verbose=verbose,
    )
    recalibrate(pruned)
    evaluate("fine_tuned", pruned)
    before, after = bn_channel_counts(model), bn_channel_counts(pruned)
    report = ISTAReport(
        rho=float(rho),
        alpha=float(alpha),
        steps=int(steps),
        fine_tune_steps=int(fine_tune_steps),
        params_before=int(model.count_params()),
        params_after=int(pruned.count_params()),
        flops_before=flops.count_flops(model),
        flops_after=flops.count_flops(pruned),
        channels={k: [v["channels"], after[k]["channels"]] for k, v in before.items()},
        sparse_train_loss=float(history.history["loss"][-1]),
        validation_accuracy=accuracies,
    )
    return pruned, report

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


def _initializer(seed: int | None, offset: int) -> keras.initializers.Initializer:
    return keras.initializers.HeNormal(seed=None if seed is None else seed + offset)


def lenet5(
    input_shape: tuple = (28, 28, 1),
    num_classes: int = 10,
    seed: int | None = None,
    name: str = "lenet5",
) -> keras.Model:
    """LeNet-5 (Caffe variant, as in the MTZ and L-OBS papers).

    conv1 5x5x20 (ReLU) -> max-pool 2 -> conv2 5x5x50 (ReLU) -> max-pool 2 -> Flatten ->
    fc1 500 (ReLU) -> fc2 logits. Valid padding: 28x28 inputs give 4x4x50 before Flatten.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    x = keras.layers.Conv2D(
        20, 5, activation="relu", kernel_initializer=_initializer(seed, 0), name="conv1"
    )(inputs)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    x = keras.layers.Conv2D(
        50, 5, activation="relu", kernel_initializer=_initializer(seed, 1), name="conv2"
    )(x)
    x = keras.layers.MaxPooling2D(2, name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(
        500, activation="relu", kernel_initializer=_initializer(seed, 2), name="fc1"
    )(x)
    outputs = keras.layers.Dense(num_classes, kernel_initializer=_initializer(seed, 3), name="fc2")(
        x
    )
    return keras.Model(inputs, outputs, name=name)


VGG16_CONFIG = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)
"""Conv widths of CIFAR-size VGG-16, "M" marking a 2x2 max-pool."""


def vgg16(
    input_shape: tuple = (32, 32, 3),
    num_classes: int = 10,
    width_multiplier: float = 1.0,
    seed: int | None = None,
    name: str = "vgg16",
) -> keras.Model:
    """CIFAR-size VGG-16 with BatchNorm: 13 x (conv3x3 -> BN -> ReLU), 5 max-pools, then
    Flatten -> fc1 (512) -> BN -> ReLU -> fc2 logits.

    Pools use ``padding="same"`` so 28x28 inputs work too (28 -> 14 -> 7 -> 4 -> 2 -> 1).
    ``width_multiplier`` scales every hidden width (at least 1 unit each).
    """
    if width_multiplier <= 0:
        raise ValueError(f"`width_multiplier` must be positive. Received: {width_multiplier}")
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    conv_index, pool_index = 0, 0
    for item in VGG16_CONFIG:
        if item == "M":
            pool_index += 1
            x = keras.layers.MaxPooling2D(2, padding="same", name=f"pool{pool_index}")(x)
            continue
        conv_index += 1
        width = max(1, int(round(item * width_multiplier)))
        x = keras.layers.Conv2D(
            width,
            3,
            padding="same",
            use_bias=False,
            kernel_initializer=_initializer(seed, conv_index),
            name=f"conv{conv_index}",
        )(x)
        x = keras.layers.BatchNormalization(name=f"bn{conv_index}")(x)
        x = keras.layers.ReLU(name=f"relu{conv_index}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(
        max(1, int(round(512 * width_multiplier))),
        use_bias=False,
        kernel_initializer=_initializer(seed, 100),
        name="fc1",
    )(x)
    x = keras.layers.BatchNormalization(name="fc1_bn")(x)
    x = keras.layers.ReLU(name="fc1_relu")(x)
    outputs = keras.layers.Dense(
        num_classes, kernel_initializer=_initializer(seed, 101), name="fc2"
    )(x)
    return keras.Model(inputs, outputs, name=name)


def resnet20(
    input_shape: tuple = (32, 32, 3),
    num_classes: int = 10,
    width_multiplier: float = 1.0,
    seed: int | None = None,
    name: str = "resnet20",
    bn_momentum: float = 0.99,
    blocks_per_stage: int = 3,
) -> keras.Model:
    """CIFAR ResNet-20 (He et al. 2016) with BatchNorm and projection shortcuts.

    stem conv3x3 (16w) -> BN -> ReLU; three stages of three basic blocks with 16w, 32w, 64w
    channels (the first block of stages 2 and 3 has stride 2 and a 1x1 conv + BN projection
    shortcut); global average pooling; dense logits. A basic block is
    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``. Layer names follow
    ``stage{s}_block{b}_{conv1,bn1,relu1,conv2,bn2,proj_conv,proj_bn,add,relu2}``.
    ``blocks_per_stage`` = n gives the 6n + 2-layer CIFAR ResNet (3: ResNet-20, 1:
    ResNet-8, 9: ResNet-56). ``bn_momentum`` is every BatchNormalization's moving-average
    momentum (Keras' 0.99 by default; 0.9 when training for only a few hundred steps, so
    the moving statistics that validation uses catch up with the weights).
    """
    if width_multiplier <= 0:
        raise ValueError(f"`width_multiplier` must be positive. Received: {width_multiplier}")
    if blocks_per_stage < 1:
        raise ValueError(f"`blocks_per_stage` must be at least 1. Received: {blocks_per_stage}")
    counter = iter(range(10_000))

    def conv(filters, kernel, stride, layer_name):
        return keras.layers.Conv2D(
            filters,
            kernel,
            strides=stride,
            padding="same",
            use_bias=False,
            kernel_initializer=_initializer(seed, next(counter)),
            name=layer_name,
        )

    inputs = keras.Input(shape=input_shape, name="image")
    width = max(1, int(round(16 * width_multiplier)))
    x = conv(width, 3, 1, "stem_conv")(inputs)
    x = keras.layers.BatchNormalization(momentum=bn_momentum, name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for stage in range(1, 4):
        filters = max(1, int(round(16 * width_multiplier * 2 ** (stage - 1))))
        for block in range(1, blocks_per_stage + 1):
            prefix = f"stage{stage}_block{block}"
            stride = 2 if stage > 1 and block == 1 else 1
            y = conv(filters, 3, stride, f"{prefix}_conv1")(x)
            y = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"{prefix}_bn1")(y)
            y = keras.layers.ReLU(name=f"{prefix}_relu1")(y)
            y = conv(filters, 3, 1, f"{prefix}_conv2")(y)
            y = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"{prefix}_bn2")(y)
            shortcut = x
            if stride != 1 or x.shape[-1] != filters:
                shortcut = conv(filters, 1, stride, f"{prefix}_proj_conv")(x)
                shortcut = keras.layers.BatchNormalization(
                    momentum=bn_momentum, name=f"{prefix}_proj_bn"
                )(shortcut)
            x = keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
            x = keras.layers.ReLU(name=f"{prefix}_relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(
        num_classes, kernel_initializer=_initializer(seed, 999), name="fc"
    )(x)
    return keras.Model(inputs, outputs, name=name)


def permute_hidden(model: keras.Model, seed: int) -> keras.Model:
    """Returns a new model computing the same function with hidden units randomly permuted.

    Every hidden unit's neurons (Dense units, Conv2D filters, the channels of a depthwise
    convolution or standalone BatchNorm with those of its input) are reordered by a seeded
    random permutation p: kernel columns, bias and BatchNorm parameters move to index p,
    and the kernel input rows of every unit reading them (channels; each channel's block of
    rows after a Flatten) follow, so outputs are unchanged up to float rounding. Units whose
    channels an ``Add`` couples (a residual stream) share one permutation. MTZ experiments
    do this after training so that zipping cannot rely on index order. ``model`` is not
    modified.
    """
    plan = graph.read_plan(model)
    groups = plan.zip_groups()
    units = plan.units
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(units[members[0]].units) for members in groups]
    set_of = {u: g for g, members in enumerate(groups) for u in members}
    permuted = keras.models.clone_model(model)
    permuted.set_weights(model.get_weights())
    for u, unit in enumerate(units):
        segments = plan.input_segments(u, groups)
        widths = [units[s].units for _, s in segments]
        offsets = np.cumsum([0] + widths)[:-1]
        # Its input channels in their writers' new order, segment by segment.
        input_order = np.concatenate(
            [offset + orders[g] for (g, _), offset in zip(segments, offsets)] + [np.zeros(0)]
        ).astype(np.int64)
        order = orders[set_of[u]] if u in set_of else input_order if plan.spans(u) else None
        layer = permuted.get_layer(unit.name)
        if order is not None:
            if unit.kind == "DepthwiseConv2D":  # kernel (kh, kw, C, 1)
                layer.kernel.assign(layer.kernel.numpy()[..., order, :])
            elif unit.kind != "BatchNormalization":  # a standalone BN has no kernel
                layer.kernel.assign(layer.kernel.numpy()[..., order])
            if unit.use_bias:
                layer.bias.assign(layer.bias.numpy()[order])
            if unit.batch_norm:
                bn = permuted.get_layer(unit.batch_norm)
                for variable in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance):
                    variable.assign(variable.numpy()[order])
        if segments and not graph.is_channelwise(unit):
            kernel = layer.kernel.numpy()
            if unit.input_group > 1:  # Flatten order (h, w, c): permute c in every block
                n = kernel.shape[-1]
                kernel = kernel.reshape(unit.input_group, len(input_order), n)[:, input_order]
                layer.kernel.assign(kernel.reshape(-1, n))
            else:
                layer.kernel.assign(kernel[..., input_order, :])
    return permuted


BUILDERS = {
    "lenet300": lambda input_shape, classes, width, seed: lenet_300_100(input_shape, classes, seed),
    "lenet5": lambda input_shape, classes, width, seed: lenet5(input_shape, classes, seed),
    "vgg16": lambda input_shape, classes, width, seed: vgg16(input_shape, classes, width, seed),
    "resnet20": lambda input_shape, classes, width, seed: resnet20(
        input_shape, classes, width, seed
    ),
}
"""Builders by name, all called as (input_shape, num_classes, width_multiplier, seed)."""


def build(
    name: str,
    input_shape: tuple = (28, 28, 1),
    num_classes: int = 10,
    width_multiplier: float = 1.0,
    seed: int | None = None,
) -> keras.Model:
    """Builds a model by name: one of :data:`BUILDERS`."""
    if name not in BUILDERS:
        raise ValueError(f"Unknown model {name!r}. Available: {sorted(BUILDERS)}")
    return BUILDERS[name](input_shape, num_classes, width_multiplier, seed)

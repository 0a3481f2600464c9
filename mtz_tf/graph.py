"""Reads a Keras model into an ordered plan of zippable units.

A *plan* is the model's layer chain, reduced to what zipping needs: the input shape, and a
list of steps from input to output. A step is either a zippable :class:`Unit` (a
``Dense`` layer with the element-wise activation applied after it, wherever that activation
lives) or a shape-only :class:`PassThrough` (``Flatten``, ``Dropout``). Every layer of the
model is accounted for: anything the reader cannot represent exactly raises an error that
names the layer, instead of being skipped.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

ELEMENTWISE_ACTIVATIONS = frozenset(
    {
        "linear",
        "relu",
        "relu6",
        "leaky_relu",
        "elu",
        "selu",
        "gelu",
        "silu",
        "swish",
        "tanh",
        "sigmoid",
        "hard_sigmoid",
        "softplus",
        "softsign",
        "mish",
    }
)
"""Activations that act on each unit alone, so units can be permuted and merged freely."""

_PASS_THROUGH_TYPES = (
    "Flatten",
    "Dropout",
    "MaxPooling2D",
    "AveragePooling2D",
    "GlobalAveragePooling2D",
    "GlobalMaxPooling2D",
)
"""Weightless layers that act on each channel alone, so they commute with unit permutations."""


@dataclasses.dataclass(frozen=True)
class Unit:
    """A ``Dense`` or ``Conv2D`` layer with its BatchNorm and activation: zippable neurons.

    Attributes:
        name: str, the weighted layer's name in the source model.
        kind: str, ``"Dense"`` or ``"Conv2D"``.
        units: int, number of neurons (units or filters).
        use_bias: bool, whether the weighted layer has a bias.
        activation: str, the element-wise activation applied after it (and after its BN).
        batch_norm: str or None, the name of the ``BatchNormalization`` layer right after it.
        conv: tuple or None, ``(kernel_size, strides, padding)`` of a ``Conv2D``.
        input_group: int, rows of the kernel per input channel: H·W of the feature map a
            ``Flatten`` turned into this Dense layer's input, else 1.
    """

    name: str
    kind: str
    units: int
    use_bias: bool
    activation: str
    batch_norm: str | None = None
    conv: tuple | None = None
    input_group: int = 1


@dataclasses.dataclass(frozen=True)
class PassThrough:
    """A weightless layer between units (Flatten, Dropout, pooling).

    Attributes:
        name: str, the layer's name in the source model.
        kind: str, its class name.
        config: dict, its Keras config (to rebuild it).
    """

    name: str
    kind: str
    config: dict = dataclasses.field(default_factory=dict, compare=False)


@dataclasses.dataclass(frozen=True)
class Plan:
    """An ordered chain of steps from the model input to its output.

    Attributes:
        input_shape: tuple, the model's input shape without the batch dimension.
        steps: tuple of :class:`Unit` / :class:`PassThrough`, input to output.
    """

    input_shape: tuple
    steps: tuple

    @property
    def units(self) -> list[Unit]:
        """The zippable units in order; the last one is the output head."""
        return [s for s in self.steps if isinstance(s, Unit)]

    @property
    def hidden_units(self) -> list[Unit]:
        """The units that may be zipped (all but the output head)."""
        return self.units[:-1]

    def signature(self) -> tuple:
        """What two models must share to be zipped: input shape, step kinds, layer shapes."""
        return (
            self.input_shape,
            tuple(
                (s.kind, s.activation, s.batch_norm is not None, s.conv, s.input_group)
                if isinstance(s, Unit)
                else (s.kind,)
                for s in self.steps
            ),
        )


def _activation_name(activation) -> str:
    name = keras.activations.serialize(activation)
    if isinstance(name, dict):
        name = name.get("config", {}).get("name") or name.get("class_name", repr(name))
    return str(name)


def _unit(layer, steps: list) -> Unit:
    """Builds the :class:`Unit` of a Dense or Conv2D layer, given the steps before it."""
    activation = _activation_name(layer.activation)
    if isinstance(layer, keras.layers.Dense):
        input_shape = layer.input.shape
        if len(input_shape) != 2:
            raise ValueError(
                f"Dense layer {layer.name!r} receives a {len(input_shape) - 1}-D input per "
                "sample; flatten feature maps before Dense layers."
            )
        group = 1
        flatten = [s for s in steps if isinstance(s, PassThrough) and s.kind == "Flatten"]
        units_before = [s for s in steps if isinstance(s, Unit)]
        if flatten and units_before and units_before[-1].kind == "Conv2D":
            group = int(input_shape[-1]) // units_before[-1].units
        return Unit(
            layer.name,
            "Dense",
            int(layer.units),
            bool(layer.use_bias),
            activation,
            input_group=group,
        )
    if any(isinstance(s, Unit) and s.kind == "Dense" for s in steps):
        raise ValueError(f"Conv2D layer {layer.name!r} follows a Dense layer; not supported.")
    if layer.groups != 1 or tuple(layer.dilation_rate) != (1, 1):
        raise ValueError(
            f"Conv2D layer {layer.name!r} uses groups={layer.groups} / dilation_rate="
            f"{layer.dilation_rate}; only groups=1 without dilation is supported."
        )
    if layer.data_format != "channels_last":
        raise ValueError(f"Conv2D layer {layer.name!r} must use data_format='channels_last'.")
    conv = (tuple(layer.kernel_size), tuple(layer.strides), layer.padding)
    return Unit(
        layer.name, "Conv2D", int(layer.filters), bool(layer.use_bias), activation, conv=conv
    )


def _check_linear_chain(model: keras.Model, layers: list) -> None:
    previous = model.inputs[0] if model.inputs else None
    for layer in layers:
        inputs = layer.input
        if isinstance(inputs, (list, tuple)):
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) takes several inputs; "
                "only chains of layers (Sequential-like models) are supported here."
            )
        if previous is not None and inputs is not previous:
            raise ValueError(
                f"Layer {layer.name!r} does not consume the output of the layer before it; "
                "only chains of layers (Sequential-like models) are supported here."
            )
        previous = layer.output


def read_plan(model: keras.Model) -> Plan:
    """Reads ``model`` into a :class:`Plan`.

    Args:
        model: keras.Model, a Sequential or functional chain of ``Conv2D`` and ``Dense``
            layers, each optionally followed by ``BatchNormalization`` and an activation,
            with pooling, ``Flatten`` and ``Dropout`` between them; one input, one output.

    Returns:
        The model's :class:`Plan`.

    Raises:
        ValueError: for a layer type the reader cannot represent (named in the message), a
            non-element-wise hidden activation, several inputs/outputs, or a non-chain graph.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a keras.Model. Received: {type(model).__name__}")
    if not model.built or not model.inputs:
        raise ValueError(
            f"Model {model.name!r} has no defined input; build it with an `Input` first."
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            f"Model {model.name!r} must have one input and one output. Received "
            f"{len(model.inputs)} inputs and {len(model.outputs)} outputs."
        )
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    _check_linear_chain(model, layers)
    steps: list = []
    for layer in layers:
        kind = type(layer).__name__
        last = steps[-1] if steps and isinstance(steps[-1], Unit) else None
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
            steps.append(_unit(layer, steps))
        elif isinstance(layer, keras.layers.BatchNormalization):
            if last is None or last.batch_norm is not None or last.activation != "linear":
                raise ValueError(
                    f"BatchNormalization layer {layer.name!r} must directly follow a Dense or "
                    "Conv2D layer that has no activation of its own (unit -> BN -> activation)."
                )
            if not layer.scale or not layer.center:
                raise ValueError(
                    f"BatchNormalization layer {layer.name!r} must have scale=True and center=True."
                )
            steps[-1] = dataclasses.replace(last, batch_norm=layer.name)
        elif isinstance(layer, (keras.layers.Activation, keras.layers.ReLU)):
            activation = (
                _activation_name(layer.activation)
                if isinstance(layer, keras.layers.Activation)
                else "relu"
            )
            if isinstance(layer, keras.layers.ReLU) and (
                layer.max_value is not None or layer.negative_slope or layer.threshold
            ):
                raise ValueError(
                    f"Layer {layer.name!r} is a ReLU with max_value/negative_slope/threshold; "
                    "only the plain ReLU layer is supported (use activation=... instead)."
                )
            if last is None:
                raise ValueError(
                    f"Activation layer {layer.name!r} must follow a Dense or Conv2D layer "
                    "(or its BatchNormalization) directly."
                )
            if last.activation != "linear":
                raise ValueError(
                    f"Activation layer {layer.name!r} follows {last.name!r}, which already "
                    f"applies {last.activation!r}; stacked activations are not supported."
                )
            steps[-1] = dataclasses.replace(last, activation=activation)
        elif kind in _PASS_THROUGH_TYPES:
            steps.append(PassThrough(name=layer.name, kind=kind, config=layer.get_config()))
        else:
            raise ValueError(
                f"Layer {layer.name!r} of type {kind} is not supported for zipping. "
                "Supported: Dense, Conv2D (groups=1, no dilation), BatchNormalization, "
                f"Activation, ReLU, {', '.join(_PASS_THROUGH_TYPES)}."
            )
    plan = Plan(input_shape=tuple(model.inputs[0].shape[1:]), steps=tuple(steps))
    units = plan.units
    if len(units) < 2:
        raise ValueError(
            f"Model {model.name!r} has {len(units)} Dense layer(s); zipping needs at least one "
            "hidden Dense layer and an output Dense layer."
        )
    for unit in plan.hidden_units:
        if unit.activation not in ELEMENTWISE_ACTIVATIONS:
            raise ValueError(
                f"Hidden layer {unit.name!r} uses activation {unit.activation!r}, which does not "
                f"act on each neuron alone. Supported: {sorted(ELEMENTWISE_ACTIVATIONS)}."
            )
    seen_dense = False
    for step in plan.steps:
        seen_dense = seen_dense or (isinstance(step, Unit) and step.kind == "Dense")
        if seen_dense and isinstance(step, PassThrough) and step.kind != "Dropout":
            raise ValueError(
                f"Layer {step.name!r} ({step.kind}) comes after a Dense layer; only Dropout "
                "may stand between Dense layers."
            )
    return plan


def unit_weights(model: keras.Model, unit: Unit) -> tuple:
    """Float64 copies of a unit's (kernel, bias, norm): kernel (..., d, n), bias (n,) (zeros
    without bias), norm (gamma, beta, moving_mean, moving_variance) or None."""
    layer = model.get_layer(unit.name)
    kernel = np.array(layer.kernel.numpy(), dtype=np.float64)
    bias = np.array(layer.bias.numpy(), np.float64) if unit.use_bias else np.zeros(unit.units)
    norm = None
    if unit.batch_norm:
        bn = model.get_layer(unit.batch_norm)
        norm = tuple(
            np.array(v.numpy(), dtype=np.float64)
            for v in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)
        )
    return kernel, bias, norm

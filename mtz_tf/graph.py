"""Reads a Keras model into an ordered plan of zippable units.

A *plan* is the model's layer chain, reduced to what zipping needs: the input shape, and a
list of steps from input to output. A step is either a zippable :class:`DenseUnit` (a
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

_PASS_THROUGH_TYPES = ("Flatten", "Dropout")


@dataclasses.dataclass(frozen=True)
class DenseUnit:
    """A ``Dense`` layer and its activation: one zippable layer of neurons.

    Attributes:
        name: str, the ``Dense`` layer's name in the source model.
        units: int, number of neurons.
        use_bias: bool, whether the layer has a bias.
        activation: str, name of the element-wise activation applied to its output.
    """

    name: str
    units: int
    use_bias: bool
    activation: str


@dataclasses.dataclass(frozen=True)
class PassThrough:
    """A layer that moves values without weights: ``Flatten`` or ``Dropout``.

    Attributes:
        name: str, the layer's name in the source model.
        kind: str, ``"Flatten"`` or ``"Dropout"``.
        rate: float, the dropout rate (0 for ``Flatten``).
    """

    name: str
    kind: str
    rate: float = 0.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """An ordered chain of steps from the model input to its output.

    Attributes:
        input_shape: tuple, the model's input shape without the batch dimension.
        steps: tuple of :class:`DenseUnit` / :class:`PassThrough`, input to output.
    """

    input_shape: tuple
    steps: tuple

    @property
    def units(self) -> list[DenseUnit]:
        """The zippable units in order; the last one is the output head."""
        return [s for s in self.steps if isinstance(s, DenseUnit)]

    @property
    def hidden_units(self) -> list[DenseUnit]:
        """The units that may be zipped (all but the output head)."""
        return self.units[:-1]

    def signature(self) -> tuple:
        """What two models must share to be zipped: input shape and step kinds."""
        return (
            self.input_shape,
            tuple(
                ("Dense", s.activation) if isinstance(s, DenseUnit) else (s.kind,)
                for s in self.steps
            ),
        )


def _activation_name(activation) -> str:
    name = keras.activations.serialize(activation)
    if isinstance(name, dict):
        name = name.get("config", {}).get("name") or name.get("class_name", repr(name))
    return str(name)


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
        model: keras.Model, a Sequential or functional chain of ``Dense``, ``Flatten``,
            ``Dropout``, ``Activation`` and ``ReLU`` layers, with one input and one output.

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
        if isinstance(layer, keras.layers.Dense):
            steps.append(
                DenseUnit(
                    name=layer.name,
                    units=int(layer.units),
                    use_bias=bool(layer.use_bias),
                    activation=_activation_name(layer.activation),
                )
            )
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
                    "only the plain ReLU layer is supported (use Dense(activation=...))."
                )
            if not steps or not isinstance(steps[-1], DenseUnit):
                raise ValueError(
                    f"Activation layer {layer.name!r} must follow a Dense layer directly."
                )
            if steps[-1].activation != "linear":
                raise ValueError(
                    f"Activation layer {layer.name!r} follows Dense {steps[-1].name!r}, which "
                    f"already applies {steps[-1].activation!r}; stacked activations are not "
                    "supported."
                )
            steps[-1] = dataclasses.replace(steps[-1], activation=activation)
        elif kind in _PASS_THROUGH_TYPES:
            rate = float(layer.rate) if kind == "Dropout" else 0.0
            steps.append(PassThrough(name=layer.name, kind=kind, rate=rate))
        else:
            raise ValueError(
                f"Layer {layer.name!r} of type {kind} is not supported for Dense-network "
                "zipping. Supported: Dense, Flatten, Dropout, Activation, ReLU."
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
        seen_dense = seen_dense or isinstance(step, DenseUnit)
        if seen_dense and isinstance(step, PassThrough) and step.kind == "Flatten":
            raise ValueError(
                f"Flatten layer {step.name!r} comes after a Dense layer; only a Flatten "
                "before the first Dense layer is supported."
            )
    return plan


def dense_weights(model: keras.Model, plan: Plan) -> list[tuple[np.ndarray, np.ndarray]]:
    """Copies of each unit's (kernel (d, n), bias (n,)) as float64; zeros for no bias."""
    weights = []
    for unit in plan.units:
        layer = model.get_layer(unit.name)
        kernel = np.array(layer.kernel.numpy(), dtype=np.float64)
        bias = (
            np.array(layer.bias.numpy(), dtype=np.float64)
            if unit.use_bias
            else np.zeros(unit.units)
        )
        weights.append((kernel, bias))
    return weights

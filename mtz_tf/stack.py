"""The zipped network as plain arrays, and its conversion to and from a Keras model.

A zipped network of T tasks is the plan's chain of steps in which every Dense unit is a
:class:`~mtz_tf.layers.ZippedDense` described by a :class:`LayerState`. A layer that has
not been zipped (yet) is a ``ZippedDense`` with ``shared_units = 0``, so the T input models
side by side are the stack with nothing shared, and the output heads stay that way.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from mtz_tf import graph
from mtz_tf.layers import ZippedDense


@dataclasses.dataclass
class LayerState:
    """Weights and layout of one ``ZippedDense`` layer, as float64 NumPy arrays.

    Attributes:
        name: str, layer name (the first task's source layer name).
        activation: str, element-wise activation.
        use_bias: bool.
        shared_units: int, k.
        input_shared_units: int, k_in.
        common_input: bool, whether all tasks receive the same input tensor.
        shared_kernel: (k_in, k) merged weights from shared inputs.
        shared_bias: (k,) merged bias (zeros without bias).
        cross_kernels: per task (m_t, k), weights from specific inputs to shared neurons.
        kernels: per task (k_in + m_t, n_t − k), weights of the task's specific neurons.
        biases: per task (n_t − k,).
    """

    name: str
    activation: str
    use_bias: bool
    shared_units: int
    input_shared_units: int
    common_input: bool
    shared_kernel: np.ndarray
    shared_bias: np.ndarray
    cross_kernels: list
    kernels: list
    biases: list

    @property
    def units(self) -> list[int]:
        return [self.shared_units + k.shape[1] for k in self.kernels]

    @property
    def input_units(self) -> list[int]:
        return [k.shape[0] for k in self.kernels]

    @property
    def common_output(self) -> bool:
        return self.common_input and all(n == self.shared_units for n in self.units)


def separate_states(plans: dict, models: dict) -> list[LayerState]:
    """The stack of T separate models: one unshared :class:`LayerState` per Dense unit."""
    task_names = list(models)
    weights = {t: graph.dense_weights(models[t], plans[t]) for t in task_names}
    first = plans[task_names[0]]
    states = []
    for index, unit in enumerate(first.units):
        kernels = [weights[t][index][0] for t in task_names]
        biases = [weights[t][index][1] for t in task_names]
        common = index == 0
        k_in = kernels[0].shape[0] if common else 0
        states.append(
            LayerState(
                name=unit.name,
                activation=unit.activation,
                use_bias=unit.use_bias,
                shared_units=0,
                input_shared_units=k_in,
                common_input=common,
                shared_kernel=np.zeros((k_in, 0)),
                shared_bias=np.zeros(0),
                cross_kernels=[np.zeros((k.shape[0] - k_in, 0)) for k in kernels],
                kernels=kernels,
                biases=biases,
            )
        )
    return states


def _layer(state: LayerState, task_names: list[str]) -> ZippedDense:
    return ZippedDense(
        task_names=task_names,
        units=state.units,
        shared_units=state.shared_units,
        input_units=state.input_units,
        input_shared_units=state.input_shared_units,
        common_input=state.common_input,
        activation=state.activation,
        use_bias=state.use_bias,
        name=state.name,
    )


def set_layer_weights(layer: ZippedDense, state: LayerState) -> None:
    """Assigns a :class:`LayerState`'s arrays to a built ``ZippedDense``."""
    pairs = [(layer.shared_kernel, state.shared_kernel)]
    pairs += list(zip(layer.cross_kernels, state.cross_kernels))
    pairs += list(zip(layer.task_kernels, state.kernels))
    if state.use_bias:
        pairs.append((layer.shared_bias, state.shared_bias))
        pairs += list(zip(layer.task_biases, state.biases))
    for variable, value in pairs:
        variable.assign(np.asarray(value, dtype=variable.dtype))


def read_layer_state(layer: ZippedDense) -> LayerState:
    """The :class:`LayerState` of a built ``ZippedDense`` (float64 copies)."""

    def arr(v):
        return np.array(v.numpy(), dtype=np.float64)

    k = layer.shared_units
    return LayerState(
        name=layer.name,
        activation=layer.activation_name,
        use_bias=layer.use_bias,
        shared_units=k,
        input_shared_units=layer.input_shared_units,
        common_input=layer.common_input,
        shared_kernel=arr(layer.shared_kernel),
        shared_bias=arr(layer.shared_bias) if layer.use_bias else np.zeros(k),
        cross_kernels=[arr(v) for v in layer.cross_kernels],
        kernels=[arr(v) for v in layer.task_kernels],
        biases=[
            arr(v) if layer.use_bias else np.zeros(kernel.shape[1])
            for v, kernel in zip(layer.task_biases, layer.task_kernels)
        ],
    )


def build_model(
    plan: graph.Plan, task_names: list[str], states: list[LayerState], name: str = "zipped"
) -> keras.Model:
    """Builds the zipped Keras model: one input, a dict of outputs keyed by task name.

    Built under ``tf.distribute.get_strategy().scope()`` so that its variables are mirrored
    when a distribution strategy is active.
    """
    with tf.distribute.get_strategy().scope():
        inputs = keras.Input(shape=plan.input_shape, name="input")
        x = inputs  # One tensor while all tasks share it, else a list of T tensors.
        layers = []
        state_iter = iter(states)
        for step in plan.steps:
            if isinstance(step, graph.PassThrough):
                layer = (
                    keras.layers.Flatten(name=step.name)
                    if step.kind == "Flatten"
                    else keras.layers.Dropout(step.rate, name=step.name)
                )
                x = [layer(v) for v in x] if isinstance(x, list) else layer(x)
                continue
            state = next(state_iter)
            layer = _layer(state, task_names)
            x = layer(x)
            layers.append((layer, state))
        outputs = x if isinstance(x, list) else [x] * len(task_names)
        model = keras.Model(inputs, dict(zip(task_names, outputs)), name=name)
    for layer, state in layers:
        set_layer_weights(layer, state)
    return model


def zipped_layers(model: keras.Model) -> list[ZippedDense]:
    """The ``ZippedDense`` layers of a zipped model, input to output."""
    return [layer for layer in model.layers if isinstance(layer, ZippedDense)]


def read_states(model: keras.Model) -> list[LayerState]:
    """The :class:`LayerState` of every ``ZippedDense`` layer of a zipped model."""
    return [read_layer_state(layer) for layer in zipped_layers(model)]


def parameter_counts(model: keras.Model) -> dict[str, int]:
    """{"shared", "specific", "total"} parameters of a zipped model (shared counted once)."""
    shared = specific = 0
    for layer in zipped_layers(model):
        s, p = layer.parameter_counts()
        shared += s
        specific += p
    return {"shared": shared, "specific": specific, "total": shared + specific}


def task_model(zipped: keras.Model, task: str) -> keras.Model:
    """A plain Keras model computing only ``task``'s output of a zipped model.

    Each ``ZippedDense`` becomes an ordinary ``Dense`` layer holding the task's view of
    its weights (shared columns first); other layers are copied from their configs. The
    result computes exactly ``zipped(x)[task]`` and nothing for the other tasks.
    """
    tasks = list(zipped.output)
    if task not in tasks:
        raise ValueError(f"Unknown task {task!r}; the zipped model has tasks {tasks}.")
    x = inputs = keras.Input(shape=zipped.input.shape[1:], name="input")
    for layer in zipped.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, ZippedDense):
            x = layer.task_layer(task)(x)
        else:
            x = layer.__class__.from_config(layer.get_config())(x)
    return keras.Model(inputs, x, name=f"{zipped.name}_{task}")

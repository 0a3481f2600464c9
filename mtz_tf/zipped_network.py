"""The zipped network as plain arrays, and its conversion to and from a Keras model.

A zipped network of T tasks is the plan's chain of steps in which every unit is a
:class:`~mtz_tf.layers.ZippedDense` or :class:`~mtz_tf.layers.ZippedConv2D` described by a
:class:`LayerState`. A layer that has not been zipped (yet) has ``shared_units = 0``, so the
T input models side by side are the stack with nothing shared; output heads stay that way.

Kernels keep Keras' layout, (d, n) for Dense and (kh, kw, c_in, n) for Conv2D: axis −2
indexes inputs, axis −1 neurons. A Dense layer fed by a flattened feature map of H·W
positions has its input rows in channel-major order (c, h, w), H·W rows per channel
(``input_group``), because zipped models flatten channel-major (ChannelMajorFlatten) so that
shared channels form a prefix.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from mtz_tf import graph, layers
from mtz_tf.layers import (
    ChannelMajorFlatten,
    SharedFirstConcatenate,
    ZippedConv2D,
    ZippedDense,
    _ZippedLayer,
)

BATCH_NORM_MODES = ("task", "fold")


@dataclasses.dataclass
class LayerState:
    """Weights and layout of one zipped layer, as float64 NumPy arrays.

    Attributes:
        name: str, layer name (the first task's source layer name).
        kind: str, ``"Dense"`` or ``"Conv2D"``.
        conv: tuple or None, ``(kernel_size, strides, padding)``.
        activation: str, element-wise activation.
        use_bias: bool.
        batch_norm: dict or None, per-task BatchNorm arguments (epsilon, momentum).
        input_group: int, input rows per input channel (H·W after a Flatten, else 1).
        shared_units: int, k.
        input_shared_units: int, k_in, shared input rows (channels · input_group).
        common_input: bool, whether all tasks receive the same input tensor.
        shared_kernel: (..., k_in, k) merged weights from shared inputs.
        shared_bias: (k,) merged bias (zeros without bias).
        cross_kernels: per task (..., m_t, k), weights from specific inputs to shared neurons.
        kernels: per task (..., k_in + m_t, n_t − k), weights of the task's own neurons.
        biases: per task (n_t − k,).
        norms: per task (gamma, beta, moving_mean, moving_variance), each (n_t,) in output
            order [shared; own], or an empty list without BatchNorm.
        sharing: per task bool, whether it uses the shared neurons (False only for a task
            being added to a zipped model, before it reaches this layer).
    """

    name: str
    kind: str
    conv: tuple | None
    activation: str
    use_bias: bool
    batch_norm: dict | None
    input_group: int
    shared_units: int
    input_shared_units: int
    common_input: bool
    shared_kernel: np.ndarray
    shared_bias: np.ndarray
    cross_kernels: list
    kernels: list
    biases: list
    norms: list
    sharing: list

    @property
    def units(self) -> list[int]:
        return [
            (self.shared_units if s else 0) + k.shape[-1]
            for s, k in zip(self.sharing, self.kernels)
        ]

    @property
    def input_units(self) -> list[int]:
        return [k.shape[-2] for k in self.kernels]

    @property
    def common_output(self) -> bool:
        return layers.common_output(
            self.common_input, self.batch_norm, self.sharing, self.units, self.shared_units
        )

    @property
    def kernel_prefix(self) -> tuple:
        return tuple(self.conv[0]) if self.conv else ()


def fold_batch_norm(kernel, bias, norm, epsilon: float):
    """Folds BN(z) = γ (z − μ)/√(σ² + ε) + β into the preceding layer's kernel and bias.

    With s = γ/√(σ² + ε): kernel' = kernel · s (per output neuron), bias' = (bias − μ)·s + β.
    Exact at inference. A channel with γ = 0 becomes the constant β (zero kernel).
    """
    gamma, beta, mean, variance = norm
    scale = gamma / np.sqrt(variance + epsilon)
    return kernel * scale, (bias - mean) * scale + beta


def _channel_major_rows(kernel: np.ndarray, group: int) -> np.ndarray:
    """(H·W·C, n) rows in Keras' (h, w, c) Flatten order -> channel-major (c, h, w) order."""
    rows, n = kernel.shape
    channels = rows // group
    return kernel.reshape(group, channels, n).transpose(1, 0, 2).reshape(rows, n)


def separate_states(plans: dict, models: dict, batch_norm: str = "task") -> list[LayerState]:
    """The stack of T separate models: one unshared :class:`LayerState` per unit.

    ``batch_norm="fold"`` folds every unit's BatchNorm into its weights first.
    """
    if batch_norm not in BATCH_NORM_MODES:
        raise ValueError(
            f"`batch_norm` must be one of {BATCH_NORM_MODES}. Received: {batch_norm!r}"
        )
    task_names = list(models)
    first_model = models[task_names[0]]
    first = plans[task_names[0]]
    states = []
    for index, unit in enumerate(first.units):
        kernels, biases, norms = [], [], []
        bn_args = None
        if unit.batch_norm:
            bn = first_model.get_layer(unit.batch_norm)
            bn_args = {"epsilon": float(bn.epsilon), "momentum": float(bn.momentum)}
        for t in task_names:
            kernel, bias, norm = graph.unit_weights(models[t], plans[t].units[index])
            if unit.input_group > 1:
                kernel = _channel_major_rows(kernel, unit.input_group)
            if norm is not None and batch_norm == "fold":
                eps = float(models[t].get_layer(plans[t].units[index].batch_norm).epsilon)
                kernel, bias = fold_batch_norm(kernel, bias, norm, eps)
            elif norm is not None:
                norms.append(norm)
                if unit.kind == "BatchNormalization":  # no weights besides the BatchNorm
                    kernel = kernel[..., :0, :]
            kernels.append(kernel)
            biases.append(bias)
        folded = unit.batch_norm is not None and batch_norm == "fold"
        common = first.reads_model_input(index)
        # A channel-wise unit's one input row per neuron is its own channel: aligned.
        k_in = kernels[0].shape[-2] if common or graph.is_channelwise(unit) else 0
        prefix = kernels[0].shape[:-2]
        states.append(
            LayerState(
                name=unit.name,
                kind=unit.kind,
                conv=unit.conv,
                activation=unit.activation,
                use_bias=unit.use_bias or folded,
                batch_norm=None if folded else bn_args,
                input_group=unit.input_group,
                shared_units=0,
                input_shared_units=k_in,
                common_input=common,
                shared_kernel=np.zeros(prefix + (k_in, 0)),
                shared_bias=np.zeros(0),
                cross_kernels=[np.zeros(prefix + (k.shape[-2] - k_in, 0)) for k in kernels],
                kernels=kernels,
                biases=biases,
                norms=norms,
                sharing=[True] * len(task_names),
            )
        )
    return states


def _layer(state: LayerState, task_names: list[str]) -> _ZippedLayer:
    args = dict(
        task_names=task_names,
        units=state.units,
        shared_units=state.shared_units,
        input_units=state.input_units,
        input_shared_units=state.input_shared_units,
        common_input=state.common_input,
        activation=state.activation,
        use_bias=state.use_bias,
        batch_norm=state.batch_norm,
        sharing=state.sharing,
        name=state.name,
    )
    if state.kind == "Dense":
        return ZippedDense(**args)
    kernel_size, strides, padding = state.conv
    zipped_class = getattr(layers, "Zipped" + zipped_kind(state.kind, not state.batch_norm))
    return zipped_class(kernel_size=kernel_size, strides=strides, padding=padding, **args)


def zipped_kind(kind: str, folded: bool) -> str:
    """The kind of zipped layer (``Zipped<kind>``) that holds a unit of ``kind``: its own,
    but a standalone BatchNorm folded into its affine map is a 1×1 depthwise convolution."""
    return "DepthwiseConv2D" if kind == "BatchNormalization" and folded else kind


def set_layer_weights(layer: _ZippedLayer, state: LayerState) -> None:
    """Assigns a :class:`LayerState`'s arrays to a built zipped layer.

    The layer remembers the array it was last given for each variable (held, so that its
    identity cannot pass to another array), and an array given again is not assigned
    again: a zip rebuilding its network after each unit (:func:`build_model`'s ``reuse``)
    assigns only what changed, since every change to a state gives it new arrays. Anything
    else that writes the variables (retraining) is followed by new states read back from
    the model (:func:`read_states`).
    """
    assigned = _assigned(layer)
    for variable, value in _weight_pairs(layer, state):
        if assigned.get(variable.path) is not value:
            variable.assign(np.asarray(value, dtype=variable.dtype))
            assigned[variable.path] = value


def _assigned(layer: _ZippedLayer) -> dict:
    """{variable path: the array it holds} of :func:`set_layer_weights`."""
    assigned = getattr(layer, "_mtz_assigned", None)
    if assigned is None:
        assigned = {}
        object.__setattr__(layer, "_mtz_assigned", assigned)  # not a tracked attribute
    return assigned


def _weight_pairs(layer: _ZippedLayer, state: LayerState) -> list:
    """(variable, array) of every weight of a zipped layer and its :class:`LayerState`."""
    pairs = [(layer.shared_kernel, state.shared_kernel)]
    pairs += list(zip(layer.cross_kernels, state.cross_kernels))
    pairs += list(zip(layer.task_kernels, state.kernels))
    if state.use_bias:
        pairs.append((layer.shared_bias, state.shared_bias))
        pairs += list(zip(layer.task_biases, state.biases))
    for norm, values in zip(layer.norms, state.norms):
        pairs += list(zip((norm.gamma, norm.beta, norm.moving_mean, norm.moving_variance), values))
    return pairs


def read_layer_state(layer: _ZippedLayer, input_group: int = 1, kind=None) -> LayerState:
    """The :class:`LayerState` of a built zipped layer (float64 copies); ``kind`` is the
    unit's (default: the layer's, e.g. ``"Conv2D"`` for a ``ZippedConv2D``). The layer's
    variables hold its arrays, so :func:`set_layer_weights` does not assign them again."""

    def arr(v):
        return np.array(v.numpy(), dtype=np.float64)

    k = layer.shared_units
    conv = (
        (layer.kernel_size, layer.strides, layer.padding)
        if isinstance(layer, ZippedConv2D)
        else None
    )
    state = LayerState(
        name=layer.name,
        kind=kind or type(layer).__name__.removeprefix("Zipped"),
        conv=conv,
        activation=layer.activation_name,
        use_bias=layer.use_bias,
        batch_norm=layer.batch_norm,
        input_group=input_group,
        shared_units=k,
        input_shared_units=layer.input_shared_units,
        common_input=layer.common_input,
        shared_kernel=arr(layer.shared_kernel),
        shared_bias=arr(layer.shared_bias) if layer.use_bias else np.zeros(k),
        cross_kernels=[arr(v) for v in layer.cross_kernels],
        kernels=[arr(v) for v in layer.task_kernels],
        biases=[
            arr(v) if layer.use_bias else np.zeros(kernel.shape[-1])
            for v, kernel in zip(layer.task_biases, layer.task_kernels)
        ],
        norms=[
            tuple(arr(v) for v in (n.gamma, n.beta, n.moving_mean, n.moving_variance))
            for n in layer.norms
        ],
        sharing=list(layer.sharing),
    )
    assigned = _assigned(layer)
    for variable, value in _weight_pairs(layer, state):
        assigned[variable.path] = value
    return state


def _after_conv(plan: graph.Plan, step: graph.PassThrough) -> bool:
    sources = plan.unit_sources(step.inputs[0])
    return bool(sources) and plan.units[sources[0][0]].kind == "Conv2D"


def _pass_through(plan: graph.Plan, step: graph.PassThrough) -> keras.layers.Layer:
    if step.kind == "Flatten" and _after_conv(plan, step):
        return ChannelMajorFlatten(name=step.name)
    return getattr(keras.layers, step.kind).from_config(step.config)


def shared_first_order(widths, shared) -> np.ndarray:
    """The channel layout of a concatenation of segments of ``widths`` channels, segment i
    leading with ``shared[i]`` shared ones, in :class:`SharedFirstConcatenate`'s order:
    position p holds channel ``order[p]`` of the plain concatenation."""
    offsets = np.cumsum([0] + [int(n) for n in widths])[:-1]
    first = [o + np.arange(k) for o, k in zip(offsets, shared)]
    rest = [o + np.arange(k, n) for o, k, n in zip(offsets, shared, widths)]
    return np.concatenate(first + rest + [np.zeros(0)]).astype(np.int64)


def laid_out_shares(plan: graph.Plan, states: list) -> dict:
    """{hidden unit index: the shared count its channels lead with in the zipped network}:
    its zip group's (the most any member shares yet: a group's count is laid out when its
    first writer is tied)."""
    shares = {}
    for members in plan.zip_groups():
        k = max(states[m].shared_units for m in members)
        shares.update({m: k for m in members})
    return shares


def _concatenate(plan: graph.Plan, step: graph.Merge, shares: dict) -> keras.layers.Layer:
    """A plan's ``Concatenate`` in the zipped network: plain while only its first input's
    channels lead with shared ones, else :class:`SharedFirstConcatenate`."""
    counts = [sum(shares[u] for u, _, _ in plan.unit_sources(i)) for i in step.inputs]
    if not any(counts[1:]):
        return keras.layers.Concatenate.from_config(step.config)
    return SharedFirstConcatenate(counts, axis=step.config["axis"], name=step.name)


def _per_task(layer: keras.layers.Layer, args: list, num_tasks: int):
    """Applies a weightless layer to one tensor per argument (each common to all tasks, or
    a list of T): once if all are common, else once per task."""
    if not any(isinstance(a, list) for a in args):
        return layer(args if len(args) > 1 else args[0])
    lists = [a if isinstance(a, list) else [a] * num_tasks for a in args]
    return [layer(list(xs) if len(xs) > 1 else xs[0]) for xs in zip(*lists)]


def _reused(layer: keras.layers.Layer, pool: dict) -> keras.layers.Layer:
    """``pool``'s built layer of ``layer``'s name when it has the same class and config (so
    the same variables), else ``layer`` itself."""
    old = pool.get(layer.name)
    if type(old) is type(layer) and old.get_config() == layer.get_config():
        return old
    return layer


def build_model(
    plan: graph.Plan,
    task_names: list[str],
    states: list[LayerState],
    name: str = "zipped",
    reuse: keras.Model | None = None,
) -> keras.Model:
    """Builds the zipped Keras model: one input, a dict of outputs keyed by task name.

    The plan's graph is followed step by step; a tensor is one tensor while all tasks share
    it, else a list of T. Built under ``tf.distribute.get_strategy().scope()`` so that its
    variables are mirrored when a distribution strategy is active.

    ``reuse``: a model built before from the same plan (the zip's previous network). Its
    layers whose class and config are unchanged are taken over (and given ``states``'
    weights) instead of being built anew, so a zip that changes one unit at a time creates
    only that unit's variables. The two models then share those layers: ``reuse`` must not
    be used for anything but reading after this call.
    """
    pool = {} if reuse is None else {layer.name: layer for layer in reuse.layers}
    with tf.distribute.get_strategy().scope():
        inputs = keras.Input(shape=plan.input_shape, name="input")
        tensors = {graph.MODEL_INPUT: inputs}
        built = []
        state_iter = iter(states)
        shares = laid_out_shares(plan, states)
        for index, step in enumerate(plan.steps):
            args = [tensors[i] for i in step.inputs]
            if isinstance(step, graph.Unit):
                state = next(state_iter)
                layer = _reused(_layer(state, task_names), pool)
                tensors[index] = layer(args[0])
                built.append((layer, state))
                continue
            if isinstance(step, graph.Merge) and step.kind == "Concatenate":
                layer = _concatenate(plan, step, shares)
            elif isinstance(step, graph.Merge):
                layer = getattr(keras.layers, step.kind).from_config(step.config)
            else:
                layer = _pass_through(plan, step)
            tensors[index] = _per_task(_reused(layer, pool), args, len(task_names))
        x = tensors[plan.output_step]
        outputs = x if isinstance(x, list) else [x] * len(task_names)
        model = keras.Model(inputs, dict(zip(task_names, outputs)), name=name)
    for layer, state in built:
        set_layer_weights(layer, state)
    return model


def _zipped_unit_function(layer: _ZippedLayer, with_batch_norm: bool) -> tuple:
    """:func:`mtz_tf.graph.step_function` of the unit a zipped layer holds (without the
    flattened positions, which the layer does not record)."""
    properties = [
        ("layer type", type(layer).__name__.removeprefix("Zipped")),
        ("activation", layer.activation_name),
        ("use_bias", layer.use_bias),
    ]
    if isinstance(layer, ZippedConv2D):
        conv = (layer.kernel_size, layer.strides, layer.padding)
        properties += list(zip(("kernel_size", "strides", "padding"), conv))
    if with_batch_norm:
        properties.append(("BatchNormalization after it", layer.batch_norm is not None))
        if layer.batch_norm is not None:
            properties.append(("BatchNormalization epsilon", layer.batch_norm["epsilon"]))
    return tuple(properties)


def _unit_function(unit: graph.Unit, folded: bool) -> tuple:
    """:func:`mtz_tf.graph.step_function` of a unit as :func:`_zipped_unit_function` has it:
    without the flattened positions and, when its BatchNorm is ``folded`` into the weights,
    without BatchNorm and with the bias that folding gives it."""
    properties = []
    for key, value in graph.step_function(unit):
        if key == "flattened positions per channel":
            continue
        if folded and key.startswith("BatchNormalization"):
            continue
        if folded and key == "use_bias":
            value = value or unit.batch_norm is not None
        if key == "layer type":
            value = zipped_kind(value, folded)
        properties.append((key, value))
    return tuple(properties)


def _comparable(function: tuple) -> tuple:
    """A weightless step's function without a Flatten's data format (zipped models
    flatten channel-major by design, :class:`ChannelMajorFlatten`)."""
    if function[0] == ("layer type", "Flatten"):
        return function[:1]
    return function


def _layer_function(layer: keras.layers.Layer) -> tuple:
    """:func:`mtz_tf.graph.step_function` of a weightless layer of a zipped model."""
    kind = {ChannelMajorFlatten: "Flatten", SharedFirstConcatenate: "Concatenate"}.get(
        type(layer), type(layer).__name__
    )
    config = layer.get_config()
    if kind == "Activation":
        config = {"activation": layer.activation}
    return _comparable(graph.step_function(graph.PassThrough(layer.name, kind, config)))


def _zipped_steps(zipped: keras.Model) -> list[tuple]:
    """The steps of a zipped model read back from its Keras graph: ``(layer, inputs)`` per
    layer in model order, ``inputs`` the indices of the layers it reads
    (:data:`mtz_tf.graph.MODEL_INPUT` for the model input), in argument order.

    :func:`build_model` builds one layer per plan step and applies a weightless layer once
    per task when tasks have their own tensors; every call reads the same layers, so the
    first call within ``zipped`` gives the wiring. A zipped layer reads one layer (for one
    tensor or one per task).
    """
    own_layers = [
        layer for layer in zipped.layers if not isinstance(layer, keras.layers.InputLayer)
    ]
    index = {id(layer): i for i, layer in enumerate(own_layers)}
    steps = []
    for layer in own_layers:
        node = _first_node(zipped, layer)
        inputs = tuple(
            index.get(id(tensor._keras_history.operation), graph.MODEL_INPUT)
            for tensor in node.input_tensors
        )
        if isinstance(layer, _ZippedLayer):
            inputs = tuple(dict.fromkeys(inputs))
        steps.append((layer, inputs))
    return steps


def zipped_difference(zipped: keras.Model, plan: graph.Plan, folded: bool) -> str | None:
    """Where a model of ``plan`` computes something else than the zipped model, as a phrase
    naming the layer, the property and both values (as
    :func:`mtz_tf.graph.first_difference`); None when they agree.

    The zipped model's steps are read back from its graph (:func:`_zipped_steps`; its
    layers keep the names of the first task's) and compared with ``plan``'s step by step:
    layer type, the layers each step reads (in order), and the rest of its function — for a
    unit activation by identity, use_bias, kernel size, strides and padding, and BatchNorm
    presence and epsilon; when ``folded``, BatchNorm is compared as folded into the
    weights, i.e. as a bias; for a weightless layer its function-defining config (pool size,
    strides, padding, ...).
    """
    steps = _zipped_steps(zipped)
    if len(steps) != len(plan.steps):
        return (
            f"in depth: {len(plan.steps)} vs {len(steps)} steps (layers, with BatchNorm and "
            "activations counted with their Dense/Conv2D layer)"
        )

    def names(inputs: tuple, of: list) -> list:
        return ["the model input" if i == graph.MODEL_INPUT else of[i] for i in inputs]

    zipped_names = [layer.name for layer, _ in steps]
    plan_names = [step.name for step in plan.steps]
    for (layer, inputs), step in zip(steps, plan.steps):
        where = f"at layer {step.name!r}"
        if isinstance(layer, _ZippedLayer):
            mine = _zipped_unit_function(layer, not folded)
        else:
            mine = _layer_function(layer)
        if isinstance(step, graph.Unit):
            theirs = _unit_function(step, folded)
        else:
            theirs = _comparable(graph.step_function(step))
        zipped_at = f"(zipped layer {layer.name!r})"
        if mine[0] != theirs[0]:
            return f"{where}: layer type {theirs[0][1]!r} vs {mine[0][1]!r} {zipped_at}"
        if step.inputs != inputs:
            return (
                f"{where}: inputs {names(step.inputs, plan_names)} vs "
                f"{names(inputs, zipped_names)} {zipped_at}"
            )
        for (key, a), (_, b) in zip(mine[1:], theirs[1:]):
            if a == b:
                continue
            if folded and key == "use_bias" and step.batch_norm is not None:
                return (
                    f"{where}: its BatchNormalization {step.batch_norm!r} folds into a bias, "
                    f"but zipped layer {layer.name!r} has none (use_bias {b!r} vs {a!r})"
                )
            if key == "BatchNormalization after it":
                zipped_at = (
                    f"(zipped layer {layer.name!r}: a zip that keeps each task's BatchNorm, "
                    "made with batch_norm='task', takes a new task only with BatchNorm on the "
                    "same layers)"
                )
            return f"{where}: {key} {b!r} vs {a!r} {zipped_at}"
    return None


def _first_node(model: keras.Model, layer: keras.layers.Layer):
    """``layer``'s first call within ``model`` (its first inbound node that is ``model``'s;
    a layer shared with other models has theirs too)."""
    nodes = {id(node) for depth in model._nodes_by_depth.values() for node in depth}
    return next(n for n in layer._inbound_nodes if id(n) in nodes)


def layer_input(model: keras.Model, layer: keras.layers.Layer):
    """The symbolic input of ``layer`` within ``model`` (one tensor, or a list for a layer
    called on several), also when the layer serves several models (:func:`build_model`'s
    ``reuse``), where ``layer.input`` is its first model's."""
    tensors = list(_first_node(model, layer).input_tensors)
    return tensors[0] if len(tensors) == 1 else tensors


def task_values(
    model: keras.Model,
    plan: graph.Plan,
    t: int,
    targets: list[int],
    values: dict,
    training: bool = False,
) -> list:
    """Task t's activations at plan steps ``targets`` of zipped ``model`` (built from
    ``plan``), computed with its own layers from those in ``values`` ({step index: task t's
    tensor}, e.g. the model input at :data:`mtz_tf.graph.MODEL_INPUT`), which gains every
    step computed on the way. Only task t's path is computed: a zipped layer gives task t's
    output alone (``call_task``), a weightless layer is applied to task t's tensors."""
    needed, stack = set(), list(targets)
    while stack:
        index = stack.pop()
        if index not in values and index not in needed:
            needed.add(index)
            stack.extend(plan.steps[index].inputs)
    task = list(model.output)[t]
    for index in sorted(needed):  # plan steps are in topological order
        step = plan.steps[index]
        args = [values[i] for i in step.inputs]
        layer = model.get_layer(step.name)
        if isinstance(step, graph.Unit):
            values[index] = layer.call_task(args[0], task, training=training)
        else:
            values[index] = layer(args if len(args) > 1 else args[0], training=training)
    return [values[index] for index in targets]


def zipped_layers(model: keras.Model) -> list[_ZippedLayer]:
    """The zipped layers of a zipped model, input to output."""
    return [layer for layer in model.layers if isinstance(layer, _ZippedLayer)]


def read_states(model: keras.Model, plan: graph.Plan) -> list[LayerState]:
    """The :class:`LayerState` of every zipped layer of a model built from ``plan``."""
    return [
        read_layer_state(layer, unit.input_group, unit.kind)
        for layer, unit in zip(zipped_layers(model), plan.units)
    ]


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

    The zipped model's graph is followed back from the task's output (residual Adds and
    Concatenates included): each zipped layer becomes the ordinary layer(s) holding the
    task's view of its weights (shared units first), every other layer a copy from its
    config. The result computes exactly ``zipped(x)[task]`` and nothing for the other tasks.
    """
    return task_model_layers(zipped, task)[0]


def task_model_layers(zipped: keras.Model, task: str) -> tuple:
    """:func:`task_model` and {zipped layer name: the plain layers holding the task's view
    of it (:meth:`~mtz_tf.layers._ZippedLayer.task_layers`, in call order)}."""
    tasks = list(zipped.output)
    if task not in tasks:
        raise ValueError(f"Unknown task {task!r}; the zipped model has {tasks}.")
    t = tasks.index(task)
    inputs = keras.Input(shape=zipped.input.shape[1:], name="input")
    rebuilt = {id(zipped.input): inputs}
    views = {}

    def rebuild(tensor):
        """The task model's tensor for one of the zipped model's (memoised)."""
        if id(tensor) not in rebuilt:
            layer, node_index, _ = tensor._keras_history
            node = layer._inbound_nodes[node_index]
            if isinstance(layer, _ZippedLayer):
                x = node.arguments.args[0]
                x = rebuild(x[t] if isinstance(x, (list, tuple)) else x)
                views[layer.name] = layer.task_layers(task)
                for plain in views[layer.name]:
                    x = plain(x)
            else:
                args = keras.tree.map_structure(rebuild, node.arguments.args)
                x = layer.__class__.from_config(layer.get_config())(*args)
            rebuilt[id(tensor)] = x
        return rebuilt[id(tensor)]

    outputs = rebuild(zipped.output[task])
    return keras.Model(inputs, outputs, name=f"{zipped.name}_{task}"), views


def multi_head_model(zipped: keras.Model) -> keras.Model:
    """A plain Keras model of a zipped model whose hidden layers are all fully shared.

    When every hidden layer computes one tensor for all tasks (fully shared, common input,
    no per-task BatchNorm), the zipped model is an ordinary trunk with one head per task;
    this rebuilds it from ordinary layers (heads named ``<head>_<task>``), e.g. to compress
    it further with Neuron Merging. Outputs equal ``zipped``'s.
    """
    zipped_list = zipped_layers(zipped)
    hidden, head = zipped_list[:-1], zipped_list[-1]
    unshared = [layer.name for layer in hidden if not layer.common_output]
    if unshared:
        raise ValueError(
            f"Layers {unshared} are not fully shared by all tasks (or keep per-task "
            "BatchNorm); only a zip with share=1.0 (and batch_norm='fold' for BN models) is "
            "an ordinary multi-head model."
        )
    tasks = list(zipped.output)
    x = inputs = keras.Input(shape=zipped.input.shape[1:], name="input")
    for layer in zipped.layers:
        if isinstance(layer, keras.layers.InputLayer) or layer is head:
            continue
        if isinstance(layer, _ZippedLayer):
            for plain in layer.task_layers(tasks[0]):
                x = plain(x)
        else:
            x = layer.__class__.from_config(layer.get_config())(x)
    outputs = {}
    for task in tasks:
        y = x
        for plain in head.task_layers(task):
            plain.name = f"{plain.name}_{task}"
            y = plain(y)
        outputs[task] = y
    return keras.Model(inputs, outputs, name=f"{zipped.name}_multi_head")


def multiply_accumulates(model: keras.Model) -> int:
    """Multiply-accumulates of a zipped model's zipped layers for one input, all tasks.

    Per layer, with P output positions (1 for Dense) and kernel positions K (kh·kw, 1 for
    Dense): the shared neurons' P·K·k_in·k once when every task gets the same input (else
    once per task), each task's P·K·m_t·k through its cross-weights and P·K·d_t·(n_t − k)
    for its own neurons — the convention of :func:`mtz_tf.compress.flops.count_flops`.
    """
    total = 0
    for layer in zipped_layers(model):
        output = layer.output[0] if isinstance(layer.output, (list, tuple)) else layer.output
        positions = int(np.prod(output.shape[1:-1])) if len(output.shape) > 2 else 1
        shared = int(np.prod(layer.shared_kernel.shape))
        users = sum(1 for t in range(len(layer.task_names)) if layer.shared_count(t))
        total += positions * shared * (1 if layer.common_input else users)
        for cross, kernel in zip(layer.cross_kernels, layer.task_kernels):
            total += positions * (int(np.prod(cross.shape)) + int(np.prod(kernel.shape)))
    return total

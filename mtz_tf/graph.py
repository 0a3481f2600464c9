"""Reads a Keras model into a plan of zippable units.

A *plan* is the model's layer graph, reduced to what zipping needs: the input shape, and
the steps in topological order, each naming the steps it reads. A step is a zippable
:class:`Unit` (a ``Dense`` or ``Conv2D`` layer with its BatchNorm and the element-wise
activation after it, wherever they live), a channel-wise :class:`PassThrough` (``Flatten``,
``Dropout``, pooling, an activation after an ``Add``) or a :class:`Merge` (``Add``,
``Concatenate``). Channels summed by an ``Add`` are *coupled*: every unit writing into one
residual stream must order its neurons the same way, so the plan lists them as
:class:`CoupledGroup` s (found as connected components of a graph on all unit channels,
through ``Concatenate`` too). Every layer of the model is accounted for: anything the
reader cannot represent exactly raises an error that names the layer, instead of being
skipped.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

from mtz_tf import activations, layer_types, scalar_ops

ELEMENTWISE_ACTIVATIONS = activations.ELEMENTWISE
"""Activations that act on each unit alone, so units can be permuted and merged freely."""

_MERGE_TYPES = ("Add", "Subtract", "Average", "Maximum", "Minimum", "Multiply", "Concatenate")
"""Coupling layers (:mod:`mtz_tf.layer_types`) the plan represents: the sum-like ones tie
channel c of every input together (``Multiply`` also a squeeze-excite gate (B, 1, 1, C)
broadcast over a feature map), ``Concatenate`` puts its inputs side by side."""


def _pass_through_type(layer) -> layer_types.LayerType | None:
    """The registered type of a weightless layer that commutes with a channel permutation
    and takes one input (a :class:`PassThrough`), or None."""
    entry = layer_types.lookup(layer)
    if entry is None or entry.coupling or not entry.permutation:
        return None
    return entry


def _supported_types() -> str:
    passing = [e.name for e in layer_types.REGISTRY.values() if e.permutation and not e.coupling]
    return ", ".join(passing + list(_MERGE_TYPES))


MODEL_INPUT = -1

_HEAD_TAIL_TYPES = ("Flatten", "Reshape", "Activation", "Dropout")
"""Weightless layers that may follow the output head (MobileNetV3's 1×1 convolution head
is flattened, then a softmax Activation); each task's head output goes through them alone."""
"""The ``inputs`` index that stands for the model input."""

CHANNELWISE_KINDS = ("DepthwiseConv2D", "BatchNormalization")
"""Unit kinds whose neuron c reads only input channel c: a depthwise convolution
(depth_multiplier 1) and a BatchNorm that does not follow a Dense/Conv2D layer (a
pre-activation BatchNorm, read as a 1×1 depthwise convolution of ones followed by that
BatchNorm). Such a unit's channels are tied one to one to its input's, so it joins its input
channels' coupled group instead of reading it."""


@dataclasses.dataclass(frozen=True)
class Unit:
    """A ``Dense``, ``Conv2D`` or channel-wise layer with its BatchNorm and activation:
    zippable neurons.

    Attributes:
        name: str, the weighted layer's name in the source model (a standalone
            BatchNorm's own name).
        kind: str, ``"Dense"``, ``"Conv2D"`` or one of :data:`CHANNELWISE_KINDS`.
        units: int, number of neurons (units, filters, or channels of a channel-wise unit).
        use_bias: bool, whether the weighted layer has a bias.
        activation: str, the element-wise activation applied after it (and after its BN),
            as :func:`mtz_tf.activations.identify` names it (a built-in's name, or a
            registered custom function's ``"package>name"``): equal names mean the same
            function.
        batch_norm: str or None, the name of the ``BatchNormalization`` layer right after it.
        batch_norm_epsilon: float or None, that BatchNorm's epsilon.
        conv: tuple or None, ``(kernel_size, strides, padding)`` of a ``Conv2D`` or
            channel-wise unit (``((1, 1), (1, 1), "valid")`` for a standalone BatchNorm).
        input_group: int, rows of the kernel per input channel: H·W of the feature map a
            ``Flatten`` turned into this Dense layer's input, else 1.
        inputs: tuple of int, indices into ``Plan.steps`` of the steps it reads
            (:data:`MODEL_INPUT` for the model input).
    """

    name: str
    kind: str
    units: int
    use_bias: bool
    activation: str
    batch_norm: str | None = None
    batch_norm_epsilon: float | None = None
    conv: tuple | None = None
    input_group: int = 1
    inputs: tuple = (MODEL_INPUT,)


@dataclasses.dataclass(frozen=True)
class PassThrough:
    """A weightless layer that acts on each channel alone (Flatten, Dropout, pooling, or an
    element-wise activation after an ``Add``).

    Attributes:
        name: str, the layer's name in the source model.
        kind: str, its class name.
        config: dict, its Keras config (to rebuild it).
        inputs: tuple of int, as :class:`Unit`.
    """

    name: str
    kind: str
    config: dict = dataclasses.field(default_factory=dict, compare=False)
    inputs: tuple = (MODEL_INPUT,)


@dataclasses.dataclass(frozen=True)
class Merge:
    """An ``Add`` (channels coupled one to one) or a ``Concatenate`` on the channel axis.

    Attributes:
        name: str, the layer's name.
        kind: str, a sum-like coupling type (``"Add"``, ``"Subtract"``, ``"Average"``,
            ``"Maximum"``, ``"Minimum"``: channel c of every input tied) or
            ``"Concatenate"``.
        config: dict, its Keras config.
        inputs: tuple of int, the steps it combines, in order.
    """

    name: str
    kind: str
    config: dict = dataclasses.field(default_factory=dict, compare=False)
    inputs: tuple = ()


@dataclasses.dataclass(frozen=True)
class CoupledGroup:
    """Output channels of several units that must keep one order, because an ``Add`` sums
    them channel by channel (directly, or through a ``Concatenate``).

    Attributes:
        members: tuple of ``(unit name, start, stop)``: channel ``start + i`` of every member
            is coupled with channel ``start + i`` of every other member.
    """

    members: tuple

    @property
    def units(self) -> tuple:
        return tuple(name for name, _, _ in self.members)


def is_channelwise(unit: Unit) -> bool:
    """Whether ``unit``'s neuron c reads only its input channel c (:data:`CHANNELWISE_KINDS`)."""
    return unit.kind in CHANNELWISE_KINDS


@dataclasses.dataclass(frozen=True)
class Plan:
    """The model's steps in topological order, each naming the steps it reads.

    Attributes:
        input_shape: tuple, the model's input shape without the batch dimension.
        steps: tuple of :class:`Unit` / :class:`PassThrough` / :class:`Merge`; the last
            unit is the output head and produces the model output.
        coupled_groups: tuple of :class:`CoupledGroup`, the channels tied together by
            residual ``Add`` layers (empty for a chain).
        output: int, the index of the step producing the model output (-1: the last).
    """

    input_shape: tuple
    steps: tuple
    coupled_groups: tuple = ()
    output: int = -1

    @property
    def output_step(self) -> int:
        """The index into :attr:`steps` of the step that produces the model output: the
        head unit's, or the last of the weightless layers after it."""
        return self.output if self.output >= 0 else len(self.steps) - 1

    @property
    def units(self) -> list[Unit]:
        """The zippable units in order; the last one is the output head."""
        return [s for s in self.steps if isinstance(s, Unit)]

    @property
    def hidden_units(self) -> list[Unit]:
        """The units that may be zipped (all but the output head)."""
        return self.units[:-1]

    def unit_sources(self, step_index: int) -> list:
        """The channel segments of step ``step_index``'s output: ``[(unit index, start,
        stop), ...]`` in channel order, unit index into :attr:`units` (an empty list for
        the model input). Through ``Add``, the first input's segments (all are coupled)."""
        unit_index = {s.name: i for i, s in enumerate(self.units)}
        return [(unit_index[name], a, b) for name, a, b in _segments(self.steps, step_index)]

    def unit_step(self, unit_index: int) -> int:
        """The index into :attr:`steps` of unit ``unit_index``."""
        return [i for i, s in enumerate(self.steps) if isinstance(s, Unit)][unit_index]

    def reads_model_input(self, unit_index: int) -> bool:
        """Whether unit ``unit_index`` reads the model input (through pass-throughs only)."""
        return not self.unit_sources(self.steps[self.unit_step(unit_index)].inputs[0])

    def spans(self, unit_index: int) -> bool:
        """Whether unit ``unit_index`` is a *spanning* channel-wise unit: a depthwise
        convolution or standalone BatchNorm reading a ``Concatenate`` of several units'
        outputs (DenseNet's BatchNorm before each block). Its channel c still reads only
        input channel c, so its channels follow its input segments' orders; it belongs to
        none of :meth:`zip_groups` and its readers read those segments through it
        (:meth:`unit_sources`)."""
        unit = self.units[unit_index]
        if not is_channelwise(unit):
            return False
        return len(_segments(self.steps, self.steps[self.unit_step(unit_index)].inputs[0])) > 1

    def zip_groups(self) -> list[tuple]:
        """A partition of the hidden units (indices into :attr:`units`) into the sets that
        share one neuron order: each coupled group, and every other unit alone; in order of
        each set's first unit. Spanning units (:meth:`spans`) are in no set: their order is
        their input segments'.

        Raises:
            ValueError: if a coupled group couples only part of a unit's channels (a
                ``Concatenate`` feeding an ``Add``) or includes the output head.
        """
        units = self.units
        index = {u.name: i for i, u in enumerate(units)}
        grouped, result = set(), []
        for group in self.coupled_groups:
            members = [index[name] for name in group.units]
            partial = [
                name
                for name, start, stop in group.members
                if start != 0 or stop != units[index[name]].units
            ]
            if partial or len(set(members)) != len(members):
                raise ValueError(
                    f"Layers {sorted(set(partial))} have only part of their channels coupled "
                    "with other layers (an Add reading a Concatenate of several layers' "
                    "outputs); "
                    "zipping needs every coupled layer's channels coupled as a whole."
                )
            if len(units) - 1 in members:
                raise ValueError(
                    f"The output layer {units[-1].name!r} is coupled through an Add; output "
                    "heads are never zipped."
                )
            grouped.update(members)
            result.append(tuple(sorted(members)))
        result += [(i,) for i in range(len(units) - 1) if i not in grouped and not self.spans(i)]
        return sorted(result, key=min)

    def input_segments(self, unit_index: int, groups: list[tuple]) -> list[tuple]:
        """The channel segments unit ``unit_index`` reads, as ``(set index into groups,
        unit index)`` in channel order: empty when it reads the model input or is a
        channel-wise member of its input's own set (:func:`is_channelwise`: a writer rather
        than a reader); one for an ordinary reader; several for a reader of a
        ``Concatenate`` of several units' outputs, or a spanning unit (:meth:`spans`)."""
        unit = self.units[unit_index]
        sources = self.unit_sources(self.steps[self.unit_step(unit_index)].inputs[0])
        if not sources or (is_channelwise(unit) and len(sources) == 1):
            return []
        set_of = {u: g for g, members in enumerate(groups) for u in members}
        return [(set_of[u], u) for u, _, _ in sources]

    def input_group(self, unit_index: int, groups: list[tuple]):
        """The index into ``groups`` of the one set whose output unit ``unit_index`` reads,
        or None when it reads the model input, is a channel-wise member of its input's set,
        or reads several segments (:meth:`input_segments`)."""
        segments = self.input_segments(unit_index, groups)
        return segments[0][0] if len(segments) == 1 else None


def _hashable(value):
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def step_function(step) -> tuple:
    """``(property, value)`` pairs that define the function a step computes, widths aside.

    A unit: layer type, activation (by identity, :mod:`mtz_tf.activations`), use_bias,
    kernel size, strides and padding, whether a BatchNorm follows and its epsilon, and the
    flattened positions per input channel. A pass-through layer: its type, and its
    activation or its type's ``function_keys`` (:mod:`mtz_tf.layer_types`: pool size,
    strides, padding, data format, ...). A merge: its type (a ``Concatenate`` is always on
    the channel axis).
    """
    if isinstance(step, Unit):
        properties = [
            ("layer type", step.kind),
            ("activation", step.activation),
            ("use_bias", step.use_bias),
        ]
        if step.conv is not None:
            properties += list(zip(("kernel_size", "strides", "padding"), step.conv))
        properties.append(("BatchNormalization after it", step.batch_norm is not None))
        if step.batch_norm is not None:
            properties.append(("BatchNormalization epsilon", step.batch_norm_epsilon))
        return tuple(properties) + (("flattened positions per channel", step.input_group),)
    if step.kind == "Activation":
        return (
            ("layer type", step.kind),
            ("activation", activations.label(step.config["activation"])),
        )
    entry = layer_types.REGISTRY.get(step.kind)
    keys = entry.function_keys if entry is not None else ()
    return (("layer type", step.kind),) + tuple((k, _hashable(step.config.get(k))) for k in keys)


def first_difference(reference: Plan, other: Plan) -> str | None:
    """Where ``other`` computes something else than ``reference`` (widths aside), as a
    phrase naming the layer, the property and both values; None when they agree."""
    if reference.input_shape != other.input_shape:
        return f"in input shape: {other.input_shape} vs {reference.input_shape}"
    if len(other.steps) != len(reference.steps):
        return (
            f"in depth: {len(other.steps)} vs {len(reference.steps)} steps (layers, with "
            "BatchNorm and activations counted with their Dense/Conv2D layer)"
        )
    for mine, theirs in zip(reference.steps, other.steps):
        if mine.inputs != theirs.inputs:
            return f"at layer {theirs.name!r}: it reads other layers than {mine.name!r} does"
        for (key, a), (_, b) in zip(step_function(mine), step_function(theirs)):
            if a != b:
                return f"at layer {theirs.name!r}: {key} {b!r} vs {a!r} (layer {mine.name!r})"
    return None


def _trace_back(steps: list, index: int):
    """The first step at or before ``index`` along first inputs that is not a
    :class:`PassThrough`, and the pass-through kinds met on the way."""
    kinds = []
    while index != MODEL_INPUT and isinstance(steps[index], PassThrough):
        kinds.append(steps[index].kind)
        index = steps[index].inputs[0]
    return (None if index == MODEL_INPUT else steps[index]), kinds


def _unit(layer, steps: list, source: int) -> Unit:
    """Builds the :class:`Unit` of a Dense or Conv2D layer reading step ``source``."""
    activation = activations.canonical(layer.activation, layer.name)
    before, kinds = _trace_back(steps, source)
    seen_dense = any(isinstance(s, Unit) and s.kind == "Dense" for s in steps[: source + 1])
    if isinstance(layer, keras.layers.Dense):
        input_shape = layer.input.shape
        if len(input_shape) != 2:
            raise ValueError(
                f"Dense layer {layer.name!r} receives a {len(input_shape) - 1}-D input per "
                "sample; flatten feature maps before Dense layers."
            )
        group = 1
        if "Flatten" in kinds and before is not None:
            channels = sum(stop - start for _, start, stop in _segments(steps, source))
            group = int(input_shape[-1]) // max(channels, 1)
        return Unit(
            layer.name,
            "Dense",
            int(layer.units),
            bool(layer.use_bias),
            activation,
            input_group=group,
            inputs=(source,),
        )
    kind = type(layer).__name__
    if seen_dense:
        raise ValueError(f"{kind} layer {layer.name!r} follows a Dense layer; not supported.")
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return _depthwise_unit(layer, source, activation)
    if layer.groups != 1 or tuple(layer.dilation_rate) != (1, 1):
        raise ValueError(
            f"Conv2D layer {layer.name!r} uses groups={layer.groups} / dilation_rate="
            f"{layer.dilation_rate}; only groups=1 without dilation is supported."
        )
    if layer.data_format != "channels_last":
        raise ValueError(f"Conv2D layer {layer.name!r} must use data_format='channels_last'.")
    conv = (tuple(layer.kernel_size), tuple(layer.strides), layer.padding)
    return Unit(
        layer.name,
        "Conv2D",
        int(layer.filters),
        bool(layer.use_bias),
        activation,
        conv=conv,
        inputs=(source,),
    )


def _depthwise_unit(layer, source: int, activation: str) -> Unit:
    """The channel-wise :class:`Unit` of a ``DepthwiseConv2D`` layer, checked."""
    if source == MODEL_INPUT:
        raise ValueError(
            f"DepthwiseConv2D layer {layer.name!r} reads the model input; its channels are "
            "the input's own (not neurons that zipping could reorder). Start the model with a "
            "Conv2D layer."
        )
    if layer.depth_multiplier != 1 or tuple(layer.dilation_rate) != (1, 1):
        raise ValueError(
            f"DepthwiseConv2D layer {layer.name!r} uses depth_multiplier="
            f"{layer.depth_multiplier} / dilation_rate={layer.dilation_rate}; only "
            "depth_multiplier=1 without dilation is supported."
        )
    if layer.data_format != "channels_last":
        raise ValueError(
            f"DepthwiseConv2D layer {layer.name!r} must use data_format='channels_last'."
        )
    return Unit(
        layer.name,
        "DepthwiseConv2D",
        int(layer.input.shape[-1]),
        bool(layer.use_bias),
        activation,
        conv=(tuple(layer.kernel_size), tuple(layer.strides), layer.padding),
        inputs=(source,),
    )


def _standalone_batch_norm(layer, source: int) -> Unit:
    """The channel-wise :class:`Unit` of a BatchNorm that does not follow a Dense/Conv2D
    layer (e.g. a pre-activation BatchNorm after an ``Add``)."""
    if source == MODEL_INPUT:
        raise ValueError(
            f"BatchNormalization layer {layer.name!r} normalizes the model input; put a "
            "Normalization or Rescaling layer there, or start the model with a Conv2D layer."
        )
    if len(layer.input.shape) != 4:
        raise ValueError(
            f"BatchNormalization layer {layer.name!r} does not follow a Dense or Conv2D layer "
            "and normalizes flat features; standalone BatchNorms are supported on feature "
            "maps (batch, H, W, C). Put it right after the Dense layer instead."
        )
    return Unit(
        layer.name,
        "BatchNormalization",
        int(layer.input.shape[-1]),
        False,
        "linear",
        batch_norm=layer.name,
        batch_norm_epsilon=float(layer.epsilon),
        conv=((1, 1), (1, 1), "valid"),
        inputs=(source,),
    )


def _segments(steps: list, index: int) -> list:
    """Channel segments ``(unit name, start, stop)`` of step ``index``'s output."""
    if index == MODEL_INPUT:
        return []
    step = steps[index]
    if isinstance(step, Unit):
        if is_channelwise(step):  # a spanning unit passes its input's segments on
            inner = _segments(steps, step.inputs[0])
            if len(inner) > 1:
                return inner
        return [(step.name, 0, step.units)]
    if isinstance(step, Merge) and step.kind == "Concatenate":
        return [seg for i in step.inputs for seg in _segments(steps, i)]
    return _segments(steps, step.inputs[0])


def _input_indices(layer, producer: dict) -> tuple:
    inputs = layer.input
    tensors = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    indices = []
    for tensor in tensors:
        if id(tensor) not in producer:
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) reads a tensor that no layer "
                "the reader knows produced (a nested model or a layer used twice?); "
                "flatten nested models and call each layer once."
            )
        indices.append(producer[id(tensor)])
    return tuple(indices)


def _fold_check(layer, steps: list, source: int, uses: dict, what: str) -> Unit:
    """The unit that ``layer`` (a BN or activation) folds into, checked."""
    last = steps[source] if source != MODEL_INPUT else None
    if not isinstance(last, Unit):
        raise ValueError(
            f"{what} layer {layer.name!r} must directly follow a Dense or Conv2D layer "
            "(or its BatchNormalization)."
        )
    if uses[id(layer.input)] != 1:
        raise ValueError(
            f"The output of {last.name!r} is read by {layer.name!r} and by other layers; a "
            f"{what} must be the only reader of the layer it follows."
        )
    return last


def _folds_into(last, uses: dict, layer) -> bool:
    """Whether a BatchNorm ``layer`` folds into the unit ``last`` it reads: the unit has
    neither a BatchNorm nor an activation yet and ``layer`` is its only reader."""
    return (
        isinstance(last, Unit)
        and last.batch_norm is None
        and last.activation == "linear"
        and uses[id(layer.input)] == 1
    )


def _relu_layer_activation(layer) -> str:
    """The activation a ``ReLU`` layer computes: ``"relu"``, or ``"relu6"`` for
    ``ReLU(max_value=6)`` (MobileNet's); other caps, slopes and thresholds are refused."""
    slope, threshold, cap = layer.negative_slope, layer.threshold, layer.max_value
    if not slope and not threshold and cap is None:
        return "relu"
    if not slope and not threshold and cap is not None and float(cap) == 6.0:
        return "relu6"
    raise ValueError(
        f"Layer {layer.name!r} is a ReLU with max_value={cap}, negative_slope={slope}, "
        f"threshold={threshold}; supported are the plain ReLU and ReLU(max_value=6) "
        "(relu6). Use an Activation layer with a built-in activation otherwise."
    )


def _input_normalization(layer, steps: list, source: int) -> PassThrough:
    """The :class:`PassThrough` of a ``Normalization`` of the model input (its statistics
    in the config, so that the zipped model rebuilds it without adapting)."""
    if _segments(steps, source):
        raise ValueError(
            f"Normalization layer {layer.name!r} normalizes the outputs of zippable layers; "
            "its per-channel statistics would have to follow their neuron order. Zipping "
            "takes a Normalization only on the model input (use BatchNormalization inside)."
        )
    if tuple(np.atleast_1d(layer.axis)) not in ((-1,), (len(layer.input.shape) - 1,)):
        raise ValueError(
            f"Normalization layer {layer.name!r} normalizes axis {layer.axis}; zipping takes "
            "the per-channel (last axis) Normalization only."
        )
    config = layer.get_config()
    for key, variable in (("mean", layer.mean), ("variance", layer.variance)):
        config[key] = [float(v) for v in np.ravel(variable.numpy())]
    config["axis"] = -1
    return PassThrough(layer.name, "Normalization", config, (source,))


def _pass_through_step(layer, kind: str, source: int) -> PassThrough:
    """The :class:`PassThrough` of a channel-wise weightless layer, checked."""
    config = layer.get_config()
    if kind == "Reshape":
        return _channel_reshape(layer, config, source)
    if config.get("data_format", "channels_last") != "channels_last":
        raise ValueError(
            f"Layer {layer.name!r} ({kind}) uses data_format={config['data_format']!r}; "
            "zipping needs channels_last feature maps."
        )
    if kind == "Rescaling" and any(np.ndim(config[k]) for k in ("scale", "offset")):
        raise ValueError(
            f"Rescaling layer {layer.name!r} has a per-channel scale or offset; only scalar "
            "ones commute with a permutation of the channels."
        )
    return PassThrough(layer.name, kind, config, (source,))


def _channel_reshape(layer, config: dict, source: int) -> PassThrough:
    """A ``Reshape`` that only adds or drops unit axes before the channel axis (a
    squeeze-excite block's (B, C) -> (B, 1, 1, C)), with the channel count left open (-1)
    so that it fits every task's width."""
    before, after = tuple(layer.input.shape[1:]), tuple(config["target_shape"])
    if before[-1:] != after[-1:] or any(d != 1 for d in before[:-1] + after[:-1]):
        raise ValueError(
            f"Reshape layer {layer.name!r} turns {before} into {after}; zipping takes a "
            "Reshape only when it adds or drops unit axes before the channel axis, e.g. "
            "(C,) -> (1, 1, C)."
        )
    config["target_shape"] = after[:-1] + (-1,)
    return PassThrough(layer.name, "Reshape", config, (source,))


def _merge_step(layer, sources: tuple) -> Merge:
    kind = type(layer).__name__
    if kind == "Concatenate" and layer.axis not in (-1, len(layer.output.shape) - 1):
        raise ValueError(
            f"Concatenate layer {layer.name!r} joins along axis {layer.axis}; only the "
            "channel axis (-1) keeps neurons separable."
        )
    return Merge(name=layer.name, kind=kind, config=layer.get_config(), inputs=sources)


def _coupled_groups(steps: list) -> tuple:
    """Channels tied by ``Add``: connected components of a graph on all unit channels."""
    units = [s for s in steps if isinstance(s, Unit)]
    offsets = np.cumsum([0] + [u.units for u in units])
    offset = {u.name: int(o) for u, o in zip(units, offsets)}

    def channels(index):  # global channel ids of a step's output
        segs = _segments(steps, index)
        if not segs:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([offset[n] + np.arange(a, b) for n, a, b in segs])

    edges = []
    for index, step in enumerate(steps):
        if isinstance(step, Unit) and is_channelwise(step):
            # Neuron c of a channel-wise unit reads its input channel c only.
            ids = channels(step.inputs[0])
            if len(ids) != step.units:
                raise ValueError(
                    f"Layer {step.name!r} ({step.kind}) reads channels the reader cannot trace "
                    "to Dense/Conv2D layers."
                )
            edges.append(np.stack([channels(index), ids]))
        if isinstance(step, Merge) and step.kind != "Concatenate":
            first = channels(step.inputs[0])
            for other in step.inputs[1:]:
                ids = channels(other)
                if len(ids) != len(first) or not len(first):
                    raise ValueError(
                        f"Add layer {step.name!r} sums inputs whose channels the reader cannot "
                        "trace to Dense/Conv2D layers of one width (e.g. the model input)."
                    )
                edges.append(np.stack([first, ids]))
    if not edges:
        return ()
    pairs = np.concatenate(edges, axis=1)
    total = int(offsets[-1])
    adjacency = scipy.sparse.coo_matrix((np.ones(pairs.shape[1]), tuple(pairs)), (total, total))
    _, label = scipy.sparse.csgraph.connected_components(adjacency, directed=False)
    owner = np.searchsorted(offsets, np.arange(total), side="right") - 1  # unit of each channel
    sizes = np.bincount(label)
    coupled = np.flatnonzero(sizes[label] > 1)  # channels coupled with at least one other
    # Components with the same set of units form one group; members are channel ranges.
    key_of = {}
    for component in np.unique(label[coupled]):
        key_of.setdefault(tuple(np.unique(owner[label == component])), []).append(component)
    groups = []
    for components in key_of.values():
        mask = np.isin(label, components)
        members = []
        for u in np.unique(owner[mask]):
            local = np.flatnonzero(mask & (owner == u)) - offsets[u]
            runs = np.split(local, np.flatnonzero(np.diff(local) != 1) + 1)
            members += [(units[u].name, int(r[0]), int(r[-1]) + 1) for r in runs]
        groups.append(CoupledGroup(members=tuple(members)))
    order = {u.name: i for i, u in enumerate(units)}
    return tuple(sorted(groups, key=lambda g: min(order[n] for n in g.units)))


def read_plan(model: keras.Model) -> Plan:
    """Reads ``model`` into a :class:`Plan`.

    Args:
        model: keras.Model, a Sequential or functional graph of ``Conv2D`` and ``Dense``
            layers, each optionally followed by ``BatchNormalization`` and an activation,
            with pooling, ``Flatten`` and ``Dropout`` between them, and ``Add`` /
            ``Concatenate`` (channel axis) joining branches, e.g. residual blocks; one
            input, one output produced by the last Dense/Conv2D layer.

    Returns:
        The model's :class:`Plan`, with the coupled channel groups of its ``Add`` layers.

    Raises:
        ValueError: for a layer type the reader cannot represent (named in the message), a
            non-element-wise hidden activation, several inputs/outputs, or a layer used twice.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a keras.Model. Received: {type(model).__name__}")
    if not isinstance(model, keras.Sequential) and not hasattr(model, "_nodes_by_depth"):
        raise TypeError(
            f"Model {model.name!r} is a subclassed keras.Model ({type(model).__name__}): its "
            "layers are wired in Python code in `call()`, so there is no layer graph to read. "
            "Build it as a functional model (`keras.Model(inputs, outputs)`) or a "
            "`keras.Sequential` that starts with `keras.Input`, and copy the weights over."
        )
    if not model.built or not model.inputs:
        raise ValueError(
            f"Model {model.name!r} has no defined input; build it with an `Input` first."
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            f"Model {model.name!r} must have one input and one output. Received "
            f"{len(model.inputs)} inputs and {len(model.outputs)} outputs."
        )
    model = scalar_ops.as_layers(model)
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    uses: dict = {}
    for layer in layers:
        inputs = layer.input
        for tensor in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
            uses[id(tensor)] = uses.get(id(tensor), 0) + 1
    producer = {id(model.inputs[0]): MODEL_INPUT}
    steps: list = []
    for layer in layers:
        kind = type(layer).__name__
        sources = _input_indices(layer, producer)
        source = sources[0]
        index = len(steps)
        if isinstance(
            layer, (keras.layers.Dense, keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
        ):
            steps.append(_unit(layer, steps, source))
        elif isinstance(layer, keras.layers.BatchNormalization):
            if not layer.scale or not layer.center:
                raise ValueError(
                    f"BatchNormalization layer {layer.name!r} must have scale=True and center=True."
                )
            axis = layer.axis if isinstance(layer.axis, int) else tuple(layer.axis)
            if axis not in (-1, len(layer.input.shape) - 1, (len(layer.input.shape) - 1,)):
                raise ValueError(
                    f"BatchNormalization layer {layer.name!r} normalizes axis {layer.axis}; "
                    "zipping needs per-channel BatchNorm on the last (channel) axis, axis=-1."
                )
            last = steps[source] if source != MODEL_INPUT else None
            if _folds_into(last, uses, layer):
                steps[source] = dataclasses.replace(
                    last, batch_norm=layer.name, batch_norm_epsilon=float(layer.epsilon)
                )
                index = source
            else:
                steps.append(_standalone_batch_norm(layer, source))
        elif isinstance(layer, (keras.layers.Activation, keras.layers.ReLU)):
            activation = (
                activations.canonical(layer.activation, layer.name)
                if isinstance(layer, keras.layers.Activation)
                else _relu_layer_activation(layer)
            )
            if source != MODEL_INPUT and not isinstance(steps[source], Unit):
                # After a merge or a weightless layer: its own step (element-wise unless it
                # ends the model, :func:`_check_plan`).
                config = {"name": layer.name, "activation": activations.resolve(activation)}
                steps.append(PassThrough(layer.name, "Activation", config, (source,)))
            else:
                last = _fold_check(layer, steps, source, uses, "Activation")
                if last.activation != "linear":
                    raise ValueError(
                        f"Activation layer {layer.name!r} follows {last.name!r}, which already "
                        f"applies {last.activation!r}; stacked activations are not supported."
                    )
                steps[source] = dataclasses.replace(last, activation=activation)
                index = source
        elif _pass_through_type(layer) is not None:
            steps.append(_pass_through_step(layer, kind, source))
        elif kind == "Normalization" and layer_types.lookup(layer) is not None:
            steps.append(_input_normalization(layer, steps, source))
        elif kind in _MERGE_TYPES and layer_types.lookup(layer) is not None:
            steps.append(_merge_step(layer, sources))
        else:
            raise ValueError(
                f"Layer {layer.name!r} of type {kind} is not supported for zipping. "
                "Supported: Dense, Conv2D (groups=1, no dilation), DepthwiseConv2D "
                "(depth_multiplier=1, no dilation), BatchNormalization, "
                f"Activation, ReLU, {_supported_types()}."
            )
        producer[id(layer.output)] = index
    plan = Plan(
        input_shape=tuple(model.inputs[0].shape[1:]),
        steps=tuple(steps),
        coupled_groups=_coupled_groups(steps),
        output=producer.get(id(model.outputs[0]), -1),
    )
    _check_plan(model, plan, producer)
    return plan


def _check_plan(model: keras.Model, plan: Plan, producer: dict) -> None:
    units = plan.units
    if len(units) < 2:
        raise ValueError(
            f"Model {model.name!r} has {len(units)} Dense layer(s); zipping needs at least one "
            "hidden Dense layer and an output Dense layer."
        )
    head, tail = _trace_back(list(plan.steps), plan.output)
    tail_steps = set()
    index = plan.output
    while plan.steps[index] is not head:
        tail_steps.add(index)
        index = plan.steps[index].inputs[0]
    if (
        head is not units[-1]
        or any(k not in _HEAD_TAIL_TYPES for k in tail)
        or len(tail_steps) != len(plan.steps) - 1 - plan.unit_step(len(units) - 1)
    ):
        raise ValueError(
            f"The output of model {model.name!r} must come from its last Dense or Conv2D "
            f"layer ({units[-1].name!r}) and its activation, followed at most by "
            f"{', '.join(_HEAD_TAIL_TYPES)} layers."
        )
    for index, step in enumerate(plan.steps):
        elementwise = step.kind != "Activation" or activations.is_elementwise(
            activations.canonical(step.config["activation"], step.name)
        )
        if isinstance(step, PassThrough) and index not in tail_steps and not elementwise:
            raise ValueError(
                f"Activation layer {step.name!r} (after {plan.steps[step.inputs[0]].name!r}) "
                "does not act on each channel alone; only the output may end with one."
            )
    if is_channelwise(units[-1]):
        raise ValueError(
            f"The output of model {model.name!r} comes from {units[-1].name!r} "
            f"({units[-1].kind}); the output layer must be a Dense or Conv2D layer."
        )
    for unit in plan.hidden_units:
        if not activations.is_elementwise(unit.activation):
            raise ValueError(
                f"Hidden layer {unit.name!r} uses activation {unit.activation!r}, which does not "
                f"act on each neuron alone. Supported: {sorted(ELEMENTWISE_ACTIVATIONS)} and "
                "registered custom element-wise functions."
            )
    for step in plan.steps:
        if isinstance(step, Unit):
            continue
        before, _ = _trace_back(list(plan.steps), step.inputs[0])
        after_dense = isinstance(before, Unit) and before.kind == "Dense"
        spatial = isinstance(step, PassThrough) and getattr(
            layer_types.REGISTRY.get(step.kind), "spatial", False
        )
        if after_dense and spatial:
            raise ValueError(
                f"Layer {step.name!r} ({step.kind}) comes after a Dense layer; only Dropout, "
                "activations and Add/Concatenate may stand between Dense layers."
            )


def unit_weights(model: keras.Model, unit: Unit) -> tuple:
    """Float64 copies of a unit's (kernel, bias, norm): kernel (..., d, n), bias (n,) (zeros
    without bias), norm (gamma, beta, moving_mean, moving_variance) or None. A channel-wise
    unit's kernel is (kh, kw, 1, n), one input row per neuron (its own channel); a
    standalone BatchNorm's is ones (1, 1, 1, n)."""
    layer = model.get_layer(unit.name)
    if unit.kind == "BatchNormalization":  # a 1×1 depthwise convolution of ones, then BN
        kernel = np.ones((1, 1, 1, unit.units))
    else:
        kernel = np.array(layer.kernel.numpy(), dtype=np.float64)
    if unit.kind == "DepthwiseConv2D":  # (kh, kw, C, 1) -> (kh, kw, 1, C): one row a neuron
        kernel = np.swapaxes(kernel, -1, -2)
    bias = np.array(layer.bias.numpy(), np.float64) if unit.use_bias else np.zeros(unit.units)
    norm = None
    if unit.batch_norm:
        bn = model.get_layer(unit.batch_norm)
        norm = tuple(
            np.array(v.numpy(), dtype=np.float64)
            for v in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)
        )
    return kernel, bias, norm


def describe(model: keras.Model, print_fn=print) -> bool:
    """Prints what zipping will do with ``model``: its units (each Dense/Conv2D with its
    BatchNorm and activation, and what it reads), the residual streams (coupled groups: units
    whose channels an ``Add`` ties, zipped with one matching) with the layers that couple
    them, and the output head (never zipped); or, for a model the reader refuses, why.

    Args:
        model: keras.Model, the model to describe (not modified).
        print_fn: callable taking one line of text (default ``print``), as in Keras's
            ``Model.summary``.

    Returns:
        bool, whether the model can be zipped.
    """
    try:
        plan = read_plan(model)
        groups = plan.zip_groups()
    except (ValueError, TypeError) as error:
        print_fn(f"Model {getattr(model, 'name', model)!r} cannot be zipped: {error}")
        return False
    units = plan.units
    stream_of = {}
    for number, members in enumerate((g for g in groups if len(g) > 1), start=1):
        stream_of.update({u: number for u in members})

    def source(step_index: int) -> str:
        segments = plan.unit_sources(step_index)
        if not segments:
            return "model input"
        names = [units[u].name for u, _, _ in segments]
        if len(names) > 2:  # a late DenseNet layer reads dozens
            return f"{names[0]} + ... + {names[-1]} ({len(names)} layers, concatenated)"
        return " + ".join(names)

    print_fn(
        f"Model {model.name!r}: {len(units) - 1} hidden units zippable, input shape "
        f"{plan.input_shape}"
    )
    header = ("#", "layer", "kind", "units", "BatchNorm", "activation", "reads", "stream")
    rows = []
    for index, unit in enumerate(units):
        step = plan.steps[plan.unit_step(index)]
        stream = (
            "head"
            if index == len(units) - 1
            else f"s{stream_of[index]}"
            if index in stream_of
            else "follows"
            if plan.spans(index)
            else "-"
        )
        rows.append(
            (
                str(index),
                unit.name,
                unit.kind,
                str(unit.units),
                unit.batch_norm or "-",
                unit.activation,
                source(step.inputs[0]),
                stream,
            )
        )
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print_fn("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    coupling = {}
    for step in plan.steps:
        if isinstance(step, Merge) and step.kind != "Concatenate":
            first = plan.unit_sources(step.inputs[0])
            if first:
                coupling.setdefault(stream_of.get(first[0][0]), []).append(step.name)
        if isinstance(step, Unit) and is_channelwise(step):
            own = next(i for i, u in enumerate(units) if u is step)
            coupling.setdefault(stream_of.get(own), []).append(f"{step.name} (channel-wise)")
    if stream_of:
        print_fn(
            "Coupled streams (their units share one neuron order, one matching each: channels "
            "summed by an Add, or read one to one by a depthwise conv or BatchNorm):"
        )
    for number in sorted(set(stream_of.values())):
        members = [units[u].name for u, s in stream_of.items() if s == number]
        print_fn(
            f"  s{number}: {len(members)} units ({', '.join(members)}), coupled by "
            f"{', '.join(coupling.get(number, []))}"
        )
    followers = [u.name for i, u in enumerate(units[:-1]) if plan.spans(i)]
    if followers:
        print_fn(
            f"{len(followers)} channel-wise units read a Concatenate of several layers (stream "
            "'follows'): their channels follow their inputs' matchings, laid out shared-first."
        )
    print_fn(f"Output head (never zipped): {units[-1].name}")
    return True

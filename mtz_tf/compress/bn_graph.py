"""Reads a Keras model into channel groups: which BatchNorm scales write which channels.

Channel pruning on BatchNorm scales (:mod:`mtz_tf.compress.ista`) needs to know, for every
tensor of the network, which ``Conv2D``/``Dense`` -> ``BatchNormalization`` pairs *write* its
channels and which ``Conv2D``/``Dense`` layers *read* them. Layers that act on each channel
alone (element-wise activations, pooling, ``Dropout``, ``Flatten``) and residual ``Add``
layers keep channel c of their inputs at channel c of their output, so the tensors they
connect form one :class:`ChannelGroup`: a residual stream is one group whose writers are all
the BatchNorms added into it. Channel c of a group can only be removed when *every* writer's
scale gamma[c] is zero; then channel c is a constant everywhere in the group.

A group is *prunable* when all its writers are ``Conv2D``/``Dense`` (linear activation, read
only by the BatchNorm) followed by a ``BatchNormalization`` with a scale over the last axis,
all its readers are ``Conv2D`` (``groups=1``) or ``Dense`` layers, and none of its tensors is a
model output. Other groups are reported with the reason and left alone.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from mtz_tf import activations, graph, layer_types

_CHANNELWISE_TYPES = (
    keras.layers.ReLU,
    keras.layers.Activation,
    keras.layers.Add,
) + layer_types.types_with(positive_scale=True, constant=True, coupling=False)
"""Layers whose output channel c depends only on input channel c (the group's members):
activations, ``Add`` (whose constants :func:`mtz_tf.compress.ista.group_constants` sums),
and the registered weightless types that pass a constant channel and commute with a
positive scale (:mod:`mtz_tf.layer_types`: pooling, Dropout, Flatten, Cropping2D,
UpSampling2D, ...; not ZeroPadding2D, whose border zeros break a constant)."""

_HOMOGENEOUS_ACTIVATIONS = frozenset({"linear", "relu"})
"""Activations with f(a x) = a f(x) for a > 0 (needed by the gamma-W rescaling)."""

_ELEMENTWISE = graph.ELEMENTWISE_ACTIVATIONS | {"relu_variant"}
"""Activations a group member may apply (ReLU with a cap/slope/threshold included)."""


@dataclasses.dataclass(frozen=True)
class Writer:
    """A ``Conv2D``/``Dense`` layer and the BatchNorm that normalises its output.

    Attributes:
        bn: str, the ``BatchNormalization`` layer's name.
        producer: str, the ``Conv2D``/``Dense`` layer feeding it.
    """

    bn: str
    producer: str


@dataclasses.dataclass(frozen=True)
class Reader:
    """A ``Conv2D``/``Dense`` layer that reads a group's channels.

    Attributes:
        name: str, the reading layer.
        member: str, the group member whose output it reads.
        rows_per_channel: int, kernel rows (input positions) attached to one channel: the
            spatial size H*W for a ``Dense`` reading through ``Flatten``, else 1.
    """

    name: str
    member: str
    rows_per_channel: int = 1


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Tensors that carry the same channels, with their writers and readers.

    Attributes:
        width: int, number of channels.
        writers: tuple of :class:`Writer`, the BatchNorms whose outputs are summed into it.
        readers: tuple of :class:`Reader`.
        members: tuple of str, the layers whose outputs belong to the group, in
            topological order (writers' BatchNorms first).
        prunable: bool, whether channels of this group may be removed.
        reason: str, why not ("" when prunable).
    """

    width: int
    writers: tuple
    readers: tuple
    members: tuple
    prunable: bool
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class BNGraph:
    """The channel groups of a model.

    Attributes:
        groups: tuple of :class:`ChannelGroup`, one per BatchNorm-written tensor family.
        input_spatial_size: int, H*W of the model input (1 for a non-image input).
        output_layers: tuple of str, layers whose output is a model output.
        parents: dict {layer name: tuple of parent layer names}.
    """

    groups: tuple
    input_spatial_size: int
    output_layers: tuple
    parents: dict

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        """The groups whose channels may be removed."""
        return [g for g in self.groups if g.prunable]


def _parents(layer) -> tuple[str, ...]:
    if isinstance(layer, keras.layers.InputLayer):
        return ()
    inputs = layer.input
    inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    return tuple(t._keras_history.operation.name for t in inputs)


def _is_channels_last_conv(layer) -> bool:
    return (
        type(layer) is keras.layers.Conv2D
        and layer.data_format == "channels_last"
        and int(layer.groups) == 1
    )


def _is_linear_unit(layer) -> bool:
    return (_is_channels_last_conv(layer) or type(layer) is keras.layers.Dense) and (
        activations.label(layer.activation) == "linear"
    )


def _bn_axis_is_last(layer) -> bool:
    axis = layer.axis
    axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
    return isinstance(axis, int) and axis in (-1, len(layer.input.shape) - 1)


def member_activation(layer) -> str | None:
    """The element-wise activation a group member applies, or None for a non-activation."""
    if isinstance(layer, keras.layers.ReLU):
        plain = layer.max_value is None and not layer.negative_slope and not layer.threshold
        return "relu" if plain else "relu_variant"
    if isinstance(layer, keras.layers.Activation):
        return activations.label(layer.activation)
    return None


def read_bn_graph(model: keras.Model) -> BNGraph:
    """Reads ``model`` into its :class:`ChannelGroup` s.

    Args:
        model: keras.Model, functional or Sequential, channels-last, each layer called once.

    Returns:
        The model's :class:`BNGraph`; its groups are those written by at least one
        ``BatchNormalization`` layer with ``scale=True``.

    Raises:
        TypeError: if ``model`` is not a ``keras.Model``.
        ValueError: if the model has no defined input or calls a layer more than once.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a keras.Model. Received: {type(model).__name__}")
    if not model.built or not model.inputs:
        raise ValueError(
            f"Model {model.name!r} has no defined input; build it with an `Input` first."
        )
    layers = {layer.name: layer for layer in model.layers}
    for layer in layers.values():
        if len(getattr(layer, "_inbound_nodes", [])) > 1:
            raise ValueError(
                f"Layer {layer.name!r} is called {len(layer._inbound_nodes)} times; shared "
                "layers are not supported by channel pruning."
            )
    parents = {name: _parents(layer) for name, layer in layers.items()}
    children: dict[str, list[str]] = {name: [] for name in layers}
    for name, ps in parents.items():
        for p in ps:
            children[p].append(name)
    output_layers = tuple(t._keras_history.operation.name for t in model.outputs)

    # Union-find over layer outputs: a channel-wise layer joins its inputs' group.
    root = {name: name for name in layers}

    def find(name: str) -> str:
        while root[name] != name:
            root[name] = root[root[name]]
            name = root[name]
        return name

    for name, layer in layers.items():
        if isinstance(layer, _CHANNELWISE_TYPES):
            for p in parents[name]:
                root[find(p)] = find(name)
    components: dict[str, list[str]] = {}
    for name in layers:  # model.layers is in topological order.
        components.setdefault(find(name), []).append(name)

    groups = []
    for members in components.values():
        sources = [m for m in members if not isinstance(layers[m], _CHANNELWISE_TYPES)]
        scaled_bns = [
            m
            for m in sources
            if isinstance(layers[m], keras.layers.BatchNormalization) and layers[m].scale
        ]
        if not scaled_bns:
            continue
        groups.append(_make_group(members, sources, layers, parents, children, output_layers))
    input_shape = model.inputs[0].shape
    return BNGraph(
        groups=tuple(groups),
        input_spatial_size=int(np.prod(input_shape[1:-1])) if len(input_shape) > 2 else 1,
        output_layers=output_layers,
        parents=parents,
    )


def _make_group(members, sources, layers, parents, children, output_layers) -> ChannelGroup:
    reasons = []
    writers = []
    for s in sources:
        layer = layers[s]
        if not (isinstance(layer, keras.layers.BatchNormalization) and layer.scale):
            reasons.append(f"{s!r} ({type(layer).__name__}) writes into it without a BN scale")
            continue
        if not _bn_axis_is_last(layer):
            reasons.append(f"BatchNorm {s!r} does not normalise the last (channel) axis")
        producer = layers[parents[s][0]]
        if not _is_linear_unit(producer) or children[producer.name] != [s]:
            reasons.append(
                f"BatchNorm {s!r} does not directly follow a Conv2D/Dense layer with a linear "
                "activation whose only consumer it is"
            )
        writers.append(Writer(bn=s, producer=producer.name))
    width = int(layers[sources[0]].output.shape[-1])
    member_set = set(members)
    ordered = [w.bn for w in writers] + [m for m in members if m not in sources]
    readers = []
    for m in members:
        layer = layers[m]
        if m in output_layers:
            reasons.append(f"{m!r} is a model output")
        activation = member_activation(layer)
        if (
            activation is not None
            and activation not in _ELEMENTWISE
            and not activations.is_elementwise(activation)
        ):
            unchecked = activations.unverifiable(activation)
            reasons.append(
                f"{m!r} applies {unchecked}"
                if unchecked
                else f"{m!r} applies a non-element-wise activation {activation!r}"
            )
        for c in children[m]:
            if c in member_set:
                continue
            reader = layers[c]
            if isinstance(layer, keras.layers.Flatten) and type(reader) is not keras.layers.Dense:
                reasons.append(f"Flatten {m!r} is read by {c!r}, which is not Dense")
            elif _is_channels_last_conv(reader) or type(reader) is keras.layers.Dense:
                rows = 1
                if isinstance(layer, keras.layers.Flatten):
                    rows = int(np.prod(layer.input.shape[1:-1]))
                readers.append(Reader(name=c, member=m, rows_per_channel=rows))
            else:
                reasons.append(f"{m!r} is read by {c!r} ({type(reader).__name__})")
    return ChannelGroup(
        width=width,
        writers=tuple(writers),
        readers=tuple(readers),
        members=tuple(ordered),
        prunable=not reasons,
        reason="; ".join(reasons),
    )


def is_homogeneous(model: keras.Model, group: ChannelGroup) -> str | None:
    """Returns the first member of ``group`` that is not positively homogeneous, or None.

    Every member must satisfy f(a x) = a f(x) for a > 0 for the gamma-W rescaling to be
    function-preserving: ReLU, linear, pooling, Add, Flatten and Dropout do.
    """
    for m in group.members:
        activation = member_activation(model.get_layer(m))
        if activation is not None and activation not in _HOMOGENEOUS_ACTIVATIONS:
            return m
    return None

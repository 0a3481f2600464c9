"""One registry of the weightless Keras layer types the readers follow, by what they do to
channels.

Zipping (:mod:`mtz_tf.graph`), Neuron Merging (:mod:`mtz_tf.compress.neuron_merging`) and
ISTA channel removal (:mod:`mtz_tf.compress.bn_graph`) each follow a channel through the
layers between two weighted layers, and each needs a different property of those layers:

* **permutation**: P(f(x)) = f(P(x)) for a permutation P of the channels. Zipping reorders
  and ties units, so every layer between units must commute with it.
* **positive scale**: f(s ⊙ x) = s ⊙ f(x) for a positive per-channel scale s. Neuron
  Merging folds a removed unit into a kept one as a scaled copy, and ISTA rescales
  BatchNorm's γ against the next kernel, so the layers between must commute with it.
* **constant**: a channel that is constant over the feature map stays constant. ISTA
  removes a dead channel (γ = 0) by absorbing its constant β into the readers' biases,
  which is exact only if the constant reaches them unchanged (``ZeroPadding2D`` writes zeros
  at the border, so it does not pass one).

*Coupling* types combine several tensors channel by channel (``Add``, ``Concatenate``,
...): their inputs' channels are tied, a question for each reader's grouping. Activations
are judged by their function (:mod:`mtz_tf.activations`), not listed here. A layer type
not in :data:`REGISTRY` is refused by name by every reader.
"""

from __future__ import annotations

import dataclasses

import keras


@dataclasses.dataclass(frozen=True)
class LayerType:
    """What a weightless layer type does to channels (module docstring).

    Attributes:
        name: str, the Keras class name.
        permutation: bool, a channel permutation commutes with it.
        positive_scale: bool, a positive per-channel scale commutes with it.
        constant: bool, a constant channel passes through it as a constant.
        coupling: bool, it combines several input tensors channel by channel.
        spatial: bool, it needs a feature map (H, W, C) rather than flat features.
        function_keys: tuple of str, the config entries that define what it computes
            (two layers of one type with equal entries compute the same function).
    """

    name: str
    permutation: bool = True
    positive_scale: bool = True
    constant: bool = True
    coupling: bool = False
    spatial: bool = False
    function_keys: tuple = ()

    @property
    def keras_class(self) -> type:
        return getattr(keras.layers, self.name)


_POOL = ("pool_size", "strides", "padding", "data_format")

REGISTRY = {
    entry.name: entry
    for entry in (
        LayerType("Dropout"),  # the rate has no effect at inference
        LayerType("SpatialDropout2D", function_keys=("data_format",)),
        LayerType("GaussianNoise"),
        LayerType("GaussianDropout"),
        LayerType("Identity"),
        LayerType("Flatten", function_keys=("data_format",)),
        LayerType("MaxPooling2D", spatial=True, function_keys=_POOL),
        LayerType("AveragePooling2D", spatial=True, function_keys=_POOL),
        LayerType(
            "GlobalAveragePooling2D", spatial=True, function_keys=("data_format", "keepdims")
        ),
        LayerType("GlobalMaxPooling2D", spatial=True, function_keys=("data_format", "keepdims")),
        LayerType(
            "ZeroPadding2D", constant=False, spatial=True, function_keys=("padding", "data_format")
        ),
        LayerType("Cropping2D", spatial=True, function_keys=("cropping", "data_format")),
        LayerType(
            "UpSampling2D", spatial=True, function_keys=("size", "interpolation", "data_format")
        ),
        # x·scale + offset: with scalars it commutes with a permutation, not with a scale.
        LayerType("Rescaling", positive_scale=False, function_keys=("scale", "offset")),
        # (x − mean)/√variance per channel: a permutation must permute its statistics too,
        # so zipping takes it only on the model input, whose channels are never reordered.
        LayerType(
            "Normalization",
            permutation=False,
            positive_scale=False,
            function_keys=("axis", "invert", "mean", "variance"),
        ),
        # (B, C) -> (B, 1, 1, C), as squeeze-excite blocks do: channels stay last.
        LayerType("Reshape", function_keys=("target_shape",)),
        LayerType("Add", coupling=True),
        LayerType("Subtract", coupling=True),
        LayerType("Average", coupling=True),
        LayerType("Maximum", coupling=True),
        LayerType("Minimum", coupling=True),
        LayerType("Multiply", positive_scale=False, coupling=True),
        LayerType("Concatenate", coupling=True, function_keys=("axis",)),
    )
}
"""Every weightless layer type the readers know, by class name."""


def lookup(layer) -> LayerType | None:
    """The :class:`LayerType` of ``layer``'s exact class, or None if it is not registered
    (a subclass may compute something else, so it is not matched)."""
    return (
        REGISTRY.get(type(layer).__name__) if type(layer).__module__.startswith("keras.") else None
    )


def types_with(**properties) -> tuple[type, ...]:
    """The Keras classes of the registered types whose properties all equal ``properties``,
    e.g. ``types_with(positive_scale=True, coupling=False)``."""
    return tuple(
        entry.keras_class
        for entry in REGISTRY.values()
        if all(getattr(entry, key) == value for key, value in properties.items())
    )

"""Joint retraining of a zip through fixed-shape task views, traced once for the whole zip.

A zipped network of T tasks is, for each task t, an ordinary network of the task's own
shapes (:func:`mtz_tf.zipped_network.task_model`: every zipped layer becomes a plain layer
whose kernel is the task's view [[W_s, W_t[:k_in]]; [W_{c,t}, W_t[k_in:]]], outputs [shared;
own]) whose shared blocks are equal across the tasks that share. Zipping a layer changes
which blocks are tied (k_in × k grows) and the order of neurons, never the shapes of a
task's view. So one set of T task views, one optimizer and one traced training step serve
every layer of a zip:

* before each layer's retraining the views are loaded with the zipped model's weights and
  the shared block sizes (k_in, k) and participation s_t ∈ {0, 1} of each zipped layer are
  written to variables; the optimizer's variables are set back to their initial values
  (a fresh optimizer, as each layer's retraining has always used);
* each step computes every task's loss on its own view, takes the gradient g_t of the
  summed loss with respect to each task's variables, and ties it: with B(·) the leading
  block of the shared rows and columns and E(·) its embedding (zero-padded) in a task's
  kernel,

      g'_t = g_t + s_t · (E(Σ_u s_u B(g_u)) − E(B(g_t))),

  so each sharing task's copy of a shared weight receives Σ_u ∂L/∂W_s, the gradient of the
  shared weight itself; an element-wise optimizer (SGD, Adam, RMSprop, ...) then moves every
  copy identically, which is training the zipped model;
* afterwards the views are split back into the zipped layers' weights.

A layer whose task views change shape or configuration (a Concatenate whose shared-first
layout moves) needs new views and a new trace, once per distinct topology. Optimizers
that are not element-wise (per-variable norms: ``clipnorm``, ``global_clipnorm``, LAMB,
Adafactor, Muon) would see each tied copy as part of a larger variable and are trained
through the zipped model itself instead (:func:`unsupported_reason`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from mtz_tf import fitting, zipped_network
from mtz_tf.layers import ZippedBatchNormalization, ZippedDepthwiseConv2D, _ZippedLayer

ELEMENT_WISE_OPTIMIZERS = (
    keras.optimizers.SGD,
    keras.optimizers.Adam,
    keras.optimizers.AdamW,
    keras.optimizers.Adamax,
    keras.optimizers.Adagrad,
    keras.optimizers.Adadelta,
    keras.optimizers.RMSprop,
    keras.optimizers.Nadam,
    keras.optimizers.Ftrl,
    keras.optimizers.Lion,
)
"""Optimizers whose update of each weight depends on that weight's gradients alone."""


def unsupported_reason(optimizer: keras.optimizers.Optimizer) -> str | None:
    """Why retraining with ``optimizer`` cannot go through tied task views (None when it
    can): it must be element-wise, and there must be one replica (the views' BatchNorms
    are not synchronized across replicas)."""
    if type(optimizer) not in ELEMENT_WISE_OPTIMIZERS:
        return f"{type(optimizer).__name__} is not one of the element-wise optimizers"
    if optimizer.clipnorm is not None or optimizer.global_clipnorm is not None:
        return "gradient clipping by norm is not element-wise"
    if tf.distribute.get_strategy().num_replicas_in_sync > 1:
        return "more than one replica"
    return None


def topology_key(zipped: keras.Model) -> tuple:
    """What fixes the shapes and computation of ``zipped``'s task views: per layer its class
    and, for a zipped layer, its widths and function, for another layer its config (names
    aside). Two zips' views with the same key share one traced step."""
    key = []
    for layer in zipped.layers:
        if isinstance(layer, keras.layers.InputLayer):
            key.append(("Input", tuple(layer.output.shape)))
            continue
        config = {k: v for k, v in layer.get_config().items() if k != "name"}
        if isinstance(layer, _ZippedLayer):
            for k in ("shared_units", "input_shared_units", "common_input", "sharing"):
                config.pop(k, None)
        key.append((type(layer).__name__, repr(sorted(config.items()))))
    return tuple(key)


def _leading_block(tensor, sizes):
    """``tensor``'s block of the first ``sizes[i]`` entries of each of its last
    ``len(sizes)`` axes (all of the axes before)."""
    lead = -tf.ones([tf.rank(tensor) - tf.size(sizes)], tf.int32)
    return tf.slice(tensor, tf.zeros([tf.rank(tensor)], tf.int32), tf.concat([lead, sizes], 0))


def _embedded(block, shape):
    """``block`` zero-padded at the end of every axis to ``shape``."""
    padding = tf.stack([tf.zeros_like(shape), shape - tf.shape(block)], axis=1)
    return tf.pad(block, padding)


class _Tie:
    """One weight of one zipped layer (kernel or bias) across the task views: each task's
    copy, the size of the shared block (trailing axes, in the plain layer's layout) and
    which tasks share it."""

    def __init__(self, copies: list, rank: int):
        self.copies = copies
        self.sizes = tf.Variable(tf.zeros([rank], tf.int32), trainable=False)
        self.sharing = tf.Variable(tf.zeros([len(copies)]), trainable=False)

    def tied(self, gradients: list) -> list:
        """Each copy's gradient with the shared block replaced by the sharing tasks' sum."""
        blocks = [_leading_block(g, self.sizes) for g in gradients]
        sharing = [tf.cast(self.sharing[t], g.dtype) for t, g in enumerate(gradients)]
        total = tf.add_n([s * b for s, b in zip(sharing, blocks)])
        return [
            g + s * (_embedded(total, tf.shape(g)) - _embedded(b, tf.shape(g)))
            for s, g, b in zip(sharing, gradients, blocks)
        ]


def _plain_weights(layer: _ZippedLayer, plain: keras.layers.Layer):
    """(kernel, bias) variables of a task's plain layer (bias None without)."""
    return plain.kernel, (plain.bias if layer.use_bias else None)


def _to_plain(layer: _ZippedLayer, kernel):
    """A kernel in :meth:`_ZippedLayer.task_weights` layout -> the plain layer's layout."""
    return np.swapaxes(kernel, -1, -2) if isinstance(layer, ZippedDepthwiseConv2D) else kernel


class TaskViews:
    """Each task's path through a zipped model as an ordinary Keras model of the task's own
    shapes (:func:`mtz_tf.zipped_network.task_model_layers`), with the ties of its shared
    weights (module docstring); loaded from and stored to zipped models of the same
    :func:`topology_key`."""

    def __init__(self, zipped: keras.Model):
        self.tasks = list(zipped.output)
        self.key = topology_key(zipped)
        self.models, self._layers = {}, {}
        for task in self.tasks:
            self.models[task], self._layers[task] = zipped_network.task_model_layers(zipped, task)
        self._check_weights_covered()
        self._ties = {}
        for layer in zipped_network.zipped_layers(zipped):
            if isinstance(layer, ZippedBatchNormalization):
                continue
            pairs = [_plain_weights(layer, self._layers[t][layer.name][0]) for t in self.tasks]
            self._ties[layer.name] = [_Tie([p[0] for p in pairs], 2)]
            if layer.use_bias:
                self._ties[layer.name].append(_Tie([p[1] for p in pairs], 1))
        self._position = {}

    def _check_weights_covered(self) -> None:
        """Every weight of the views must be a zipped layer's view (no copied weights)."""
        mapped = {
            id(v)
            for layers in self._layers.values()
            for plain_layers in layers.values()
            for plain in plain_layers
            for v in plain.weights
        }
        for task, model in self.models.items():
            stray = [v.path for v in model.weights if id(v) not in mapped]
            if stray:
                raise ValueError(
                    f"Task {task!r}'s view of the zipped model has weights {stray[:3]} outside "
                    "its zipped layers; it cannot be trained through task views."
                )

    @property
    def trainable_variables(self) -> list:
        return [v for task in self.tasks for v in self.models[task].trainable_variables]

    def load(self, zipped: keras.Model) -> None:
        """Gives the views ``zipped``'s weights, shared block sizes and participation."""
        if topology_key(zipped) != self.key:
            raise ValueError("The zipped model's task views have other shapes than these.")
        for layer in zipped_network.zipped_layers(zipped):
            for t, task in enumerate(self.tasks):
                plain_layers = self._layers[task][layer.name]
                if layer.norms:
                    norm = plain_layers[0 if isinstance(layer, ZippedBatchNormalization) else 1]
                    norm.set_weights([v.numpy() for v in layer.norms[t].weights])
                if isinstance(layer, ZippedBatchNormalization):
                    continue
                kernel, bias = layer.task_weights(task)
                plain_kernel, plain_bias = _plain_weights(layer, plain_layers[0])
                plain_kernel.assign(_to_plain(layer, keras.ops.convert_to_numpy(kernel)))
                if plain_bias is not None:
                    plain_bias.assign(keras.ops.convert_to_numpy(bias))
            ties = self._ties.get(layer.name, [])
            sharing = [float(layer.shared_count(t) > 0) for t in range(len(self.tasks))]
            block = [layer.input_shared_units, layer.shared_units]
            if isinstance(layer, ZippedDepthwiseConv2D):
                block = block[::-1]
            for tie, sizes in zip(ties, (block, [layer.shared_units])):
                tie.sizes.assign(sizes)
                tie.sharing.assign(sharing)

    def store(self, zipped: keras.Model) -> None:
        """Writes the views' weights back into ``zipped``'s zipped layers (the inverse of
        :meth:`load`: a shared block from the first task that shares it)."""
        for layer in zipped_network.zipped_layers(zipped):
            stored_shared = False
            for t, task in enumerate(self.tasks):
                plain_layers = self._layers[task][layer.name]
                if layer.norms:
                    norm = plain_layers[0 if isinstance(layer, ZippedBatchNormalization) else 1]
                    for variable, value in zip(layer.norms[t].weights, norm.get_weights()):
                        variable.assign(value)
                if isinstance(layer, ZippedBatchNormalization):
                    continue
                plain_kernel, plain_bias = _plain_weights(layer, plain_layers[0])
                kernel = _to_plain(layer, plain_kernel.numpy())
                bias = None if plain_bias is None else plain_bias.numpy()
                k, k_in = layer.shared_count(t), layer.input_shared_units
                layer.task_kernels[t].assign(kernel[..., k:])
                if bias is not None:
                    layer.task_biases[t].assign(bias[k:])
                if not k:
                    continue
                layer.cross_kernels[t].assign(kernel[..., k_in:, :k])
                if not stored_shared:
                    layer.shared_kernel.assign(kernel[..., :k_in, :k])
                    if bias is not None:
                        layer.shared_bias.assign(bias[:k])
                    stored_shared = True

    def tie(self, gradients: Sequence) -> list:
        """``gradients`` of :attr:`trainable_variables`, tied (module docstring)."""
        if not self._position:
            self._position = {id(v): i for i, v in enumerate(self.trainable_variables)}
        tied = list(gradients)
        for ties in self._ties.values():
            for tie in ties:
                where = [self._position[id(v)] for v in tie.copies]
                for i, g in zip(where, tie.tied([tied[i] for i in where])):
                    tied[i] = g
        return tied


class _ViewsModel(keras.Model):
    """The task views side by side: input and output dicts keyed by task."""

    def __init__(self, views: TaskViews, **kwargs):
        super().__init__(**kwargs)
        self.views = views
        self.task_models = [views.models[t] for t in views.tasks]

    def call(self, inputs, training=False):
        return {
            task: model(inputs[task], training=training)
            for task, model in zip(self.views.tasks, self.task_models)
        }


class TiedTrainer:
    """Trains zipped models of one topology through :class:`TaskViews` with one optimizer
    and one traced step (:func:`mtz_tf.fitting.train_step_function` with the views'
    ``tie``), the optimizer reset to its initial state for every :meth:`fit`."""

    def __init__(self, zipped: keras.Model, optimizer, losses: Mapping):
        self.views = TaskViews(zipped)
        self.model = _ViewsModel(self.views, name=f"{zipped.name}_task_views")
        self.model.compile(optimizer=optimizer, loss=dict(losses))
        self.step = None
        self._initial = None

    @property
    def key(self) -> tuple:
        return self.views.key

    def fit(self, zipped: keras.Model, batches, steps: int, callbacks, verbose) -> None:
        """Trains ``zipped`` in place for ``steps`` joint batches ``({task: x}, {task: y})``
        read from ``batches`` (a dataset or an iterator, :func:`mtz_tf.fitting.fit`)."""
        self.views.load(zipped)
        optimizer = self.model.optimizer
        if self.step is None:
            with self.model.distribute_strategy.scope():
                fitting.build(self.model, batches)
            self._initial = [v.numpy() for v in optimizer.variables]
            self.step = fitting.train_step_function(self.model, self.views.tie)
        else:
            for variable, value in zip(optimizer.variables, self._initial):
                variable.assign(value)
        try:
            fitting.fit(
                self.model,
                batches,
                callbacks=callbacks,
                verbose=verbose,
                step=self.step,
                steps=steps,
            )
        finally:
            self.views.store(zipped)

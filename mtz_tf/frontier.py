"""Calibration activations at the zip frontier: each unit's moments from one local step.

The driver (:mod:`mtz_tf.driver`) visits the hidden units in topological order. Once unit u
is tied and repaired, nothing upstream of it changes again (later ties, permutations and
repairs touch u's successors only) until retraining moves every weight. So each task's
calibration activations can be kept at the *frontier*: the outputs of the evaluated steps
(every step upstream of a finished unit, the unit included) that an unevaluated step still
reads. A request for layer inputs is then computed from the frontier through the few steps
in between, with the current model's own layers, instead of re-running the zipped model from
its input; the zip's passes over the calibration data cost O(depth), not O(depth²).

Two feeds serve the driver and :mod:`mtz_tf.repair` with one protocol,
``task_inputs(model, layers, widths)`` (as :func:`mtz_tf.layer_zip.task_inputs`: a function
``(batch, t) -> [x_l]``) and ``moments(features, append_bias)`` (as
:func:`mtz_tf.hessian.dataset_hessians`, per task), plus ``advance(model, unit)`` after a
unit is finished and ``reset(model, completed)`` after the weights moved:

* :class:`Frontier` keeps the activations (float32, per calibration batch, per task) and
  evaluates steps eagerly, one batch at a time;
* :class:`FullPasses` runs the model from its input for every request (a traced step per
  pass). It serves when the frontier would outgrow its memory budget (the calibration
  inputs, or the frontier of some unit, over :data:`DEFAULT_BUDGET_BYTES`), and under a
  distribution strategy with several replicas, whose passes shard the data across replicas.

Both compute the same moments: the frontier's values are those the full model computes at
those steps, up to float32 rounding of eager versus traced kernels.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from mtz_tf import graph, hessian, layer_zip, zipped_network

DEFAULT_BUDGET_BYTES = 2 * 1024**3
"""Memory the frontier may hold (all tasks' activations together) before the zip falls back
to full passes from the model input."""


def _descriptions(task_names) -> list[str]:
    return [f"calibration data of task {task!r}" for task in task_names]


class FullPasses:
    """Every request runs the zipped model from its input over each task's calibration data.

    Args:
        calibration: {task: batched dataset of model inputs}, in task order.
    """

    def __init__(self, calibration: dict):
        self.calibration = calibration

    def task_inputs(self, model: keras.Model, layers: list, widths: list | None = None):
        """:func:`mtz_tf.layer_zip.task_inputs` from the model input."""
        return layer_zip.task_inputs(model, layers, widths)

    def moments(self, features, append_bias: list) -> list[list]:
        """Per task, the moments ``features(batch, t)`` asks for over its calibration data
        (:func:`mtz_tf.hessian.dataset_hessians`)."""
        results = hessian.dataset_hessians(
            features,
            list(self.calibration.values()),
            append_bias,
            _descriptions(self.calibration),
        )
        return [moments for moments, _ in results]

    def advance(self, model: keras.Model, unit: int) -> None:
        """Nothing to keep: every request starts from the input."""

    def reset(self, model: keras.Model, completed: int) -> None:
        """Nothing to keep: every request starts from the input."""


def _nbytes(values) -> int:
    return sum(int(np.prod(v.shape)) * v.dtype.size for v in values)


class Frontier:
    """Each task's calibration activations at the zip frontier (module docstring).

    Args:
        plan: the :class:`mtz_tf.graph.Plan` of the zipped network.
        task_names: list of task names, in the zipped model's order.
        calibration: {task: batched dataset of model inputs}, in task order; read once.
        budget: bytes the kept activations may take, all tasks together; over it every
            later request is served by :class:`FullPasses`.
    """

    def __init__(self, plan: graph.Plan, task_names: list, calibration: dict, budget: int):
        self._plan, self._task_names, self._budget = plan, list(task_names), budget
        self._full = FullPasses(calibration)
        self._unit_steps = [i for i, s in enumerate(plan.steps) if isinstance(s, graph.Unit)]
        self._step_of = {plan.steps[i].name: i for i in self._unit_steps}
        self._inputs = self._read_inputs(calibration)
        self._batches = None  # per task, per batch: {step index: activations}
        self._finished: set = set()  # unit steps that are tied and repaired for good
        self._evaluated: set = set()

    @property
    def active(self) -> bool:
        """Whether requests are served from kept activations (else by full passes)."""
        return self._inputs is not None

    def _read_inputs(self, calibration: dict):
        """Per task, its calibration batches as tensors; None when they outgrow the budget."""
        per_task, total = [], 0
        for dataset in calibration.values():
            batches = []
            for batch in dataset:
                total += _nbytes([batch])
                if total > self._budget:
                    return None
                batches.append(tf.convert_to_tensor(batch))
            per_task.append(batches)
        return per_task

    def reset(self, model: keras.Model, completed: int) -> None:
        """Recomputes the frontier of ``model`` with its first ``completed`` hidden units
        finished, from the calibration inputs (after retraining moved every weight)."""
        if not self.active:
            return
        self._batches = [[{graph.MODEL_INPUT: x} for x in batches] for batches in self._inputs]
        self._evaluated = {graph.MODEL_INPUT}
        self._finished = set(self._unit_steps[:completed])
        self._move(model)

    def advance(self, model: keras.Model, unit: int) -> None:
        """Moves the frontier past hidden unit ``unit``, finished in ``model``."""
        if not self.active:
            return
        self._finished.add(self._unit_steps[unit])
        self._move(model)

    def _move(self, model: keras.Model) -> None:
        """Evaluates every step whose inputs are evaluated (a unit only once finished), then
        keeps only the activations an unevaluated step reads."""
        steps = self._plan.steps
        for index, step in enumerate(steps):
            ready = index not in self._evaluated and all(i in self._evaluated for i in step.inputs)
            if ready and (not isinstance(step, graph.Unit) or index in self._finished):
                for t, batches in enumerate(self._batches):
                    self._evaluate(model, t, index, batches)
                self._evaluated.add(index)
        read = {i for j, s in enumerate(steps) if j not in self._evaluated for i in s.inputs}
        for batches in self._batches:
            for values in batches:
                for index in [i for i in values if i not in read]:
                    del values[index]
        if _nbytes(v for b in self._batches for vs in b for v in vs.values()) > self._budget:
            self._inputs = self._batches = None  # from here on, full passes

    def _evaluate(self, model: keras.Model, t: int, index: int, batches: list) -> None:
        """Adds step ``index``'s task-t activations to each of ``batches``, computed once on
        all of them together (one eager op per layer, not one per batch) and split."""
        inputs = self._plan.steps[index].inputs
        if len(batches) == 1:
            zipped_network.task_values(model, self._plan, t, [index], batches[0])
            return
        merged = {i: tf.concat([values[i] for values in batches], axis=0) for i in inputs}
        output = zipped_network.task_values(model, self._plan, t, [index], merged)[0]
        sizes = [int(values[inputs[0]].shape[0]) for values in batches]
        for values, part in zip(batches, tf.split(output, sizes, axis=0)):
            values[index] = part

    def task_inputs(self, model: keras.Model, layers: list, widths: list | None = None):
        """A function ``(values, t) -> [x_l]`` (``t`` an int or a scalar tensor): task t's
        input to each of ``layers`` (zipped layers of ``model``) from one batch's frontier
        activations, cut to its first ``widths[l]`` channels (None: all)."""
        if not self.active:
            return self._full.task_inputs(model, layers, widths)
        widths = [None] * len(layers) if widths is None else widths
        sources = [self._plan.steps[self._step_of[layer.name]].inputs[0] for layer in layers]

        def features(values, t):
            scratch = dict(values)  # steps computed for this request are not kept
            inputs = zipped_network.task_values(model, self._plan, int(t), sources, scratch)
            return [x[..., :width] for x, width in zip(inputs, widths)]

        return features

    def moments(self, features, append_bias: list) -> list[list]:
        """Per task, the moments ``features(values, t)`` asks for over its kept batches
        (:func:`mtz_tf.hessian.eager_moments`)."""
        if not self.active:
            return self._full.moments(features, append_bias)
        return hessian.eager_moments(
            features, self._batches, append_bias, _descriptions(self._task_names)
        )


def calibration_feed(plan: graph.Plan, task_names: list, calibration: dict, budget=None):
    """The feed of a zip's calibration passes: a :class:`Frontier` (within ``budget`` bytes,
    default :data:`DEFAULT_BUDGET_BYTES`), or :class:`FullPasses` under a distribution
    strategy with several replicas or workers, or once the frontier would outgrow the budget.
    """
    strategy = tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync > 1:
        return FullPasses(calibration)
    frontier = Frontier(
        plan, task_names, calibration, DEFAULT_BUDGET_BYTES if budget is None else budget
    )
    return frontier if frontier.active else FullPasses(calibration)

"""Repair after each zipped unit, from calibration data alone (no gradient steps).

Tying a unit's neurons changes what every later layer receives. Right after unit u is tied
(:func:`mtz_tf.driver.tie_unit`), with ``before`` the zipped network just before the tie and
``after`` the one just after it, each task t is repaired on its own calibration data:

* **BatchNorm re-estimation** (u has a per-task BatchNorm): u's running mean and variance
  for task t become the mean and (biased) variance of its pre-normalisation outputs in
  ``after``, E[z] and E[z²] − E[z]², so BN_t normalises what u now computes.
* **Next-layer refit** (``"refit"``, u has no BatchNorm): for every unit v reading u's
  output (through weightless layers; the output head included) whose task-t neurons are
  all task t's own, with ĥ the rows of v's input in ``after`` and h those in ``before``
  (per sample for Dense, per pixel for a "channel" conv, im2col patches for a "patch" conv;
  augmented with 1 when v has a bias), the least-squares map, damped towards the identity,

      M = (E[ĥ̃ ĥ̃ᵀ] + δI)⁻¹ (E[ĥ̃ h̃ᵀ] + δI),     h ≈ ĥ̃ M,

  is folded into v's weights: W' = M_lin W per kernel position and b' = b + Σ_p a₀ W_p,
  with M_lin = M[:d, :d] and a₀ = M[d, :d] the map's intercept. W̃' = M W̃ minimises
  E‖ĥ̃ W̃' − h̃ W̃‖² + δ‖W̃' − W̃‖²: v's pre-activations in ``after`` are the least-squares
  reproduction of those in ``before``, and directions the calibration data does not
  excite (a unit dead on it) keep their weights, so an exact tie (ĥ = h) changes nothing.
  E[ĥ̃ ĥ̃ᵀ] is v's own MTZ Hessian (:mod:`mtz_tf.hessian`), δ the relative damping of
  :func:`mtz_tf.cost.damp_hessians`.
* **Statistics** (``"statistics"``, REPAIR, u has no BatchNorm): the same fold with the
  per-row affine map that restores each input row's mean and standard deviation in
  ``before``: M_lin = diag(σ_h / σ_ĥ), a₀ = μ_h − M_lin μ_ĥ.

The target is the network before the tie, not the input models, so a repair never undoes
light retraining that ran after earlier units, and a checkpointed zip resumes with nothing
more than its model. Neither map adds a parameter.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mtz_tf import cost, graph, hessian, layer_zip, zipped_network

REPAIRS = ("refit", "statistics", "none")
"""The ``repair`` options of :func:`mtz_tf.zip_models`."""

DEFAULT_REPAIR = "refit"

MAX_REFIT_ROWS = 8192
"""Readers whose Hessian rows are wider than this (a Dense layer after a large Flatten)
are not refit: their (d + 1)² moments would not fit a modest memory."""


def reader_units(plan: graph.Plan, unit: int) -> list[int]:
    """Indices (into ``plan.units``) of the units that read unit ``unit``'s output through
    weightless steps only (activations, pooling, Flatten, Add, Concatenate)."""
    unit_steps = [i for i, step in enumerate(plan.steps) if isinstance(step, graph.Unit)]
    reached = {unit_steps[unit]}
    readers = []
    for index in range(unit_steps[unit] + 1, len(plan.steps)):
        if not reached.intersection(plan.steps[index].inputs):
            continue
        if isinstance(plan.steps[index], graph.Unit):
            readers.append(unit_steps.index(index))
        else:
            reached.add(index)
    return readers


def _as_stored(values: np.ndarray) -> np.ndarray:
    """Rounded to float32, as the Keras layer stores it: a zip resumed from a checkpoint
    then continues from exactly the states an uninterrupted one holds."""
    return values.astype(np.float32).astype(np.float64)


def reestimate_batch_norm(model, unit: int, state, feed, tasks) -> None:
    """Sets the running statistics of unit ``unit``'s BatchNorm for each task in ``tasks``, in
    ``state`` and in ``model``'s layer, to the moments of its pre-normalisation outputs
    (module docstring) on the calibration data ``feed`` serves (:mod:`mtz_tf.frontier`)."""
    layer = zipped_network.zipped_layers(model)[unit]
    inputs = feed.task_inputs(model, [layer])

    def features(batch, t):
        (x,) = inputs(batch, t)
        branches = [
            lambda task=task: layer.pre_normalization(task, x) for task in range(len(state.norms))
        ]
        z = tf.switch_case(t, branches)
        return [hessian.Squares(tf.reshape(z, [-1, tf.shape(z)[-1]]))]  # a row per pixel

    for t, (moments,) in enumerate(feed.moments(features, [False])):
        second, mean = moments.numpy()
        variance = np.maximum(second - mean**2, 0.0)
        if t not in tasks:
            continue
        gamma, beta, _, _ = state.norms[t]
        state.norms[t] = (gamma, beta, _as_stored(mean), _as_stored(variance))
    zipped_network.set_layer_weights(layer, state)


def _refittable(state, t: int, tasks) -> bool:
    return (
        t in tasks
        and not graph.is_channelwise(state)
        and not (state.sharing[t] and state.shared_units)
    )


def _row_count(state, mode: str, t: int) -> int:
    rows = state.kernels[t].shape[-2]
    if state.kind == "Conv2D" and mode == "patch":
        rows *= int(np.prod(state.kernel_prefix))
    return rows


def _affine_map(after_gram, target, method: str, damping: float, bias: bool):
    """(M_lin, a₀) of the refit (``target`` the cross moment E[ĥ̃ h̃ᵀ]) or of the statistics
    repair (``target`` the second moment E[h̃ h̃ᵀ] before the tie); module docstring."""
    d = after_gram.shape[0] - int(bias)
    if method == "refit":
        cross = target
        (damped,) = cost.damp_hessians([after_gram], damping)
        damped = damped.numpy()
        m = np.linalg.solve(damped, cross + (damped - after_gram))  # δ towards the identity
        return m[:d, :d], (m[d, :d] if bias else None)
    before_gram = target
    if bias:
        mean_after, mean_before = after_gram[-1, :-1], before_gram[-1, :-1]
    else:
        mean_after = mean_before = np.zeros(d)
    var_after = np.diag(after_gram)[:d] - mean_after**2
    var_before = np.maximum(np.diag(before_gram)[:d] - mean_before**2, 0.0)
    floor = 1e-12 * max(float(np.mean(np.abs(var_after))), 1e-30)
    scale = np.where(var_after > floor, np.sqrt(var_before / np.maximum(var_after, floor)), 0.0)
    return np.diag(scale), (mean_before - scale * mean_after if bias else None)


def _fold(state, t: int, linear, intercept, mode: str) -> None:
    """W' = M_lin W (per kernel position, or on whole patches), b' = b + a₀ · Σ_p W_p."""
    kernel = state.kernels[t]
    if state.kind == "Conv2D" and mode == "patch":
        flat = kernel.reshape(-1, kernel.shape[-1])
        state.kernels[t] = _as_stored((linear @ flat).reshape(kernel.shape))
        positions = flat
    else:
        state.kernels[t] = _as_stored(np.einsum("ir,...rj->...ij", linear, kernel))
        positions = kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1])
    if intercept is not None:
        state.biases[t] = _as_stored(
            state.biases[t]
            + np.einsum(
                "r,prj->j", intercept, positions.reshape(-1, len(intercept), kernel.shape[-1])
            )
        )


def refit_readers(before, after, plan, states, unit, feed, config, method, tasks) -> list:
    """Refits (or REPAIRs) the readers of unit ``unit`` in ``states`` and in ``after`` for the
    tasks in ``tasks`` (module docstring), on the calibration data ``feed`` serves; returns
    the names of the units changed."""
    mode = config["hessian"]
    num_tasks = len(states[unit].kernels)
    readers = [
        v
        for v in reader_units(plan, unit)
        if any(_refittable(states[v], t, tasks) for t in range(num_tasks))
        and max(_row_count(states[v], mode, t) for t in range(num_tasks)) <= MAX_REFIT_ROWS
    ]
    if not readers:
        return []
    after_layers = zipped_network.zipped_layers(after)
    before_inputs = feed.task_inputs(
        before, [zipped_network.zipped_layers(before)[v] for v in readers]
    )
    after_inputs = feed.task_inputs(after, [after_layers[v] for v in readers])

    def features(batch, t):
        """Per reader: ĥ's rows (E[ĥ̃ ĥ̃ᵀ]), then what the method maps them to."""
        items = []
        for x_after, x_before, v in zip(after_inputs(batch, t), before_inputs(batch, t), readers):
            rows_after = layer_zip.hessian_rows(x_after, states[v], mode)
            rows_before = layer_zip.hessian_rows(x_before, states[v], mode)
            target = hessian.Cross(rows_after, rows_before) if method == "refit" else rows_before
            items += [rows_after, target]
        return items

    bias = [states[v].use_bias for v in readers for _ in range(2)]
    per_task = feed.moments(features, bias)
    for position, v in enumerate(readers):
        state = states[v]
        for t, moments in enumerate(per_task):
            if not _refittable(state, t, tasks):
                continue
            after_gram, target = (m.numpy() for m in moments[2 * position : 2 * position + 2])
            linear, intercept = _affine_map(
                after_gram, target, method, config["damping"], state.use_bias
            )
            _fold(state, t, linear, intercept, mode)
        zipped_network.set_layer_weights(after_layers[v], state)
    return [states[v].name for v in readers]


def needs_before(state, config) -> bool:
    """Whether repairing after ``state``'s unit compares with the network before its tie (a
    refit or REPAIR of its readers), rather than only re-estimating its BatchNorm."""
    return config["repair"] != "none" and not state.norms


def repair_unit(before, after, plan, states, unit, feed, config, tied, joining) -> str:
    """Repairs the zipped network ``after`` (and ``states``) after unit ``unit`` was tied in
    ``before`` (``tied``: it shares neurons now; else only its input changed, upstream), on
    the calibration data ``feed`` serves (:mod:`mtz_tf.frontier`), for
    the tasks in ``joining`` (None: all; a task joining a zipped model alone, so that the
    other tasks' own weights and statistics stay as they were); returns what ran:
    ``"batch_norm"``, ``"refit: <units>"``, ``"statistics: <units>"`` or ``""`` (nothing to
    repair, or ``repair="none"``)."""
    method = config["repair"]
    if method == "none":
        return ""
    state = states[unit]
    tasks = set(range(len(state.kernels)) if joining is None else joining)
    if state.norms:
        reestimate_batch_norm(after, unit, state, feed, tasks)
        return "batch_norm"
    if not tied:  # its output is what it was: the readers see no change
        return ""
    names = refit_readers(before, after, plan, states, unit, feed, config, method, tasks)
    return f"{method}: {', '.join(names)}" if names else ""

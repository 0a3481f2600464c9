"""The public Multi-Task Zipping entry points: :func:`zip_models` and :func:`add_task`.

They check the models, data and options, resolve the shares, set up checkpoints and the
report, and hand the zip to the one driver, :func:`mtz_tf.driver.zip_graph` (or
:func:`~mtz_tf.driver.join_graph` for a task joining a zip), which treats a chain as
a graph whose streams each have one unit. For each hidden unit l, from the input upward
(He, Zhou, Thiele, NeurIPS 2018, Alg. 1):

1. H_t: each task's layer-l input Hessian on its own calibration data, through the current
   zipped network, restricted to the inputs at shared positions (+ the bias).
2. Costs ΔE between the group's and the next task's neurons (:mod:`mtz_tf.cost`).
3. A matching of k_l pairs (:mod:`mtz_tf.matching`); tasks join one at a time, the group's
   Hessian being Σ H_t of its members.
4. Tied neurons get the Hessian-weighted merged weights from shared inputs; their weights
   from task-specific inputs stay task-specific; other neurons keep theirs.
5. Each task's layer-(l+1) input rows are permuted to [shared, in pair order; the rest].
6. Optional light joint retraining of all tasks (:class:`mtz_tf.Retrain`).

Output heads are never zipped. With a checkpoint directory, the zip saves itself after
every unit and resumes from the last completed unit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf

from mtz_tf import allocation, checkpoint, cost, data, driver, graph, layers, zipped_network
from mtz_tf import matching as matching_lib
from mtz_tf.layer_zip import HESSIAN_MODES, PAIRINGS, TIES
from mtz_tf.repair import DEFAULT_REPAIR, REPAIRS
from mtz_tf.report import ZipReport
from mtz_tf.retrain import Retrain, check_labelled_data, resolve_optimizer, task_accuracies

_LOG = logging.getLogger(__name__)


def _validate_models(models: Mapping[str, keras.Model]) -> dict[str, graph.Plan]:
    if not isinstance(models, Mapping) or len(models) < 2:
        raise ValueError(
            "`models` must be a dict {task name: keras.Model} with at least two models. "
            f"Received: {type(models).__name__} of length {len(models) if models else 0}"
        )
    for task in models:
        if not isinstance(task, str) or not task.isidentifier():
            raise ValueError(
                f"Task names must be Python identifiers (they name outputs and weights). "
                f"Received: {task!r}"
            )
    plans = {task: graph.read_plan(model) for task, model in models.items()}
    first_task = next(iter(plans))
    first = plans[first_task]
    for task, plan in plans.items():
        if plan.input_shape != first.input_shape:
            raise ValueError(
                f"Model {task!r} takes inputs of shape {plan.input_shape}, but model "
                f"{first_task!r} takes {first.input_shape}; zipped tasks share one input."
            )
        difference = graph.first_difference(first, plan)
        if difference is not None:
            raise ValueError(
                f"Model {task!r} differs from model {first_task!r} {difference}; zipping "
                "needs the same function at every layer (widths may differ)."
            )
    for task, model in models.items():
        for variable in model.weights:
            if not np.all(np.isfinite(variable.numpy())):
                raise ValueError(
                    f"Model {task!r} has NaN or infinite values in weight {variable.path!r}; "
                    "zipping needs finite weights."
                )
    return plans


def resolve_shares(share, units: list[graph.Unit], widths: list[int]) -> list[int]:
    """Per-hidden-layer shared counts from ``share``.

    ``share`` is a fraction for every layer (float in [0, 1]); a list with one count (int) or
    fraction (float) per hidden layer; or a dict {layer name or index: count or fraction},
    missing layers sharing nothing. A fraction f gives round(f · min_t n_t) neurons.
    """
    names = [u.name for u in units]

    def count(value, index: int) -> int:
        name, width = names[index], widths[index]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(
                f"`share` for layer {name!r} must be an int count or a float fraction. "
                f"Received: {value!r}"
            )
        if value < 0:
            raise ValueError(
                f"`share` for layer {name!r} must be non-negative: a count from 0 to {width} "
                f"or a fraction from 0.0 to 1.0. Received: share={value}"
            )
        if isinstance(value, (float, np.floating)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"`share` fraction for layer {name!r} must be in [0, 1]. Received: {value}"
                )
            return int(round(value * width))
        if not 0 <= value <= width:
            raise ValueError(
                f"`share` for layer {name!r} must be at most its width {width} (the narrowest "
                f"task's). Received: share={value}"
            )
        return int(value)

    if isinstance(share, Mapping):
        result = [0] * len(names)
        for key, value in share.items():
            index = key if isinstance(key, int) else (names.index(key) if key in names else -1)
            if not 0 <= index < len(names):
                raise ValueError(
                    f"`share` names layer {key!r}, which is not a hidden layer; hidden layers: "
                    f"{names}."
                )
            result[index] = count(value, index)
        return result
    if isinstance(share, (list, tuple)):
        if len(share) != len(names):
            raise ValueError(
                f"`share` needs one entry per hidden layer {names}. Received {list(share)}."
            )
        return [count(v, i) for i, v in enumerate(share)]
    if isinstance(share, (int, np.integer)) and not isinstance(share, bool):
        raise TypeError(
            "A single `share` must be a float fraction (e.g. 1.0); give per-layer counts as a "
            f"list or dict. Received: share={share!r}"
        )
    return [count(share, i) for i in range(len(names))]


def parse_share(text: str):
    """Parses a command-line share: ``"1.0"`` (a fraction) or ``"fc1=200,fc2=0.5"``.

    Values with a decimal point are fractions, others counts (:func:`resolve_shares`).
    """

    def number(value: str):
        return float(value) if any(c in value for c in ".eE") else int(value)

    text = text.strip()
    if "=" not in text:
        try:
            return float(text)
        except ValueError:
            raise ValueError(
                f"`share` must be a fraction like 0.5 or per-layer values like "
                f"'fc1=200,fc2=0.5'. Received: {text!r}"
            ) from None
    result = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            result[name.strip()] = number(value.strip())
        except ValueError:
            raise ValueError(f"Cannot read share value {value!r} for layer {name!r}.") from None
    return result


def _restored_states(model: keras.Model, plan: graph.Plan, directory: str) -> list:
    """The layer states of a checkpointed zipped model, checked against ``plan``."""
    try:
        return zipped_network.read_states(model, plan)
    except (ValueError, KeyError, IndexError, AttributeError) as error:
        raise ValueError(
            f"The checkpoint in {directory!r} does not hold a zip of these models' "
            f"architecture ({error}); delete it to start over."
        ) from None


def _check_options(matching, pairing, tie, hessian, batch_norm, repair) -> None:
    for value, allowed, flag in (
        (repair, REPAIRS, "repair"),
        (matching, matching_lib.METHODS, "matching"),
        (pairing, PAIRINGS, "pairing"),
        (tie, TIES, "tie"),
        (hessian, HESSIAN_MODES, "hessian"),
        (batch_norm, zipped_network.BATCH_NORM_MODES, "batch_norm"),
    ):
        if value not in allowed:
            raise ValueError(f"`{flag}` must be one of {allowed}. Received: {flag}={value!r}")


def _finish(zipped: keras.Model, report: ZipReport, input_params: int) -> None:
    counts = zipped_network.parameter_counts(zipped)
    report.parameters = dict(
        counts, input_models=input_params, ratio=counts["total"] / input_params
    )


def zip_models(
    models: Mapping[str, keras.Model],
    calibration: Mapping[str, tf.data.Dataset],
    share=1.0,
    matching: str = "optimal",
    pairing: str = "hessian",
    tie: str = "hessian",
    hessian: str = "channel",
    batch_norm: str = "task",
    repair: str = DEFAULT_REPAIR,
    retrain: Retrain | None = None,
    evaluation: Mapping[str, tf.data.Dataset] | None = None,
    checkpoint_dir: str | None = None,
    damping: float = cost.DEFAULT_DAMPING,
    seed: int = 0,
    verbose: int = 1,
) -> tuple[keras.Model, ZipReport]:
    """Zips pre-trained models of the same architecture into one multi-task model.

    Args:
        models: {task name: keras.Model}, two or more models of Conv2D/Dense units (each
            optionally followed by BatchNormalization and an activation, with pooling,
            Flatten and Dropout between them), chains or residual graphs (Add, channel
            Concatenate), with the same graph and input shape. Widths may differ. Not
            modified.
        calibration: {task: batched tf.data.Dataset of inputs, or of (inputs, labels)};
            labels are ignored. The Hessians average over all of it. It is read once and
            each task's activations at the zip frontier are kept in memory
            (:mod:`mtz_tf.frontier`), so each unit costs one local step; past
            ``mtz_tf.frontier.DEFAULT_BUDGET_BYTES`` (2 GiB) every pass runs from the input.
        share: fraction of every hidden layer to share (float), per-layer counts or
            fractions as a list or {layer name: value} (see :func:`resolve_shares`), or a
            :class:`mtz_tf.ShareBudget` (a global parameter fraction or merge-cost budget,
            allocated across layers cheapest-first; the report gives the counts). With more
            than two models, all of them share the same neurons.
        matching: ``"optimal"`` (exact min-cost matching, default: over three LeNet-300-100
            seed pairs it drops 2.4 points less than greedy at full share) or ``"greedy"``
            (the paper's cheapest-pair-first).
        pairing: how neurons are paired: ``"hessian"`` (MTZ merge cost, default),
            ``"euclidean"`` (weight distance) or ``"random"`` (baselines).
        tie: the weights of a tied pair: ``"hessian"`` (Hessian-weighted optimum,
            default) or ``"average"`` (plain mean, a baseline).
        hessian: conv Hessian: ``"channel"`` (per-pixel channel covariance shared by all
            kernel positions, the reference code) or ``"patch"`` (exact im2col patches).
        batch_norm: ``"task"`` keeps each task's BatchNorm after a shared layer (reference
            code: each task re-normalises the shared filters, so a fully shared layer still
            yields per-task outputs and the merge cost ignores BN's rescaling); ``"fold"``
            folds BN into the weights first (exact at inference: the cost sees what the
            network computes, fully shared layers are computed once, but retraining then
            runs without BN).
        repair: after each unit is tied, from calibration data only (:mod:`mtz_tf.repair`):
            ``"refit"`` (default) re-estimates a unit's per-task BatchNorm statistics, or,
            for a unit without one, refits each task's next-layer weights (the output head
            included) by least squares so its pre-activations reproduce those before the
            tie; ``"statistics"`` re-estimates BatchNorm the same way but, without one,
            restores each input's mean and standard deviation (REPAIR); ``"none"``. The
            report's layers say which ran.
        retrain: :class:`Retrain` settings for light joint retraining after each layer, or
            None for none.
        evaluation: {task: batched (x, y) dataset}; when given, the report has per-task
            accuracy of the originals and before/after each layer's retraining.
        checkpoint_dir: str or None; saves after every layer and resumes from there.
        damping: float, relative Hessian damping (:mod:`mtz_tf.cost`).
        seed: int, seeds the random pairing of ``pairing="random"``.
        verbose: int, 0 silent, 1 one line per layer (plus Keras progress bars).

    Returns:
        ``(zipped, report)``: a Keras model with one input and a dict of outputs keyed by
        task name, and a :class:`ZipReport`.

    Example:
        >>> zipped, report = mtz_tf.zip_models({"a": model_a, "b": model_b},
        ...                                    {"a": calib_a, "b": calib_b}, share=1.0)

    Reference: He, Zhou, Thiele, "Multi-Task Zipping via Layer-wise Neuron Sharing",
    NeurIPS 2018.
    """
    plans = _validate_models(models)
    task_names = list(models)
    _check_tasks(calibration, task_names, "calibration")
    _check_options(matching, pairing, tie, hessian, batch_norm, repair)
    config = dict(
        matching=matching,
        pairing=pairing,
        tie=tie,
        damping=damping,
        hessian=hessian,
        seed=seed,
        repair=repair,
    )
    plan = plans[task_names[0]]
    calibration = _calibration_inputs(calibration, plan, task_names)
    _check_side_data(evaluation, retrain, task_names)
    retrain, optimizer_used = resolve_optimizer(
        retrain, {f"task {t!r}'s input model": models[t] for t in task_names}
    )
    hidden = plan.hidden_units
    store = None
    if checkpoint_dir is not None:
        store = checkpoint.ZipCheckpoint(checkpoint_dir, len(hidden), task_names, verbose)
        store.prepare()
    widths = [min(plans[t].hidden_units[i].units for t in task_names) for i in range(len(hidden))]
    allocation_info = None
    if isinstance(share, allocation.ShareBudget):
        shares, allocation_info = allocation.allocate(
            plans, models, calibration, share, config, batch_norm, widths
        )
        if verbose:
            _LOG.info("Share allocation for %s: per-layer counts %s", share, shares)
    else:
        shares = resolve_shares(share, hidden, widths)
    report = ZipReport(
        tasks=task_names,
        matching=matching,
        pairing=pairing,
        tie=tie,
        share_allocation=allocation_info,
        retrain_optimizer=optimizer_used,
        repair=repair,
    )
    states = zipped_network.separate_states(plans, models, batch_norm)
    start, resumed, save = 0, None, None
    if store is not None:
        options = dict(config, batch_norm=batch_norm)
        restored = store.restore(
            checkpoint.fingerprint(models, shares, options, calibration, retrain)
        )
        if restored is not None:
            restored_model, progress = restored
            resumed = _restored_states(restored_model, plan, store.directory)
            report = ZipReport.from_dict(progress["report"])
            start = progress["completed_layers"]

        def save(model, completed):
            store.save(model, completed, report.to_dict())

    if evaluation is not None and start == 0:
        report.accuracy_original = task_accuracies(
            zipped_network.build_model(plan, task_names, states), evaluation
        )
    zipped = driver.zip_graph(
        plan,
        plans,
        models,
        task_names,
        states,
        calibration,
        shares,
        config,
        retrain,
        evaluation,
        report,
        verbose,
        resume=(resumed, start) if resumed else None,
        save=save,
    )
    _finish(zipped, report, int(sum(m.count_params() for m in models.values())))
    return zipped, report


def add_task(
    zipped: keras.Model,
    task: str,
    model: keras.Model,
    calibration: Mapping[str, tf.data.Dataset],
    matching: str = "optimal",
    hessian: str = "channel",
    repair: str = DEFAULT_REPAIR,
    retrain: Retrain | None = None,
    evaluation: Mapping[str, tf.data.Dataset] | None = None,
    damping: float = cost.DEFAULT_DAMPING,
    verbose: int = 1,
) -> tuple[keras.Model, ZipReport]:
    """Zips one more task into an already zipped model, without redoing the others.

    Layer by layer, the new task's neurons are matched to the layer's shared neurons (as
    many as there are) with the group Hessian Σ H_t of the tasks already sharing them, and
    the shared weights become the (T+1)-way Hessian-weighted merge; the new task's other
    neurons stay its own. The other tasks' own neurons are untouched (their outputs change
    only through the updated shared weights, and through retraining if given). In a
    residual network every stream keeps one matching for all its writers, chosen from
    their summed costs (:func:`mtz_tf.driver.join_graph`).

    Args:
        zipped: a model returned by :func:`zip_models` (or loaded from its ``.keras``).
            Not modified.
        task: str, the new task's name.
        model: keras.Model of the same architecture as the zipped tasks' models.
        calibration: {task: dataset} for every task, old and new (the group Hessians need
            the old tasks' data too).
        matching, hessian, repair, retrain, evaluation, damping, verbose: as
            :func:`zip_models` (``retrain`` and ``evaluation`` cover all tasks; the repair
            changes only the new task's weights and statistics).

    Returns:
        ``(zipped, report)`` for the T + 1 tasks.
    """
    # getattr: a subclassed model's `output` raises AttributeError (it has no graph).
    if not isinstance(zipped, keras.Model) or not isinstance(getattr(zipped, "output", None), dict):
        raise TypeError(
            "`zipped` must be a model returned by zip_models (one input, a dict of task "
            f"outputs). Received: {type(zipped).__name__}"
        )
    old_tasks = list(zipped.output)
    if not isinstance(task, str) or not task.isidentifier() or task in old_tasks:
        raise ValueError(
            f"`task` must be a new Python identifier; the zipped model has {old_tasks}. "
            f"Received: {task!r}"
        )
    plan = graph.read_plan(model)
    if plan.input_shape != tuple(zipped.input.shape[1:]):
        raise ValueError(
            f"Model {model.name!r} for new task {task!r} takes inputs of shape "
            f"{plan.input_shape}, but the zipped model takes {tuple(zipped.input.shape[1:])}; "
            "zipped tasks share one input."
        )
    zipped_layers = zipped_network.zipped_layers(zipped)
    if len(zipped_layers) != len(plan.units) or any(
        not isinstance(
            layer, getattr(layers, "Zipped" + zipped_network.zipped_kind(unit.kind, True))
        )
        for layer, unit in zip(zipped_layers, plan.units)
    ):
        raise ValueError(
            f"Model {model.name!r} does not have the zipped model's architecture: "
            f"{[u.kind for u in plan.units]} vs "
            f"{[type(layer).__name__ for layer in zipped_layers]}."
        )
    # A zip holding no per-task BatchNorm computes each task's layers as affine maps (it was
    # made with batch_norm="fold", or from models without BatchNorm): a newcomer's BatchNorm
    # is folded the same way, into a bias the zipped layer must have. A zip that keeps
    # per-task BatchNorm needs it on the same layers.
    holds_batch_norm = any(layer.batch_norm for layer in zipped_layers)
    folded = not holds_batch_norm and any(unit.batch_norm for unit in plan.units)
    difference = zipped_network.zipped_difference(zipped, plan, folded)
    if difference is not None:
        raise ValueError(
            f"Model {model.name!r} for new task {task!r} differs from the zipped model "
            f"{difference}; a task joins a zip only with the same function at every layer "
            "(widths may differ)."
        )
    _validate_models({"zipped_task": model, task: model})
    task_names = old_tasks + [task]
    _check_tasks(calibration, task_names, "calibration")
    _check_options(matching, "hessian", "hessian", hessian, "task", repair)
    _check_side_data(evaluation, retrain, task_names)
    newcomer = zipped_network.separate_states(
        {task: plan}, {task: model}, "fold" if folded else "task"
    )
    states = zipped_network.read_states(zipped, plan)
    for state, own in zip(states, newcomer):
        if own.units[0] < state.shared_units:
            raise ValueError(
                f"Layer {state.name!r} of {task!r} has {own.units[0]} units, fewer than the "
                f"{state.shared_units} shared ones it must join."
            )
        state.kernels.append(own.kernels[0])
        state.biases.append(own.biases[0])
        state.norms.extend(own.norms)
        state.cross_kernels.append(
            np.zeros(state.kernel_prefix + (own.kernels[0].shape[-2] - state.input_shared_units, 0))
        )
        state.sharing.append(state.shared_units == 0)  # nothing to join: trivially sharing
        state.common_input = state.common_input and own.common_input
    calibration = _calibration_inputs(calibration, plan, task_names)
    config = dict(
        matching=matching,
        pairing="hessian",
        tie="hessian",
        damping=damping,
        hessian=hessian,
        seed=0,
        repair=repair,
    )
    retrain, optimizer_used = resolve_optimizer(
        retrain, {"the zipped model": zipped, f"task {task!r}'s input model": model}
    )
    report = ZipReport(
        tasks=task_names, matching=matching, retrain_optimizer=optimizer_used, repair=repair
    )
    run = (retrain, evaluation, report, verbose)
    result = driver.join_graph(
        plan, zipped, task, model, task_names, states, newcomer, calibration, config, run
    )
    separate = sum(zipped_network.task_model(zipped, t).count_params() for t in old_tasks)
    _finish(result, report, separate + model.count_params())
    return result, report


def _calibration_inputs(calibration: Mapping, plan: graph.Plan, task_names: list) -> dict:
    """{task: dataset of inputs only}, each checked against the models' input shape."""
    return {
        t: data.dataset_inputs(calibration[t], plan.input_shape, f"task {t!r}", "calibration data")
        for t in task_names
    }


def _check_tasks(values, task_names: list[str], what: str) -> None:
    if not isinstance(values, Mapping) or set(values) != set(task_names):
        raise ValueError(
            f"`{what}` must have one dataset per task {task_names}. Received keys: "
            f"{sorted(values) if isinstance(values, Mapping) else values!r}"
        )


def _check_side_data(evaluation, retrain, task_names: list[str]) -> None:
    if evaluation is not None and set(evaluation) - set(task_names):
        raise ValueError(
            f"`evaluation` names unknown task(s) {sorted(set(evaluation) - set(task_names))}; "
            f"tasks: {task_names}."
        )
    if retrain is not None and set(retrain.train) != set(task_names):
        raise ValueError(
            f"`Retrain.train` must have one dataset per task {task_names}. Received keys: "
            f"{sorted(retrain.train)}"
        )
    # Labels present and of a usable form, before any work; their range is checked on the
    # batches read (evaluation: task_accuracies; retraining: a check op in its pipeline).
    for task, dataset in (evaluation or {}).items():
        check_labelled_data(dataset, task, "evaluation")
    for task, dataset in (retrain.train if retrain else {}).items():
        form = "sparse" if retrain.loss is None else "any"  # the default loss: class indices
        check_labelled_data(dataset, task, "Retrain.train", labels=form)

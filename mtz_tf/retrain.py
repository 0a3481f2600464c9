"""Joint multi-task light retraining of a zipped model, and per-task evaluation."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from mtz_tf import fitting, graph, tied_training, zipped_network
from mtz_tf.report import LayerReport

_LOG = logging.getLogger(__name__)

LIGHT_RETRAINING_SCALE = 0.1
"""Light retraining's learning rate relative to the rate the input models were compiled
with. Measured on validation (``experiments/retrain_lr_sweep.py``, ``results/retrain_lr_*``:
three seed pairs each of converged LeNet-300-100 and LeNet-5 trained with Adam at 1e-3, and
of different-task LeNet-300-100): at the compiled rate a fresh Adam costs the models
fine-tuned alone 0.82 and 0.57 points, at a tenth of it they gain 0.61 and 0.40, and the
zipped models after retraining are within noise of the best rate tried."""

DEFAULT_LEARNING_RATE = 1e-3 * LIGHT_RETRAINING_SCALE
"""Adam's learning rate when neither ``Retrain.optimizer`` nor the input models give one:
the light-retraining scale of Adam's usual training rate, 1e-3."""


@dataclasses.dataclass
class Retrain:
    """Settings for the light joint retraining after each zipped layer.

    Every step draws one batch from each task's training data and takes one optimizer step
    on the sum of the task losses (the paper's joint retraining), over all weights of the
    zipped model. Each layer's retraining uses a fresh copy of ``optimizer`` and continues
    through each dataset where the previous layer stopped, so an interrupted zip resumes
    exactly.

    Attributes:
        train: {task: tf.data.Dataset of (x, y) batches} (repeated as needed).
        steps_per_layer: int, or a sequence with one count per hidden layer.
        optimizer: a Keras optimizer (instance, name or config). Default (None): a fresh
            copy of the input models' compiled optimizer at a tenth of its compiled learning
            rate (:data:`LIGHT_RETRAINING_SCALE`; the first model's if they differ, with a
            warning), else Adam with learning rate 1e-4; see :func:`resolve_optimizer`. The
            zip report records which. Given, it is used as it is.
        loss: a Keras loss for every task. Default: sparse categorical cross-entropy on
            logits (``from_logits=False`` when the output activation is softmax).
        callbacks: Keras callbacks called by every retraining (:func:`mtz_tf.fitting.fit`).
        verbose: int, progress-bar verbosity of each retraining (as Keras ``fit``).
    """

    train: Mapping[str, tf.data.Dataset]
    steps_per_layer: int | Sequence[int] = 200
    optimizer: object = None
    loss: object = None
    callbacks: Sequence[keras.callbacks.Callback] = ()
    verbose: int = 1

    def steps_for(self, layer_index: int, num_layers: int) -> int:
        """Retraining steps after hidden layer ``layer_index`` (of ``num_layers``)."""
        steps = self.steps_per_layer
        if isinstance(steps, (int, np.integer)):
            counts = [int(steps)] * num_layers
        else:
            counts = [int(s) for s in steps]
            if len(counts) != num_layers:
                raise ValueError(
                    f"`steps_per_layer` needs one count per hidden layer ({num_layers}). "
                    f"Received {counts}."
                )
        if any(c < 0 for c in counts):
            raise ValueError(f"`steps_per_layer` must be non-negative. Received {counts}.")
        return counts[layer_index]

    def new_optimizer(self) -> keras.optimizers.Optimizer:
        """A fresh optimizer built from ``optimizer`` (never the user's instance itself);
        Adam at :data:`DEFAULT_LEARNING_RATE` when it is None (``zip_models`` first resolves
        None from the input models with :func:`resolve_optimizer`)."""
        if self.optimizer is None:
            return keras.optimizers.Adam(learning_rate=DEFAULT_LEARNING_RATE)
        if isinstance(self.optimizer, keras.optimizers.Optimizer):
            return _fresh_copy(self.optimizer)
        return keras.optimizers.get(self.optimizer)


def _fresh_copy(
    optimizer: keras.optimizers.Optimizer, rate_scale: float = 1.0
) -> keras.optimizers.Optimizer:
    """A new optimizer of the same class and config (no slots, no iterations), its learning
    rate times ``rate_scale`` when it is a number (a schedule is kept as it is)."""
    config = optimizer.get_config()
    if rate_scale != 1.0 and isinstance(config.get("learning_rate"), (int, float)):
        config["learning_rate"] = float(config["learning_rate"]) * rate_scale
    return type(optimizer).from_config(config)


def optimizer_record(optimizer: keras.optimizers.Optimizer, source: str) -> dict:
    """{"class_name", "config", "source"} of ``optimizer`` as JSON types, the config
    without the instance name (Keras numbers those: adam, adam_1, ...)."""
    config = keras.optimizers.serialize(optimizer)["config"]
    config = {k: v for k, v in config.items() if k != "name"}
    return {
        "class_name": type(optimizer).__name__,
        "config": json.loads(json.dumps(config, default=float)),
        "source": source,
    }


def resolve_optimizer(
    retrain: Retrain | None, models: Mapping[str, keras.Model]
) -> tuple[Retrain | None, dict | None]:
    """``retrain`` with its default optimizer made concrete, and the record of the
    optimizer (:func:`optimizer_record`) for the report.

    ``models`` maps a description of each input model (e.g. "task 'a''s input model") to
    the model. An ``optimizer`` the user gave is kept (source "Retrain.optimizer").
    Otherwise, when any of ``models`` was compiled, the optimizer is a fresh copy of the
    first compiled model's own at :data:`LIGHT_RETRAINING_SCALE` times its compiled
    learning rate (a learning-rate schedule is kept as compiled; the source names the
    model); if the compiled models' optimizers differ in class or config, the first one's
    is used, and the record and a warning name the others. With no compiled model it is
    Adam with learning rate :data:`DEFAULT_LEARNING_RATE` (source "default"). As reported
    on a different-task LeNet-300-100 pair fully zipped with 1,000 joint steps, SGD at 0.01
    (the former default) lost 0.80 and 0.91 points where Adam at 1e-3 lost 0.20 and gained
    0.42; light retraining of converged models does better at a tenth of the training rate
    (:data:`LIGHT_RETRAINING_SCALE`).
    """
    if retrain is None:
        return None, None
    if retrain.optimizer is not None:
        return retrain, optimizer_record(retrain.new_optimizer(), "Retrain.optimizer")
    compiled = {
        label: model.optimizer
        for label, model in models.items()
        if isinstance(getattr(model, "optimizer", None), keras.optimizers.Optimizer)
    }
    if not compiled:
        return retrain, optimizer_record(retrain.new_optimizer(), "default")
    records = {label: optimizer_record(opt, label) for label, opt in compiled.items()}
    first = next(iter(compiled))
    differing = {
        label: f"{label}: {r['class_name']} {r['config']}"
        for label, r in records.items()
        if (r["class_name"], r["config"])
        != (records[first]["class_name"], records[first]["config"])
    }
    resolved = dataclasses.replace(
        retrain, optimizer=_fresh_copy(compiled[first], LIGHT_RETRAINING_SCALE)
    )
    record = optimizer_record(resolved.optimizer, records[first]["source"])
    if isinstance(compiled[first].get_config().get("learning_rate"), (int, float)):
        record["source"] += f" (its learning rate × {LIGHT_RETRAINING_SCALE:g})"
    if differing:
        others = "; ".join(differing.values())
        record["source"] += f" (the input models' optimizers differ: {others})"
        _LOG.warning(
            "The input models were compiled with different optimizers; retraining uses a "
            "fresh copy of the optimizer of %s (%s %s), not %s. Set `Retrain.optimizer` to "
            "choose another.",
            first,
            record["class_name"],
            record["config"],
            others,
        )
    return resolved, record


def _labels_spec(dataset, task: str, what: str):
    """The label spec of ``dataset``, which must yield (inputs, labels) pairs."""
    spec = getattr(dataset, "element_spec", None)
    if not (isinstance(spec, tuple) and len(spec) == 2):
        raise ValueError(
            f"The `{what}` data of task {task!r} must be a batched tf.data.Dataset of "
            f"(inputs, integer labels) pairs; its elements are {spec}. Pass "
            "`mtz_tf.data.to_dataset(x, y)` (labels are needed for accuracy and retraining)."
        )
    return spec[1]


def check_labelled_data(
    dataset, task: str, what: str, classes: int | None = None, labels: str = "classes"
) -> None:
    """Checks from ``dataset.element_spec`` alone, before any work, that ``dataset`` yields
    (inputs, labels) batches with labels of the form ``labels`` names: ``"classes"`` class
    indices, shape (batch,) or (batch, 1), integer or whole floats (their range is checked
    on the batches read), or one-hot rows (batch, ``classes``); ``"sparse"`` class indices
    only (the default retraining loss); ``"any"`` any labels (a custom loss defines them).
    ``what`` names the data in the messages."""
    spec = _labels_spec(dataset, task, what)
    if labels == "any":
        return
    if not isinstance(spec, tf.TensorSpec) or not (spec.dtype.is_integer or spec.dtype.is_floating):
        received = spec.dtype.name if isinstance(spec, tf.TensorSpec) else spec
        raise TypeError(
            f"The `{what}` data of task {task!r} has labels of dtype {received}; expected a "
            "tensor of integer class labels (or of one-hot float rows)."
        )
    shape = tuple(spec.shape) if spec.shape.rank is not None else None
    if shape is None or len(shape) == 1 or shape[1:] == (1,):
        return
    width = f"{classes}" if classes is not None else "classes"
    if len(shape) == 2 and labels == "sparse":
        raise ValueError(
            f"The `{what}` data of task {task!r} has one-hot labels of shape {shape}, but the "
            "default loss (sparse categorical cross-entropy) takes integer class labels of "
            "shape (batch,). Give class indices (e.g. `tf.argmax(y, axis=-1)`), or set "
            "`Retrain.loss` to a loss for one-hot labels, e.g. "
            "`keras.losses.CategoricalCrossentropy(from_logits=True)`."
        )
    if len(shape) == 2 and (classes is None or shape[1] in (None, classes)):
        return
    raise ValueError(
        f"The `{what}` data of task {task!r} has labels of shape {shape}; expected class "
        f"indices of shape (batch,) or one-hot rows of shape (batch, {width}), {width} being "
        "the number of classes of the task's head. Batch the dataset, and give each task "
        "labels of its own head."
    )


def _raise_label_range(task: str, what: str, labels, classes: int) -> None:
    labels = np.asarray(labels).reshape(-1)
    bad = labels[(labels < 0) | (labels >= classes) | (labels != np.floor(labels))]
    raise ValueError(
        f"The `{what}` data of task {task!r} holds label {bad[0] if bad.size else '?'}, "
        f"outside the task's {classes} classes (labels must be integers in [0, {classes - 1}])."
        " Check that each task gets its own labels (e.g. remapped to 0..C-1 for a label "
        "subset)."
    )


def _label_marker(task: str) -> str:
    # No quotes: TensorFlow escapes them in the message of a failed assertion.
    return f"mtz_tf label check: task={task}"


def _invalid_labels(y, classes: int):
    """A batch's labels, flattened, and for each whether it is not a class index in
    [0, classes)."""
    y = tf.reshape(y, [-1])
    index = tf.cast(y, tf.int64)
    invalid = (index < 0) | (index >= classes)
    if y.dtype.is_floating:
        invalid |= tf.cast(index, y.dtype) != y  # fractional, NaN or inf
    return y, invalid


def _checked_labels(dataset, task: str, classes: int):
    """``dataset`` with each batch's labels checked, as it is read, to lie in [0, classes);
    a failed check names the task and the first offending label (:func:`_label_error`)."""

    def check(x, y):
        flat, invalid = _invalid_labels(y, classes)
        first_bad = tf.boolean_mask(flat, invalid)[:1]
        assertion = tf.debugging.Assert(
            tf.logical_not(tf.reduce_any(invalid)), [_label_marker(task), first_bad]
        )
        with tf.control_dependencies([assertion]):
            return x, tf.identity(y)

    return dataset.map(check)


def _label_error(error: Exception, model: keras.Model, tasks) -> ValueError | None:
    """The ValueError for a failed :func:`_checked_labels` assertion; None for other errors."""
    message = str(error)
    for task in tasks:
        marker = _label_marker(task)
        if marker in message:
            found = re.search(re.escape(marker) + r"\]\s*\[([^\]]*)\]", message)
            label = f": label {found.group(1).strip()} was read" if found else ""
            classes = model.output[task].shape[-1]
            return ValueError(
                f"The `Retrain.train` data of task {task!r} holds labels outside the task's "
                f"{classes} classes{label} (labels must be integers in [0, {classes - 1}]). "
                "Check that each task gets its own labels (e.g. remapped to 0..C-1 for a "
                "label subset)."
            )
    return None


def _default_loss(model: keras.Model, task: str) -> keras.losses.Loss:
    head = model.output[task]._keras_history.operation
    from_logits = getattr(head, "activation_name", "linear") != "softmax"
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


class RetrainingDivergedError(FloatingPointError):
    """Joint retraining produced a NaN or infinite loss or weight.

    Attributes:
        layer: str, the zipped layer after which retraining ran.
        step: int, the retraining step (counted over the whole zip, from 0) at which the loss
            first was not finite, or the last step when only the weights are.
    """

    def __init__(self, message: str, layer: str, step: int):
        super().__init__(message)
        self.layer, self.step = layer, step


class _FirstNonFiniteLoss(keras.callbacks.Callback):
    """Stops training at the first batch whose loss is NaN or infinite, and remembers it."""

    def __init__(self):
        super().__init__()
        self.batch = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            self.batch = batch
            self.model.stop_training = True


class _JointTrainer(keras.Model):
    """The training view of a zipped model: one input per task, task t's batch through task
    t's path alone (:func:`mtz_tf.zipped_network.task_values`), so no task's layers (and
    BatchNorm statistics) see another task's data and nothing is computed for outputs no
    loss reads. Its variables are the zipped model's."""

    def __init__(self, zipped: keras.Model, plan, **kwargs):
        super().__init__(**kwargs)
        self.zipped = zipped
        self._plan = plan

    def call(self, inputs, training=False):
        return {
            task: zipped_network.task_values(
                self.zipped,
                self._plan,
                t,
                [self._plan.output_step],
                {graph.MODEL_INPUT: inputs[task]},
                training,
            )[0]
            for t, task in enumerate(self.zipped.output)
        }


def _joint_batches(model: keras.Model, retrain: Retrain) -> tf.data.Dataset:
    """The endless stream of joint batches ``({task: x}, {task: y})``: one batch of each
    task's (repeated) training data per step, labels checked as they are read when the
    default loss needs class indices."""
    tasks = list(model.output)
    joint = tf.data.Dataset.zip(
        {
            t: (
                _checked_labels(retrain.train[t].repeat(), t, model.output[t].shape[-1])
                if retrain.loss is None  # the default loss takes integer class labels
                else retrain.train[t].repeat()
            )
            for t in tasks
        }
    )
    return joint.map(
        lambda batches: ({t: batches[t][0] for t in tasks}, {t: batches[t][1] for t in tasks})
    )


def retrain_jointly(
    model: keras.Model,
    plan,
    retrain: Retrain,
    steps: int,
    start_step: int,
    layer: str = "",
    session: dict | None = None,
) -> None:
    """Trains zipped ``model`` (built from ``plan``) in place for ``steps`` joint steps,
    starting at batch ``start_step``.

    Each step feeds task t's batch through task t's path of the zipped model and sums the
    per-task losses. With an element-wise optimizer on one replica the step runs on the
    tasks' fixed-shape views with tied shared weights (:mod:`mtz_tf.tied_training`).
    ``session``, a dict the caller keeps between the layers of one zip, then holds the
    trainer and the batch stream, so a zip traces one step per distinct topology of its
    task views and reads its batches once. Otherwise
    (:func:`mtz_tf.tied_training.unsupported_reason`) it trains the zipped model itself
    (:class:`_JointTrainer`), one trace per call, under ``tf.distribute.get_strategy()``
    (the model must have been built under it).

    Raises:
        RetrainingDivergedError: the loss or a weight became NaN or infinite (training
            stops at the first such step; the message names ``layer`` and the step). The
            model's weights are then unusable; a checkpoint of earlier layers is untouched.
    """
    if steps == 0:
        return
    tasks = list(model.output)
    missing = sorted(set(tasks) - set(retrain.train))
    if missing:
        raise ValueError(f"`Retrain.train` has no dataset for task(s) {missing}.")
    session = {} if session is None else session
    losses = {t: retrain.loss or _default_loss(model, t) for t in tasks}
    watch = _FirstNonFiniteLoss()
    callbacks = list(retrain.callbacks) + [watch]
    optimizer = retrain.new_optimizer()
    reason = tied_training.unsupported_reason(optimizer)
    try:
        if reason is None:
            trainer = _tied_trainer(model, optimizer, losses, session)
            batches = _stream(model, retrain, start_step, session)
            session["position"] = None  # unknown until the steps are done
            trainer.fit(model, batches, steps, callbacks, retrain.verbose)
            session["position"] = start_step + steps
        else:
            _LOG.debug("Retraining through the zipped model, traced per layer: %s.", reason)
            with tf.distribute.get_strategy().scope():
                trainer = _JointTrainer(model, plan, name=f"{model.name}_joint_trainer")
                trainer.compile(optimizer=optimizer, loss=losses)
            joint = _joint_batches(model, retrain).skip(start_step).take(steps)
            fitting.fit(trainer, joint, callbacks=callbacks, verbose=retrain.verbose)
    except tf.errors.InvalidArgumentError as error:
        label_error = _label_error(error, model, tasks)
        if label_error is None:
            raise
        raise label_error from None
    bad = [v.path for v in model.weights if not np.all(np.isfinite(v.numpy()))]
    if watch.batch is not None or bad:
        step = start_step + (watch.batch if watch.batch is not None else steps - 1)
        what = (
            "the loss became NaN or infinite"
            if watch.batch is not None
            else (f"weights {bad[:3]} became NaN or infinite")
        )
        raise RetrainingDivergedError(
            f"Joint retraining after layer {layer!r} diverged: {what} at retraining step "
            f"{step} (step {step - start_step + 1} of {steps} for this layer). Lower the "
            "learning rate of `Retrain.optimizer` (e.g. optimizer=keras.optimizers.Adam(1e-4))"
            " or retrain fewer steps; a checkpoint of the layers before it is kept.",
            layer,
            step,
        )


def _tied_trainer(model, optimizer, losses, session: dict) -> tied_training.TiedTrainer:
    """``session``'s trainer when its task views fit ``model``, else a new one kept there."""
    trainer = session.get("trainer")
    if trainer is None or trainer.key != tied_training.topology_key(model):
        trainer = tied_training.TiedTrainer(model, optimizer, losses)
        session["trainer"] = trainer
    return trainer


def _stream(model, retrain: Retrain, start_step: int, session: dict):
    """An iterator of joint batches from batch ``start_step``: ``session``'s, when the last
    retraining stopped there, else a new one kept there."""
    if session.get("position") != start_step:
        session["batches"] = iter(_joint_batches(model, retrain).skip(start_step))
    return session["batches"]


def task_accuracies(model: keras.Model, evaluation: Mapping[str, tf.data.Dataset]) -> dict:
    """{task: top-1 accuracy of output ``task`` on its own (x, y) batches}; labels are class
    indices or one-hot rows (:func:`check_labelled_data`)."""
    classes = {task: model.output[task].shape[-1] for task in evaluation}
    for task, dataset in evaluation.items():
        check_labelled_data(dataset, task, "evaluation", classes[task])

    @tf.function
    def correct(x, y, task):
        logits = model(x, training=False)[task]
        if y.shape.rank == 2 and y.shape[-1] != 1:  # one-hot rows
            y, invalid = tf.argmax(y, axis=-1), tf.zeros([tf.shape(y)[0]], tf.bool)
        else:
            y, invalid = _invalid_labels(y, classes[task])
        hits = tf.equal(tf.argmax(logits, axis=-1), tf.cast(y, tf.int64))
        bad = tf.reduce_sum(tf.cast(invalid, tf.int64))
        return tf.reduce_sum(tf.cast(hits, tf.int64)), tf.size(y, out_type=tf.int64), bad

    result = {}
    for task, dataset in evaluation.items():
        hits = total = 0
        for x, y in dataset:
            h, n, bad = correct(x, y, task)
            if int(bad):
                _raise_label_range(task, "evaluation", y, classes[task])
            hits, total = hits + int(h), total + int(n)
        result[task] = hits / max(total, 1)
    return result


def after_layer(
    model: keras.Model,
    plan,
    states: list,
    index: int,
    merge_cost: float,
    retrain: Retrain | None,
    evaluation: Mapping | None,
    start_step: int,
    began: float,
    timings: dict,
    verbose: int,
    session: dict | None = None,
):
    """What follows zipping hidden layer ``index``: accuracy before and after light
    retraining (when ``evaluation`` is given), ``retrain``'s steps for the layer (``states``
    re-read from the retrained ``model``; ``session`` as :func:`retrain_jointly`), the
    timings and a progress line.

    Returns:
        ``(layer_report, next_step)``: the layer's :class:`~mtz_tf.report.LayerReport` and
        the retraining stream position for the next layer.
    """
    count = len(plan.hidden_units)
    layer_report = LayerReport(
        name=plan.hidden_units[index].name,
        widths=dict(zip(model.output, states[index].units)),
        shared=states[index].shared_units,
        merge_cost=merge_cost,
    )
    if evaluation is not None:
        layer_report.accuracy_before_retraining = task_accuracies(model, evaluation)
    steps = retrain.steps_for(index, count) if retrain is not None else 0
    if steps:
        retrain_jointly(
            model,
            plan,
            retrain,
            steps,
            start_step=start_step,
            layer=plan.hidden_units[index].name,
            session=session,
        )
        states[:] = zipped_network.read_states(model, plan)
        if evaluation is not None:
            layer_report.accuracy_after_retraining = task_accuracies(model, evaluation)
    layer_report.retrain_steps = steps
    layer_report.seconds = time.time() - began
    timings["retrain_and_evaluation"] = layer_report.seconds - sum(timings.values())
    layer_report.timings = timings
    if verbose:
        _LOG.info(layer_report.progress_line(index, count))
    return layer_report, start_step + steps

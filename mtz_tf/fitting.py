"""The library's training loop: Keras ``fit`` semantics under every ``tf.distribute`` strategy.

Keras 3's ``Model.fit`` fails under ``tf.distribute.MultiWorkerMirroredStrategy`` before
its first step: it reduces the first distributed batch as one nested value, which the
collective strategy refuses (keras-team/keras#20585, tensorflow/tensorflow#72388). Every
training in mtz_tf (joint retraining, the binaries' input-model training, ISTA) runs
through :func:`fit` instead, the same loop whatever the strategy: a single process, one
machine's devices (``MirroredStrategy``) or several workers.

One step, with R replicas each holding a slice of the global batch (the dataset's own batch,
split by ``strategy.experimental_distribute_dataset``): each replica computes the model's
compiled loss on its slice with ``Model.compute_loss`` (the compiled losses' batch means
and regularisation losses, each divided by R as Keras scales them), takes its gradient,
and hands it to the optimizer, which all-reduces (sums) the replicas' gradients before one
update, so the update is that of the global batch's mean loss, as on one device. The step
is one ``tf.function``; the per-step loss is the sum of the replicas' scaled losses.

Callbacks see what ``fit`` gives them: ``on_train_batch_end`` logs ``{"loss": the
epoch's running mean}``, ``on_epoch_end`` the epoch's mean loss plus ``epoch_logs()``
(e.g. a validation accuracy), and ``model.stop_training`` ends training after the step
or epoch that set it. The returned history is a ``keras.callbacks.History``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf


def build(model: keras.Model, dataset: tf.data.Dataset) -> None:
    """Creates the compiled loss's and the optimizer's variables before the first step, in
    the strategy's cross-replica context (variables cannot be created inside a replica
    step of a multi-worker strategy), from a batch of one zero sample shaped as
    ``dataset``'s elements (reading a real batch would advance a reshuffling dataset)."""

    def zeros(spec):
        return tf.zeros([1 if size is None else size for size in spec.shape], spec.dtype)

    x, y = tf.nest.map_structure(zeros, dataset.element_spec)
    model.compute_loss(x=x, y=y, y_pred=model(x, training=False), training=False)
    model.optimizer.build(model.trainable_variables)


def train_step_function(model: keras.Model, transform: Callable | None = None) -> Callable:
    """A ``tf.function`` of one training step of compiled ``model`` on a distributed
    ``(x, y)`` batch under the model's strategy (module docstring); it returns the step's
    global mean loss. ``transform``, if given, maps the list of gradients (of
    ``model.trainable_variables``, in order) to the list the optimizer applies."""
    strategy = model.distribute_strategy
    weights = model.trainable_variables

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
            scaled = model.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, weights)
        if transform is not None:
            gradients = transform(gradients)
        model.optimizer.apply_gradients(zip(gradients, weights))
        return loss

    @tf.function
    def step(batch):
        x, y = batch
        losses = strategy.run(replica_step, args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    return step


def fit(
    model: keras.Model,
    dataset: tf.data.Dataset,
    epochs: int = 1,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    epoch_logs: Callable[[], dict] | None = None,
    verbose: int = 0,
    step: Callable | None = None,
    steps: int | None = None,
) -> keras.callbacks.History:
    """Trains compiled ``model`` in place on ``dataset`` for ``epochs`` passes.

    Args:
        model: a compiled ``keras.Model``; it trains under the strategy in whose scope it
            was built (``model.distribute_strategy``), whether or not that scope is open.
        dataset: a batched ``tf.data.Dataset`` of ``(x, y)``; each pass reads it to its
            end. Under a multi-worker strategy it is sharded across workers as
            ``strategy.experimental_distribute_dataset`` does (by data unless it reads
            files), each global batch split between the replicas.
        epochs: int, passes over ``dataset``.
        callbacks: Keras callbacks, called as ``Model.fit`` calls them (module docstring).
        epoch_logs: optional function returning extra logs for ``on_epoch_end``, e.g.
            ``{"val_accuracy": ...}``, for callbacks such as ``EarlyStopping``.
        verbose: 0 silent, 1 a progress bar, 2 one line per epoch.
        step: a step of ``model`` from :func:`train_step_function`, kept from an earlier
            ``fit`` so that it is not traced again (its loss and optimizer are built
            already); default: a new one.
        steps: int, batches per epoch (default: to the dataset's end). With ``steps``,
            ``dataset`` may also be an iterator of batches (one replica), which each epoch
            continues where the last stopped.

    Returns:
        The ``keras.callbacks.History`` of the run.
    """
    strategy = model.distribute_strategy
    if step is None:
        with strategy.scope():
            build(model, dataset)
        step = train_step_function(model)
    if isinstance(dataset, tf.data.Dataset):
        distributed = strategy.experimental_distribute_dataset(dataset)
        if steps is None and int(dataset.cardinality()) >= 0:
            steps = int(dataset.cardinality())
    elif steps is None or strategy.num_replicas_in_sync > 1:
        raise ValueError("An iterator of batches needs `steps` and one replica.")
    else:
        distributed = dataset
    callback_list = keras.callbacks.CallbackList(
        list(callbacks),
        add_history=True,
        add_progbar=verbose != 0,
        model=model,
        verbose=verbose,
        epochs=epochs,
        steps=steps,
    )
    model.stop_training = False
    callback_list.on_train_begin()
    logs = {}
    for epoch in range(epochs):
        callback_list.on_epoch_begin(epoch)
        total, count = 0.0, 0
        batches = distributed if steps is None else itertools.islice(distributed, steps)
        for batch_index, batch in enumerate(batches):
            callback_list.on_train_batch_begin(batch_index)
            total, count = total + float(step(batch)), count + 1
            callback_list.on_train_batch_end(batch_index, {"loss": total / count})
            if model.stop_training:
                break
        logs = {"loss": total / max(count, 1)}
        if epoch_logs is not None:
            logs.update(epoch_logs())
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end(logs)
    return model.history

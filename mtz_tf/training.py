"""Plain single-task training and evaluation of classifiers (logits outputs)."""

from __future__ import annotations

import keras
import numpy as np

from mtz_tf import data, fitting


def compile_classifier(model: keras.Model, learning_rate: float = 1e-3) -> keras.Model:
    """Compiles ``model`` (logits output) with Adam and sparse cross-entropy; returns it."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def train_classifier(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    seed: int = 0,
    verbose: int = 1,
) -> keras.callbacks.History:
    """Trains ``model`` in place with Adam on sparse labels (:func:`mtz_tf.fitting.fit`, under
    the current strategy); returns the Keras history, with ``val_accuracy`` per epoch when
    ``validation`` is given.

    Seeds Keras/TF/NumPy with ``seed`` first so that runs repeat.
    """
    keras.utils.set_random_seed(seed)
    compile_classifier(model, learning_rate)
    train_ds = data.to_dataset(x, y, batch_size=batch_size, shuffle=True, seed=seed)
    return fitting.fit(
        model,
        train_ds,
        epochs=epochs,
        epoch_logs=None if validation is None else _validation_logs(model, *validation),
        verbose=verbose,
    )


def _validation_logs(model: keras.Model, x: np.ndarray, y: np.ndarray):
    """The epoch-end logs of training with a validation split: ``{"val_accuracy": ...}``."""
    validation = data.to_dataset(x, y, batch_size=1000)
    return lambda: {"val_accuracy": dataset_accuracy(model, validation)}


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy of a logits (or probabilities) model on ``(x, y)``."""
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def dataset_accuracy(model: keras.Model, dataset) -> float:
    """Top-1 accuracy of a single-output logits (or probabilities) model on a batched
    ``tf.data.Dataset`` of (inputs, class-index labels)."""
    hits = total = 0
    for x, y in dataset:
        predicted = np.argmax(np.asarray(model(x, training=False)), axis=-1)
        labels = np.asarray(y).reshape(len(predicted))
        hits, total = hits + int(np.sum(predicted == labels)), total + len(labels)
    if total == 0:
        raise ValueError("The evaluation dataset is empty: no accuracy to measure.")
    return hits / total


def train_to_convergence(
    model: keras.Model,
    train: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray],
    max_epochs: int = 40,
    patience: int = 3,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    seed: int = 0,
    verbose: int = 1,
) -> int:
    """Trains until validation accuracy stops improving; keeps the best epoch's weights.

    Returns:
        The training iterations (optimizer steps) up to and including the best epoch: what
        training from scratch needed.
    """
    keras.utils.set_random_seed(seed)
    compile_classifier(model, learning_rate)
    stop = keras.callbacks.EarlyStopping(
        monitor="val_accuracy", patience=patience, restore_best_weights=True, mode="max"
    )
    history = fitting.fit(
        model,
        data.to_dataset(*train, batch_size=batch_size, shuffle=True, seed=seed),
        epochs=max_epochs,
        callbacks=[stop],
        epoch_logs=_validation_logs(model, *validation),
        verbose=verbose,
    )
    best_epoch = int(np.argmax(history.history["val_accuracy"])) + 1
    steps_per_epoch = -(-len(train[0]) // batch_size)
    return best_epoch * steps_per_epoch

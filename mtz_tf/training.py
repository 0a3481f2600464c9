"""Plain single-task training and evaluation of classifiers (logits outputs)."""

from __future__ import annotations

import keras
import numpy as np

from mtz_tf import data


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
    """Trains ``model`` in place with Adam on sparse labels; returns the Keras history.

    Seeds Keras/TF/NumPy with ``seed`` first so that runs repeat.
    """
    keras.utils.set_random_seed(seed)
    compile_classifier(model, learning_rate)
    train_ds = data.to_dataset(x, y, batch_size=batch_size, shuffle=True, seed=seed)
    val_ds = None if validation is None else data.to_dataset(*validation, batch_size=512)
    return model.fit(
        train_ds, epochs=epochs, validation_data=val_ds, shuffle=False, verbose=verbose
    )


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy of a logits (or probabilities) model on ``(x, y)``."""
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))

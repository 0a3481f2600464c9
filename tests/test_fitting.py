"""mtz_tf.fitting.fit: the library's training loop, checked against closed-form updates and
against itself under a two-replica MirroredStrategy."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close

from mtz_tf import fitting


def _regression(seed: int = 0, n: int = 24, d: int = 5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = (x @ rng.normal(size=(d, 1)) + 0.3).astype("float32")
    return x, y


def _linear_model(d: int, learning_rate: float):
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="mse")
    return model


def test_sgd_steps_follow_the_closed_form_gradient_of_the_mean_loss():
    x, y = _regression()
    model = _linear_model(x.shape[1], learning_rate=0.05)
    w, b = (v.numpy().astype(np.float64) for v in model.weights)
    expected_losses = []
    for batch in (slice(0, 12), slice(12, 24)):  # two batches of 12, in order
        xb, yb = x[batch].astype(np.float64), y[batch].astype(np.float64)
        residual = xb @ w + b - yb
        expected_losses.append(float(np.mean(residual**2)))
        w = w - 0.05 * 2 * xb.T @ residual / len(xb)
        b = b - 0.05 * 2 * residual.mean(axis=0)
    history = fitting.fit(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(12))
    assert_close(model.weights[0].numpy(), w, 1e-5)
    assert_close(model.weights[1].numpy(), b, 1e-5)
    assert history.history["loss"] == pytest.approx([np.mean(expected_losses)], rel=1e-5)


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, batches: int):
        super().__init__()
        self.batches, self.seen = batches, []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(logs["loss"])
        if len(self.seen) == self.batches:
            self.model.stop_training = True


def test_callbacks_see_running_losses_and_can_stop_training():
    x, y = _regression(n=40)
    model = _linear_model(x.shape[1], learning_rate=0.01)
    stop = _StopAfter(3)
    history = fitting.fit(
        model,
        tf.data.Dataset.from_tensor_slices((x, y)).batch(8),
        epochs=4,
        callbacks=[stop],
        epoch_logs=lambda: {"val_accuracy": 0.5},
    )
    assert int(model.optimizer.iterations) == 3
    assert history.history["loss"] == pytest.approx([stop.seen[-1]])
    assert history.history["val_accuracy"] == [0.5]


def _classifier(seed: int):
    init = keras.initializers.GlorotUniform(seed)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", kernel_initializer=init),
            keras.layers.Dense(3, kernel_initializer=init),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def test_two_mirrored_replicas_train_as_one_device():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.integers(0, 3, size=64)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    alone = _classifier(seed=4)
    fitting.fit(alone, dataset, epochs=2)
    with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
        mirrored = _classifier(seed=4)
        fitting.fit(mirrored, dataset)
    fitting.fit(mirrored, dataset)  # outside the scope: still under the model's strategy
    # Each replica's gradient of its half batch, scaled by 1/2 and summed: one device's.
    for a, m in zip(alone.weights, mirrored.weights):
        assert_close(m.numpy(), a.numpy(), 1e-4, a.path)

"""Shared fixtures: real Fashion-MNIST data and small trained Keras models."""

import io
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPUs so that a MirroredStrategy test can run on this 2-core machine; must
# happen before TensorFlow initialises its devices.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

from mtz_tf import data, models, training  # noqa: E402


@pytest.fixture(scope="session")
def fashion():
    """A 12k-sample training subset and a 2k-sample test subset, normalised to [0, 1]."""
    x, y = data.load(split="train")
    x_test, y_test = data.load(split="test")
    return (
        data.normalize(x[:12000]),
        y[:12000],
        data.normalize(x_test[:2000]),
        y_test[:2000],
    )


def _trained_lenet(fashion, seed):
    x, y, _, _ = fashion
    model = models.lenet_300_100(seed=seed)
    training.train_classifier(model, x, y, epochs=1, seed=seed, verbose=0)
    return model


@pytest.fixture(scope="session")
def lenet_a(fashion):
    return _trained_lenet(fashion, seed=1)


@pytest.fixture(scope="session")
def lenet_b(fashion):
    return _trained_lenet(fashion, seed=2)


@pytest.fixture(scope="session")
def calibration(fashion):
    x = fashion[0]
    return data.to_dataset(data.calibration_subset(x, 1000, seed=0), batch_size=250)


def with_batch_norm_statistics(model, seed, gamma=(0.5, 1.5), variance=(0.5, 1.5)):
    """Gives every BatchNormalization of ``model`` non-trivial γ ~ U(gamma), β and moving
    mean ~ N(0, 0.1), moving variance ~ U(variance), as training would, so that BN matters
    in the comparisons; returns the model. Deep models want ranges near 1 (activations
    then stay O(1) through 50 layers)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(*gamma, n))
            layer.beta.assign(rng.normal(0, 0.1, n))
            layer.moving_mean.assign(rng.normal(0, 0.1, n))
            layer.moving_variance.assign(rng.uniform(*variance, n))
    return model


def concatenating_model(seed: int) -> keras.Model:
    """Concatenate of two convs, a standalone BatchNorm and a depthwise conv reading it."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((28, 28, 1))
    a = keras.layers.Conv2D(4, 3, strides=2, activation="relu", name="a")(inputs)
    b = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="b")(a)
    x = keras.layers.Concatenate(name="cat")([a, b])
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation("relu", name="bn_relu")(x)
    x = keras.layers.DepthwiseConv2D(3, activation="relu", name="dw")(x)
    x = keras.layers.Conv2D(5, 1, activation="relu", name="c")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return with_batch_norm_statistics(
        keras.Model(inputs, keras.layers.Dense(10, name="fc")(x)), seed
    )


@pytest.fixture
def progress_lines():
    """mtz_tf's messages captured as the plain lines ``mtz_tf.progress.show`` prints (a
    StringIO); the logger is put back as it was afterwards."""
    from mtz_tf import progress

    stream = io.StringIO()
    handler = progress.show(logging.INFO, stream)
    yield stream
    progress.logger.removeHandler(handler)
    progress.logger.propagate = True
    progress.logger.setLevel(logging.NOTSET)


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


FLOAT32_TOLERANCE = 1e-4
"""Default of :func:`assert_close`: float32 results of the same maths computed two ways
(another kernel order, another CPU's oneDNN code path) differ by a few ulps of the
largest magnitude involved, accumulated over a network's depth; real defects show up as
differences of order 1e-2 to 1 of that scale."""


def assert_close(actual, expected, tol: float = FLOAT32_TOLERANCE, what: str = "") -> None:
    """Asserts max |actual - expected| <= tol * max(1, max |expected|).

    The tolerance scales with the magnitude of ``expected`` (logits of order 10 get ten
    times the slack of probabilities), never below ``tol`` in absolute terms, so that the
    few-ulp rounding differences between CPUs (oneDNN picks kernels per instruction set)
    pass while real defects, of order 1e-2 to 1 of the scale, fail. The default suits
    float32 model outputs and weights; float64 closed forms pass a tighter ``tol``
    explicitly (e.g. 1e-9). Arrays, tensors, and dicts or lists of them (multi-task
    outputs ``{task: logits}``) are compared leaf by leaf, each against its own scale, with
    the same keys, lengths and shapes required. A NaN or infinity in ``actual`` fails.
    ``what`` names the compared values in the failure message, which gives the largest
    difference, the scale and the allowed tolerance.
    """
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{what}: expected a dict, got {type(actual).__name__}"
        assert set(actual) == set(expected), f"{what}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_close(actual[key], expected[key], tol, f"{what}[{key!r}]")
        return
    if isinstance(expected, (list, tuple)) and expected and not np.isscalar(expected[0]):
        assert len(actual) == len(expected), f"{what}: {len(actual)} != {len(expected)} items"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, tol, f"{what}[{i}]")
        return
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what or 'values'}: shape {a.shape} != {e.shape}"
    if a.size == 0:
        return
    scale = max(1.0, float(np.max(np.abs(e))))
    difference = float(np.max(np.abs(a - e)))
    assert difference <= tol * scale, (
        f"{what or 'values'} differ by up to {difference:.3g}; allowed {tol:g} x scale "
        f"{scale:.3g} = {tol * scale:.3g}"
    )


class InterruptAtTraining(keras.callbacks.Callback):
    """Raises KeyboardInterrupt when the ``n``-th retraining of a zip begins (a simulated
    interruption, to test resuming from a checkpoint)."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.calls = n, 0

    def on_train_begin(self, logs=None):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt("simulated interruption")


class SubclassedModel(keras.Model):
    """A subclassed Keras model (layers wired in ``call``): what the graph readers refuse."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.head = keras.layers.Dense(4)

    def call(self, x):
        return self.head(self.hidden(x))


def killed_on_call(function, n: int, message: str):
    """``function`` wrapped to raise KeyboardInterrupt (a simulated kill) on its ``n``-th
    call instead of running; other calls go through."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise KeyboardInterrupt(message)
        return function(*args, **kwargs)

    return wrapper


def export_with_task_parity(zipped, out_dir: str, x) -> dict:
    """Exports ``zipped`` with a TFLite file per task (parity checked on ``x`` by the
    exporter), runs every task's TFLite file on ``x`` and checks it against the Keras
    model; returns the export result."""
    from mtz_tf import exporter

    result = exporter.export(zipped, out_dir, per_task_tflite=True, parity_data=x)
    expected = zipped(x)
    for task in expected:
        tflite = exporter.run_tflite(
            os.path.join(out_dir, f"model_{task}.tflite"), f"serve_{task}", x
        )
        assert_close(next(iter(tflite.values())), expected[task])
    return result

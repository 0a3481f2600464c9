"""A table of bad inputs across the library and the binaries.

Every row asserts the error type, that the message names the problem, and that the input
models and the user's files are unchanged afterwards.
"""

import dataclasses
import hashlib
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import SubclassedModel

import mtz_tf
from mtz_tf import data, io_utils
from mtz_tf.compress import ISTASGD, ista, merge_neurons

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mlp(seed, width=(16, 12), input_shape=(10,), activation="relu"):
    init = keras.initializers.GlorotUniform(seed=seed)
    inputs = keras.Input(input_shape)
    x = inputs
    for i, n in enumerate(width):
        x = keras.layers.Dense(n, activation=activation, kernel_initializer=init, name=f"h{i}")(x)
    return keras.Model(inputs, keras.layers.Dense(4, kernel_initializer=init, name="out")(x))


def _bn_net(seed):
    init = keras.initializers.GlorotUniform(seed=seed)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(6, 3, kernel_initializer=init, name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(3, kernel_initializer=init, name="out")(x))


@dataclasses.dataclass
class Context:
    a: keras.Model
    b: keras.Model
    other_shape: keras.Model
    nan_model: keras.Model
    deeper: keras.Model
    bn_net: keras.Model
    zipped: keras.Model
    x: np.ndarray
    y: np.ndarray
    files: str

    def calibration(self, tasks=("a", "b")):
        return {t: data.to_dataset(self.x, batch_size=16) for t in tasks}

    def retrain(self, tasks=("a", "b")):
        return mtz_tf.Retrain(
            {t: data.training_stream(self.x, self.y, 8) for t in tasks}, 1, verbose=0
        )

    def path(self, name):
        return os.path.join(self.files, name)

    def zip(self, **kwargs):
        kwargs.setdefault("calibration", self.calibration())
        kwargs.setdefault("models", {"a": self.a, "b": self.b})
        return mtz_tf.zip_models(verbose=0, **kwargs)


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 10)).astype("float32")
    y = rng.integers(0, 4, 48)
    a, b = _mlp(1), _mlp(2)
    nan_model = _mlp(3)
    kernel = nan_model.get_layer("h1").kernel
    kernel.assign(np.where(np.eye(*kernel.shape) > 0, np.nan, kernel.numpy()))
    zipped, _ = mtz_tf.zip_models(
        {"a": a, "b": b}, {t: data.to_dataset(x, batch_size=16) for t in "ab"}, verbose=0
    )
    files = str(tmp_path_factory.mktemp("user_files"))
    with open(os.path.join(files, "notes.txt"), "w") as f:
        f.write("the user's notes")
    io_utils.save_model(a, os.path.join(files, "a.keras"))
    for seed in (1, 2):
        io_utils.save_model(
            mtz_tf.models.lenet_300_100(seed=seed), os.path.join(files, f"l{seed}.keras")
        )
    mtz_tf.export(a, os.path.join(files, "deploy"), formats=("keras",))
    deeper = _mlp(4, width=(16, 12, 8))
    return Context(
        a, b, _mlp(5, input_shape=(11,)), nan_model, deeper, _bn_net(6), zipped, x, y, files
    )


def _built(model):
    model(np.zeros((1, 10), "float32"))
    return model


def _snapshot(context):
    weights = {
        name: [v.numpy().tobytes() for v in getattr(context, name).weights]
        for name in ("a", "b", "other_shape", "nan_model", "deeper", "bn_net", "zipped")
    }
    files = {}
    for root, _, names in os.walk(context.files):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, context.files)] = hashlib.sha256(f.read()).hexdigest()
    return weights, files


def _binary(script, *flags):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", script), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES=""),
    )
    if result.returncode == 0:
        return result
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    own = [line for line in result.stderr.splitlines() if line.startswith(script + ": error:")]
    assert len(own) == 1, result.stderr  # one clear line
    raise SystemExit(own[0])


ROWS = [
    # zip_models: the models
    ("zip models as a list", lambda c: c.zip(models=[c.a, c.b]), ValueError, "must be a dict"),
    (
        "zip one model",
        lambda c: c.zip(models={"a": c.a}, calibration=c.calibration("a")),
        ValueError,
        "at least two models",
    ),
    (
        "zip task name not an identifier",
        lambda c: c.zip(models={"a-1": c.a, "b": c.b}, calibration=c.calibration(("a-1", "b"))),
        ValueError,
        "Python identifiers",
    ),
    (
        "zip different input shapes",
        lambda c: c.zip(models={"a": c.a, "b": c.other_shape}),
        ValueError,
        "takes inputs of shape",
    ),
    (
        "zip NaN weights",
        lambda c: c.zip(models={"a": c.a, "b": c.nan_model}),
        ValueError,
        "NaN or infinite values in weight",
    ),
    (
        "zip different depths",
        lambda c: c.zip(models={"a": c.a, "b": c.deeper}),
        ValueError,
        "differ",
    ),
    (
        "zip unsupported layer",
        lambda c: c.zip(
            models={
                "a": c.a,
                "b": keras.Sequential(
                    [
                        keras.Input((10,)),
                        keras.layers.Dense(16),
                        keras.layers.LayerNormalization(),
                        keras.layers.Dense(4),
                    ]
                ),
            }
        ),
        ValueError,
        "LayerNormalization is not supported",
    ),
    (
        "zip a subclassed model",
        lambda c: c.zip(models={"a": c.a, "b": _built(SubclassedModel())}),
        TypeError,
        "subclassed keras.Model .* functional model",
    ),
    # zip_models: calibration and side data
    (
        "zip calibration of dicts",
        lambda c: c.zip(
            calibration={
                t: tf.data.Dataset.from_tensor_slices({"image": c.x, "label": c.y}).batch(8)
                for t in "ab"
            }
        ),
        TypeError,
        r"yields elements of structure .* \(inputs, labels\) tuples",
    ),
    (
        "zip NaN calibration inputs",
        lambda c: c.zip(
            calibration={"a": data.to_dataset(c.x), "b": data.to_dataset(c.x * np.nan)}
        ),
        ValueError,
        "calibration data of task 'b' yields NaN or infinite",
    ),
    (
        "zip evaluation without labels",
        lambda c: c.zip(evaluation={"a": data.to_dataset(c.x)}),
        ValueError,
        r"`evaluation` data of task 'a' must be .* \(inputs, integer labels\) pairs",
    ),
    (
        "zip evaluation with a label out of range",
        lambda c: c.zip(evaluation={"a": data.to_dataset(c.x, c.y + 3)}),
        ValueError,
        "`evaluation` data of task 'a' holds label [4-6], outside the task's 4 classes",
    ),
    (
        "zip retraining data with a label out of range",
        lambda c: c.zip(
            retrain=mtz_tf.Retrain(
                {"a": data.training_stream(c.x, c.y, 8), "b": data.training_stream(c.x, -c.y, 8)},
                2,
                verbose=0,
            )
        ),
        ValueError,
        "`Retrain.train` data of task 'b' holds labels outside the task's 4 classes",
    ),
    (
        "zip retraining data without labels",
        lambda c: c.zip(
            retrain=mtz_tf.Retrain({t: data.to_dataset(c.x) for t in "ab"}, 2, verbose=0)
        ),
        ValueError,
        "`Retrain.train` data of task 'a' must be",
    ),
    (
        "zip calibration missing a task",
        lambda c: c.zip(calibration=c.calibration("a")),
        ValueError,
        "one dataset per task",
    ),
    (
        "zip calibration as an array",
        lambda c: c.zip(calibration={"a": c.x, "b": c.x}),
        TypeError,
        "must be a batched tf.data.Dataset",
    ),
    (
        "zip calibration of another shape",
        lambda c: c.zip(calibration={t: data.to_dataset(c.x[:, :9]) for t in "ab"}),
        ValueError,
        "yields inputs of shape",
    ),
    (
        "zip retrain without task b",
        lambda c: c.zip(retrain=c.retrain(("a",))),
        ValueError,
        "`Retrain.train` must have one dataset per task",
    ),
    (
        "zip evaluation of an unknown task",
        lambda c: c.zip(evaluation={"z": data.to_dataset(c.x, c.y)}),
        ValueError,
        "names unknown task",
    ),
    # zip_models: share and options
    (
        "zip share above the width",
        lambda c: c.zip(share=[99, 1]),
        ValueError,
        "at most its width 16",
    ),
    ("zip share -1", lambda c: c.zip(share=[-1, 2]), ValueError, "must be non-negative"),
    ("zip share -0.5", lambda c: c.zip(share=-0.5), ValueError, "must be non-negative"),
    ("zip share fraction 1.5", lambda c: c.zip(share=1.5), ValueError, r"must be in \[0, 1\]"),
    (
        "zip share list too short",
        lambda c: c.zip(share=[1]),
        ValueError,
        "one entry per hidden layer",
    ),
    (
        "zip share names an unknown layer",
        lambda c: c.zip(share={"fc9": 3}),
        ValueError,
        "'fc9', which is not a hidden layer",
    ),
    ("zip share a bare int", lambda c: c.zip(share=3), TypeError, "single `share` must be a float"),
    (
        "zip matching unknown",
        lambda c: c.zip(matching="best"),
        ValueError,
        "`matching` must be one of",
    ),
    (
        "zip pairing unknown",
        lambda c: c.zip(pairing="l3"),
        ValueError,
        "`pairing` must be one of",
    ),
    (
        "zip hessian unknown",
        lambda c: c.zip(hessian="full"),
        ValueError,
        "`hessian` must be one of",
    ),
    (
        "zip batch_norm unknown",
        lambda c: c.zip(batch_norm="drop"),
        ValueError,
        "`batch_norm` must be one of",
    ),
    # zip_models: checkpoints
    (
        "zip checkpoint_dir is a file",
        lambda c: c.zip(checkpoint_dir=c.path("notes.txt")),
        FileExistsError,
        "exists and is not a directory",
    ),
    (
        "zip checkpoint_dir is someone's directory",
        lambda c: c.zip(checkpoint_dir=c.path("deploy")),
        ValueError,
        "is not an mtz_tf checkpoint",
    ),
    # add_task
    (
        "add_task with an existing name",
        lambda c: mtz_tf.add_task(c.zipped, "a", c.a, c.calibration(("a", "b")), verbose=0),
        ValueError,
        "must be a new Python identifier",
    ),
    (
        "add_task to a plain model",
        lambda c: mtz_tf.add_task(c.a, "c", c.b, c.calibration(("a", "b", "c")), verbose=0),
        TypeError,
        "must be a model returned by zip_models",
    ),
    (
        "add_task without the newcomer's calibration",
        lambda c: mtz_tf.add_task(c.zipped, "c", c.b, c.calibration(("a", "b")), verbose=0),
        ValueError,
        "one dataset per task",
    ),
    (
        "add_task with another depth",
        lambda c: mtz_tf.add_task(c.zipped, "c", c.deeper, c.calibration("abc"), verbose=0),
        ValueError,
        "architecture",
    ),
    (
        "add_task with another input shape",
        lambda c: mtz_tf.add_task(c.zipped, "c", c.other_shape, c.calibration("abc"), verbose=0),
        ValueError,
        r"for new task 'c' takes inputs of shape \(11,\), but the zipped model takes \(10,\)",
    ),
    (
        "add_task with another activation",
        lambda c: mtz_tf.add_task(
            c.zipped, "c", _mlp(7, activation="tanh"), c.calibration("abc"), verbose=0
        ),
        ValueError,
        "activation 'tanh' vs 'relu'",
    ),
    # export
    (
        "export over a file",
        lambda c: mtz_tf.export(c.a, c.path("notes.txt")),
        FileExistsError,
        "not a directory",
    ),
    (
        "export over an export without overwrite",
        lambda c: mtz_tf.export(c.a, c.path("deploy")),
        FileExistsError,
        "pass `overwrite=True`",
    ),
    (
        "export to an unknown format",
        lambda c: mtz_tf.export(c.a, c.path("new"), formats=("onnx",)),
        ValueError,
        "`formats` must be distinct names",
    ),
    (
        "export quantize unknown",
        lambda c: mtz_tf.export(c.a, c.path("new"), quantize="int4"),
        ValueError,
        "`quantize` must be one of",
    ),
    (
        "export int8 without representative data",
        lambda c: mtz_tf.export(c.a, c.path("new"), quantize="int8"),
        ValueError,
        "needs `representative_data`",
    ),
    (
        "export parity data of another shape",
        lambda c: mtz_tf.export(c.a, c.path("new"), parity_data=c.x[:, :3]),
        ValueError,
        "`parity_data` inputs must have shape",
    ),
    (
        "export a non-model",
        lambda c: mtz_tf.export("model.keras", c.path("new")),
        TypeError,
        "`model` must be a keras.Model",
    ),
    # Neuron Merging
    ("merge_neurons fraction 1.5", lambda c: merge_neurons(c.a, 1.5), ValueError, "prune_fraction"),
    (
        "merge_neurons unknown criterion",
        lambda c: merge_neurons(c.a, 0.5, criterion="l7"),
        ValueError,
        "`criterion` must be one of",
    ),
    (
        "merge_neurons names an unknown layer",
        lambda c: merge_neurons(c.a, {"fc9": 0.5}),
        ValueError,
        "fc9",
    ),
    (
        "merge_neurons on a non-model",
        lambda c: merge_neurons(c.x, 0.5),
        TypeError,
        "`model` must be a keras.Model",
    ),
    (
        "merge_neurons on a zipped model",
        lambda c: merge_neurons(c.zipped, 0.5),
        ValueError,
        "is a zipped multi-task model.*multi_head_model",
    ),
    # ISTA
    (
        "ISTASGD rho as a string",
        lambda c: ISTASGD({"bn1": 1.0}, rho="0.1"),
        TypeError,
        "`rho` must be a non-negative float. Received: rho='0.1'",
    ),
    (
        "ISTA removal without BatchNorm",
        lambda c: ista.remove_zero_channels(c.a),
        ValueError,
        "ISTA needs BatchNorm scales",
    ),
    (
        "ISTA absorption unknown",
        lambda c: ista.remove_zero_channels(c.bn_net, absorption="every"),
        ValueError,
        "`absorption` must be one of",
    ),
    (
        "ISTASGD negative rho",
        lambda c: ISTASGD({"bn1": 1.0}, rho=-1.0),
        ValueError,
        "`rho` must be non-negative",
    ),
    (
        "ISTASGD lambdas not a dict",
        lambda c: ISTASGD([1.0], rho=0.1),
        TypeError,
        "`lambdas` must be a dict",
    ),
    (
        "ISTA rescaling alpha 0",
        lambda c: ista.rescale_gamma(c.bn_net, 0.0),
        ValueError,
        "`alpha` must be a positive",
    ),
    # binaries
    (
        "zip.py with a missing model",
        lambda c: _binary(
            "zip.py",
            f"--models={c.path('none.keras')},{c.path('a.keras')}",
            "--tasks=x,y",
            f"--output={c.path('z.keras')}",
        ),
        SystemExit,
        "No model file",
    ),
    (
        "zip.py with a file as checkpoint_dir",
        lambda c: _binary(
            "zip.py",
            f"--models={c.path('l1.keras')},{c.path('l2.keras')}",
            "--calibration_size=64",
            f"--checkpoint_dir={c.path('notes.txt')}",
            f"--output={c.path('z.keras')}",
        ),
        SystemExit,
        "exists and is not a directory",
    ),
    (
        "zip.py with repeated task names",
        lambda c: _binary(
            "zip.py",
            f"--models={c.path('l1.keras')},{c.path('l2.keras')}",
            "--tasks=a,a",
            f"--output={c.path('z.keras')}",
        ),
        SystemExit,
        "--tasks repeats the name",
    ),
    (
        "export.py with a missing model",
        lambda c: _binary(
            "export.py", f"--model={c.path('none.keras')}", f"--output_dir={c.path('out')}"
        ),
        SystemExit,
        "none.keras",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "pattern"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_bad_input_is_refused_and_destroys_nothing(context, call, error, pattern):
    before = _snapshot(context)
    with pytest.raises(error, match=pattern):
        call(context)
    assert _snapshot(context) == before


def test_the_table_is_large_and_covers_every_entry_point():
    assert len(ROWS) >= 30
    for entry in ("zip ", "add_task", "export", "merge_neurons", "ISTA", ".py"):
        assert any(entry in row[0] for row in ROWS), entry


def test_a_zipped_model_loaded_without_mtz_tf_says_to_import_it(context, tmp_path):
    path = str(tmp_path / "zipped.keras")
    io_utils.save_model(context.zipped, path)
    code = f"import keras; keras.saving.load_model({path!r})"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert result.returncode != 0
    assert "import mtz_tf before keras.saving.load_model" in result.stderr

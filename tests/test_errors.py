"""User errors that must name the problem (not surface as a Keras/TensorFlow internal error).

Each test pins the error type and a fragment of the message, and checks that the models
handed in are unchanged afterwards.
"""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import SubclassedModel

import mtz_tf
from mtz_tf import cli, data, graph
from mtz_tf.compress import ISTASGD, merge_neurons

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def _mlp(seed, input_shape=(10,), width=(16, 12)):
    init = keras.initializers.GlorotUniform(seed=seed)
    inputs = keras.Input(input_shape)
    x = inputs
    for i, n in enumerate(width):
        x = keras.layers.Dense(n, activation="relu", kernel_initializer=init, name=f"h{i}")(x)
    return keras.Model(inputs, keras.layers.Dense(4, kernel_initializer=init, name="out")(x))


def _residual(seed):
    init = keras.initializers.GlorotUniform(seed=seed)
    inputs = keras.Input((10,))
    h = keras.layers.Dense(8, activation="relu", kernel_initializer=init, name="h0")(inputs)
    r = keras.layers.Dense(8, activation="relu", kernel_initializer=init, name="h1")(h)
    x = keras.layers.Add(name="add")([h, r])
    return keras.Model(inputs, keras.layers.Dense(4, kernel_initializer=init, name="out")(x))


class _Setup:
    def __init__(self):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((48, 10)).astype("float32")
        self.y = rng.integers(0, 4, 48)
        self.a, self.b = _mlp(1), _mlp(2)
        self.zipped, _ = mtz_tf.zip_models(
            {"a": self.a, "b": self.b}, self.calibration(), verbose=0
        )

    def calibration(self, tasks="ab"):
        return {t: data.to_dataset(self.x, batch_size=16) for t in tasks}

    def zip(self, **kwargs):
        kwargs.setdefault("calibration", self.calibration())
        return mtz_tf.zip_models({"a": self.a, "b": self.b}, verbose=0, **kwargs)

    def retrain(self, labels_b, labels_a=None):
        labels_a = self.y if labels_a is None else labels_a
        return mtz_tf.Retrain(
            {
                "a": data.training_stream(self.x, labels_a, 8),
                "b": data.training_stream(self.x, labels_b, 8),
            },
            2,
            verbose=0,
        )


@pytest.fixture(scope="module")
def setup():
    return _Setup()


def _weights(*models):
    return [[v.numpy().copy() for v in model.weights] for model in models]


@pytest.fixture
def unchanged(setup):
    """Asserts after the test that the fixture's models kept their weights."""
    models = (setup.a, setup.b, setup.zipped)
    before = _weights(*models)
    yield
    for old, new in zip(before, _weights(*models)):
        assert len(old) == len(new)
        for u, v in zip(old, new):
            np.testing.assert_array_equal(u, v)


def _subclassed():
    model = SubclassedModel()
    model(np.zeros((1, 10), "float32"))
    return model


# 1. Subclassed models.


def test_read_plan_refuses_a_subclassed_model():
    model = _subclassed()
    before = _weights(model)
    with pytest.raises(TypeError, match=r"subclassed keras.Model .*`call\(\)`.*functional model"):
        graph.read_plan(model)
    with pytest.raises(TypeError, match="subclassed keras.Model"):
        graph.read_plan(SubclassedModel())  # never called: no weights, no inputs
    for u, v in zip(before[0], _weights(model)[0]):
        np.testing.assert_array_equal(u, v)


def test_zip_models_and_add_task_refuse_a_subclassed_model(setup, unchanged):
    model = _subclassed()
    before = _weights(model)
    with pytest.raises(
        TypeError, match=r"Model '\w+' is a subclassed keras.Model \(SubclassedModel\)"
    ):
        mtz_tf.zip_models({"a": setup.a, "b": model}, setup.calibration(), verbose=0)
    with pytest.raises(TypeError, match="is a subclassed keras.Model.*keras.Sequential"):
        mtz_tf.add_task(setup.zipped, "c", model, setup.calibration("abc"), verbose=0)
    with pytest.raises(TypeError, match="`zipped` must be a model returned by zip_models"):
        mtz_tf.add_task(model, "c", setup.a, setup.calibration("abc"), verbose=0)
    for u, v in zip(before[0], _weights(model)[0]):
        np.testing.assert_array_equal(u, v)


# 2. Calibration datasets of dicts.


def test_calibration_of_dicts_says_which_structures_are_accepted(setup, unchanged):
    dicts = tf.data.Dataset.from_tensor_slices({"image": setup.x, "label": setup.y}).batch(8)
    with pytest.raises(
        TypeError,
        match=r"calibration data for task 'b' yields elements of structure \{'image': .*"
        r"expected batches of inputs, or \(inputs, labels\) tuples",
    ):
        setup.zip(calibration={"a": data.to_dataset(setup.x), "b": dicts})
    with pytest.raises(TypeError, match=r"\(inputs, labels\) tuples"):
        mtz_tf.add_task(setup.zipped, "c", _mlp(3), {**setup.calibration(), "c": dicts}, verbose=0)


# 3. NaN or infinite calibration inputs.


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_calibration_names_the_task(setup, unchanged, bad):
    x = setup.x.copy()
    x[5, 3] = bad
    with pytest.raises(ValueError, match="calibration data of task 'b' yields NaN or infinite"):
        setup.zip(calibration={"a": data.to_dataset(setup.x), "b": data.to_dataset(x)})


def test_non_finite_calibration_of_a_residual_graph_names_the_task(setup):
    models = {"a": _residual(1), "b": _residual(2)}
    before = _weights(*models.values())
    x = setup.x.copy()
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="calibration data of task 'a' yields NaN or infinite"):
        mtz_tf.zip_models(
            models, {"a": data.to_dataset(x), "b": data.to_dataset(setup.x)}, verbose=0
        )
    for old, new in zip(before, _weights(*models.values())):
        for u, v in zip(old, new):
            np.testing.assert_array_equal(u, v)


# 4. Negative share.


@pytest.mark.parametrize("share", [[-1, 2], {"h1": -1}, {0: -0.5}, -0.5, [0.5, -0.25]], ids=str)
def test_negative_share_says_it_must_be_non_negative(setup, unchanged, share):
    with pytest.raises(
        ValueError,
        match=r"`share` for layer 'h[01]' must be non-negative: a count from 0 to 1[26] or a "
        r"fraction from 0.0 to 1.0. Received: share=-",
    ):
        setup.zip(share=share)


# 5. Evaluation and retraining data: labels present, of a usable form, in range.


def test_evaluation_without_labels_is_refused_before_work(setup, unchanged):
    with pytest.raises(
        ValueError, match=r"`evaluation` data of task 'a' must be .*\(inputs, integer labels\)"
    ):
        setup.zip(evaluation={"a": data.to_dataset(setup.x)})
    with pytest.raises(ValueError, match="`evaluation` data of task 'a' must be"):
        mtz_tf.retrain.task_accuracies(setup.zipped, {"a": data.to_dataset(setup.x)})


def test_retraining_data_without_labels_is_refused_before_work(setup, unchanged):
    unlabelled = mtz_tf.Retrain({t: data.to_dataset(setup.x) for t in "ab"}, 2, verbose=0)
    with pytest.raises(ValueError, match="`Retrain.train` data of task 'a' must be"):
        setup.zip(retrain=unlabelled)


def test_evaluation_label_out_of_range_names_task_value_and_range(setup, unchanged):
    y = setup.y.copy()
    y[7] = 4
    with pytest.raises(
        ValueError,
        match=r"`evaluation` data of task 'b' holds label 4, outside the task's 4 classes "
        r"\(labels must be integers in \[0, 3\]\)",
    ):
        setup.zip(
            evaluation={"a": data.to_dataset(setup.x, setup.y), "b": data.to_dataset(setup.x, y)}
        )
    for bad in (-5, 0.5, np.nan):
        y = setup.y.astype("float32" if isinstance(bad, float) else "int64")
        y[7] = bad
        with pytest.raises(ValueError, match=rf"data of task 'a' holds label {y[7]}, outside"):
            mtz_tf.retrain.task_accuracies(setup.zipped, {"a": data.to_dataset(setup.x, y)})


def test_retraining_label_out_of_range_names_task_value_and_range(setup, unchanged):
    y = setup.y.copy()
    y[::5] = -3
    with pytest.raises(
        ValueError,
        match=r"`Retrain.train` data of task 'b' holds labels outside the task's 4 classes: "
        r"label -3 was read \(labels must be integers in \[0, 3\]\)",
    ):
        setup.zip(retrain=setup.retrain(y))


def test_evaluation_takes_column_and_one_hot_labels_of_the_head_width(setup, unchanged):
    def accuracy(labels):
        evaluation = {"a": data.to_dataset(setup.x, labels, batch_size=16)}
        return mtz_tf.retrain.task_accuracies(setup.zipped, evaluation)["a"]

    logits = setup.zipped(setup.x)["a"].numpy()
    expected = float(np.mean(np.argmax(logits, -1) == setup.y))
    assert accuracy(setup.y) == pytest.approx(expected)
    assert accuracy(setup.y[:, None]) == pytest.approx(expected)  # was compared as (n, n)
    assert accuracy(setup.y.astype("float32")) == pytest.approx(expected)
    assert accuracy(np.eye(4, dtype="float32")[setup.y]) == pytest.approx(expected)
    narrow = np.eye(3, dtype="float32")[setup.y % 3]
    with pytest.raises(
        ValueError,
        match=r"`evaluation` data of task 'a' has labels of shape \(None, 3\); expected class "
        r"indices of shape \(batch,\) or one-hot rows of shape \(batch, 4\)",
    ):
        accuracy(narrow)


def test_retraining_with_one_hot_labels_and_the_default_loss_is_refused_before_work(
    setup, unchanged
):
    one_hot = np.eye(4, dtype="float32")[setup.y]
    with pytest.raises(
        ValueError,
        match="`Retrain.train` data of task 'b' has one-hot labels.*CategoricalCrossentropy",
    ):
        setup.zip(retrain=setup.retrain(one_hot))


def test_labels_that_are_not_numbers_are_refused_before_work(setup, unchanged):
    with pytest.raises(TypeError, match="`evaluation` data of task 'a' has labels of dtype"):
        setup.zip(evaluation={"a": data.to_dataset(setup.x, setup.y.astype(str))})


# 6. add_task with a model of another input shape.


def test_add_task_with_another_input_shape_blames_the_new_model(setup, unchanged):
    other = _mlp(5, input_shape=(11,))
    before = _weights(other)
    calibration = {
        **setup.calibration(),
        "c": data.to_dataset(np.zeros((8, 11), "float32")),
    }
    with pytest.raises(
        ValueError,
        match=r"new task 'c' takes inputs of shape \(11,\), but the zipped model takes \(10,\)",
    ):
        mtz_tf.add_task(setup.zipped, "c", other, calibration, verbose=0)
    for u, v in zip(before[0], _weights(other)[0]):
        np.testing.assert_array_equal(u, v)


# 7. ISTASGD argument types.


_ISTA_CASES = [
    (dict(rho="0.1"), TypeError, "`rho` must be a non-negative float. Received: rho='0.1'"),
    (dict(rho=None), TypeError, "`rho` must be a non-negative float"),
    (dict(rho=True), TypeError, "`rho` must be a non-negative float"),
    (dict(rho=-0.1), ValueError, "`rho` must be non-negative and finite. Received: rho=-0.1"),
    (dict(rho=float("inf")), ValueError, "`rho` must be non-negative and finite"),
    (dict(momentum="0.9"), TypeError, "`momentum` must be a float in [0, 1). Received:"),
    (dict(momentum=1.5), ValueError, "`momentum` must be in [0, 1). Received: momentum=1.5"),
    (dict(learning_rate="0.01"), TypeError, "`learning_rate` must be a positive float, a"),
    (dict(learning_rate=None), TypeError, "`learning_rate` must be a positive float, a"),
    (dict(learning_rate=-0.01), ValueError, "`learning_rate` must be a positive float."),
    (dict(nesterov="yes"), TypeError, "`nesterov` must be a bool. Received: nesterov='yes'"),
    (dict(lambdas={"bn1": "1"}), TypeError, "`lambdas` values must be floats"),
    (dict(lambdas={"bn1": float("inf")}), ValueError, "`lambdas` must be finite"),
]


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    _ISTA_CASES,
    ids=[",".join(f"{k}={v!r}" for k, v in case[0].items()) for case in _ISTA_CASES],
)
def test_istasgd_validates_its_numeric_arguments(kwargs, error, fragment):
    kwargs = {"lambdas": {"bn1": 1.0}, "rho": 1e-3, **kwargs}
    with pytest.raises(error, match=re.escape(fragment)):
        ISTASGD(**kwargs)


def test_istasgd_still_takes_numpy_numbers_and_a_learning_rate_schedule():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    optimizer = ISTASGD(
        {"bn1": np.float32(2.0)}, rho=np.float32(1e-3), learning_rate=schedule, momentum=0
    )
    assert optimizer.rho == pytest.approx(1e-3) and optimizer.lambdas == {"bn1": 2.0}
    clone = ISTASGD.from_config(optimizer.get_config())
    assert clone.rho == optimizer.rho


# 8. Loading a zipped model without importing mtz_tf.


def test_a_zipped_model_loaded_without_mtz_tf_says_to_import_it(setup, processes):
    result = processes["load without mtz_tf"]
    assert result.returncode != 0
    assert "Could not locate class 'ZippedDense'" in result.stderr
    assert "import mtz_tf before keras.saving.load_model" in result.stderr
    # With mtz_tf imported the note is invisible: the model loads and computes the same.
    restored = mtz_tf.io_utils.load_model(processes.zipped_path)
    expected, actual = setup.zipped(setup.x), restored(setup.x)
    for task in expected:
        np.testing.assert_allclose(actual[task], expected[task], rtol=1e-6, atol=1e-6)


# 9. Neuron Merging on a zipped model.


def test_merge_neurons_on_a_zipped_model_points_at_multi_head_model(setup, unchanged):
    with pytest.raises(
        ValueError, match=r"is a zipped multi-task model.*mtz_tf.zipped_network.multi_head_model"
    ):
        merge_neurons(setup.zipped, 0.5)


# 10. The binaries: one line on stderr, exit status 2.


def _one_error_line(result, script):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{script}: error: ")]
    assert len(lines) == 1, result.stderr
    assert not [line for line in result.stderr.splitlines() if "FATAL" in line], result.stderr
    return lines[0]


def test_zip_binary_reports_repeated_task_names_on_one_line(processes):
    line = _one_error_line(processes["repeated tasks"], "zip.py")
    assert "--tasks repeats the name(s) ['a']; give each task its own name." in line


def test_zip_binary_reports_a_missing_model_file_on_one_line(processes):
    line = _one_error_line(processes["missing model"], "zip.py")
    assert f"No model file at {processes.missing!r}" in line
    assert not os.listdir(processes.output_dir)  # nothing written


def test_a_bad_flag_is_reported_on_one_line(monkeypatch, capsys):
    # In-process (a binary costs ~10 s of TensorFlow import): cli.run parses every binary's
    # flags with cli._parse_flags, which would otherwise print absl's two-line FATAL error.
    monkeypatch.setattr(sys, "argv", ["zip.py"])
    with pytest.raises(SystemExit) as exit_info:
        cli._parse_flags(["zip.py", "--no_such_flag=1"])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr == (
        "zip.py: error: Unknown command line flag 'no_such_flag' (--helpshort or --helpfull "
        "lists the flags)\n"
    )


class _Processes(dict):
    """{case: finished subprocess}, run concurrently; paths of the files they used."""

    def __init__(self, launched, **paths):
        super().__init__()
        self.launched = launched
        self.__dict__.update(paths)

    def __missing__(self, case):
        process = self.launched[case]
        stdout, stderr = process.communicate(timeout=300)
        self[case] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        return self[case]


@pytest.fixture(scope="module", autouse=True)
def processes(setup, tmp_path_factory):
    """Starts every subprocess of the module at once: each spends most of its time importing
    TensorFlow, so together they take about as long as one."""
    files = tmp_path_factory.mktemp("binaries")
    zipped_path = str(files / "zipped.keras")
    mtz_tf.io_utils.save_model(setup.zipped, zipped_path)
    output_dir = str(files / "out")
    os.mkdir(output_dir)
    missing = str(files / "missing.keras")
    output = f"--output={os.path.join(output_dir, 'z.keras')}"
    zip_py = [sys.executable, os.path.join(ROOT, "experiments", "zip.py")]
    commands = {
        "load without mtz_tf": [
            sys.executable,
            "-c",
            f"import keras; keras.saving.load_model({zipped_path!r})",
        ],
        "repeated tasks": [*zip_py, "--models=a.keras,b.keras", "--tasks=a,a", output],
        "missing model": [*zip_py, f"--models={missing},{missing}", output],
    }
    launched = {
        case: subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_ENV
        )
        for case, command in commands.items()
    }
    yield _Processes(launched, zipped_path=zipped_path, missing=missing, output_dir=output_dir)
    for process in launched.values():
        if process.poll() is None:
            process.kill()
            process.communicate()

"""export and deploy_report on a zipped LeNet-300-100 pair (real Fashion-MNIST).

SavedModel writes and TFLite conversions take seconds each, so the exports shared by
several tests are module-scoped fixtures.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import FLOAT32_TOLERANCE, assert_close, export_with_task_parity

import mtz_tf
from mtz_tf import deploy_report
from mtz_tf import exporter as export_lib

TASKS = ("a", "b")
# The quantizer calibrates through tf.lite.Interpreter, which warns that it is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")


@pytest.fixture(scope="module")
def zipped(lenet_a, lenet_b, calibration):
    # share=0.7: partly shared hidden layers, so the second hidden layer has cross weights
    # (shared neurons fed by task-specific inputs) and every output path differs per task.
    model, _ = mtz_tf.zip_models(
        {"a": lenet_a, "b": lenet_b}, {"a": calibration, "b": calibration}, share=0.7, verbose=0
    )
    return model


@pytest.fixture(scope="module")
def sample(fashion):
    return fashion[2][:200], fashion[3][:200]


@pytest.fixture(scope="module")
def exported(zipped, sample, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("export") / "zipped")
    result = export_lib.export(zipped, out_dir, per_task_tflite=True, parity_data=sample)
    return out_dir, result


def _leftovers(parent, out_name):
    return [name for name in os.listdir(parent) if name.startswith(f".{out_name}.")]


def test_every_format_round_trips(zipped, sample, exported):
    out_dir, result = exported
    x = sample[0][:50]
    expected = zipped(x)
    assert sorted(os.listdir(out_dir)) == [
        "export.json",
        "model.keras",
        "model.tflite",
        "model_a.tflite",
        "model_b.tflite",
        "saved_model",
    ]
    restored = keras.saving.load_model(os.path.join(out_dir, "model.keras"))
    for task in TASKS:
        np.testing.assert_array_equal(restored(x)[task], expected[task])
    serve = tf.saved_model.load(os.path.join(out_dir, "saved_model")).signatures["serve"]
    outputs = serve(input=tf.constant(x))
    assert set(outputs) == set(TASKS)
    interpreter = export_lib.tflite_interpreter(os.path.join(out_dir, "model.tflite"))
    tflite = interpreter.get_signature_runner("serve")(input=x)
    for task in TASKS:
        assert_close(outputs[task], expected[task])
        assert_close(tflite[task], expected[task])
    # The result is JSON, the manifest repeats it, and sizes are the files' sizes.
    with open(os.path.join(out_dir, "export.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert result["tasks"] == list(TASKS)
    for name in ("keras", "tflite", "tflite_a", "tflite_b"):
        artifact = result["artifacts"][name]
        assert artifact["bytes"] == os.path.getsize(artifact["path"])
    assert result["parity_samples"] == 200


def test_parity_figures_cover_every_artifact_and_task(zipped, sample, exported):
    _, result = exported
    expected_keys = {
        "keras": set(TASKS),
        "saved_model/serve": set(TASKS),
        "saved_model/serve_a": {"a"},
        "saved_model/serve_b": {"b"},
        "tflite": set(TASKS),
        "tflite_a": {"a"},
        "tflite_b": {"b"},
    }
    assert {k: set(v) for k, v in result["parity"].items()} == expected_keys
    scale = max(1.0, max(float(np.abs(v).max()) for v in zipped(sample[0]).values()))
    allowed = FLOAT32_TOLERANCE * scale  # the exporter's own rule, max |diff| <= tol * scale
    assert all(0 <= d <= allowed for v in result["parity"].values() for d in v.values())
    assert all(v == 0.0 for v in result["parity"]["keras"].values())


def test_serve_task_endpoints_give_that_task_only(zipped, sample, exported):
    out_dir, _ = exported
    x = sample[0][:50]
    expected = zipped(x)
    loaded = tf.saved_model.load(os.path.join(out_dir, "saved_model"))
    assert {"serve", "serve_a", "serve_b"} <= set(loaded.signatures)
    for task in TASKS:
        outputs = loaded.signatures[f"serve_{task}"](input=tf.constant(x))
        assert list(outputs) == [task]
        assert_close(outputs[task], expected[task])
        path = os.path.join(out_dir, f"model_{task}.tflite")
        interpreter = export_lib.tflite_interpreter(path)
        assert list(interpreter.get_signature_list()) == [f"serve_{task}"]
        tflite = interpreter.get_signature_runner(f"serve_{task}")(input=x)
        assert list(tflite) == [task]
        assert_close(tflite[task], expected[task])


def test_task_function_reads_only_its_tasks_weights(zipped):
    spec = tf.TensorSpec([None, 28, 28, 1], tf.float32)
    for task, other in (("a", "b"), ("b", "a")):
        forward = export_lib.task_functions(zipped)[task]
        concrete = tf.function(forward).get_concrete_function(spec)
        names = [v.name.split("/")[-1] for v in concrete.variables]
        assert any(n.startswith(f"{task}_kernel") for n in names)
        assert not any(n.startswith(f"{other}_") for n in names), names


def test_per_task_tflite_is_smaller_than_the_multi_task_one(exported):
    _, result = exported
    sizes = {k: v["bytes"] for k, v in result["artifacts"].items()}
    assert sizes["tflite_a"] < sizes["tflite"]
    assert sizes["tflite_b"] < sizes["tflite"]


def test_multi_head_conv_model_without_zipped_layers(tmp_path):
    # A shared conv trunk with one head per task: serve_<task> is the functional sub-model
    # (only that head's layers), and every format round-trips.
    inputs = keras.Input((12, 12, 1))
    trunk = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    trunk = keras.layers.Flatten()(keras.layers.MaxPooling2D()(trunk))
    outputs = {"left": keras.layers.Dense(3)(trunk), "right": keras.layers.Dense(5)(trunk)}
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(1).standard_normal((16, 12, 12, 1)).astype("float32")
    result = export_lib.export(model, str(tmp_path / "heads"), per_task_tflite=True, parity_data=x)
    assert set(result["parity"]) == {
        "keras",
        "saved_model/serve",
        "saved_model/serve_left",
        "saved_model/serve_right",
        "tflite",
        "tflite_left",
        "tflite_right",
    }
    loaded = tf.saved_model.load(result["artifacts"]["saved_model"]["path"])
    right = loaded.signatures["serve_right"](input=tf.constant(x))
    assert list(right) == ["right"] and right["right"].shape == (16, 5)


def test_plain_single_output_model_exports(lenet_a, sample, tmp_path):
    out_dir = str(tmp_path / "plain")
    result = export_lib.export(lenet_a, out_dir, formats=("keras", "tflite"))
    assert result["tasks"] == ["output"]
    assert set(result["parity"]) == {"keras", "tflite"}
    assert not os.path.exists(os.path.join(out_dir, "saved_model"))  # Scratch copy removed.
    runner = export_lib.tflite_interpreter(result["artifacts"]["tflite"]["path"])
    outputs = runner.get_signature_runner("serve")(input=sample[0][:10])
    assert_close(outputs["output"], lenet_a(sample[0][:10]))


def test_non_empty_out_dir_needs_overwrite(zipped, tmp_path):
    out_dir = tmp_path / "taken"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_lib.export(zipped, str(out_dir), formats=("keras",))
    assert os.listdir(out_dir) == ["keep.txt"]
    result = export_lib.export(zipped, str(out_dir), formats=("keras",), overwrite=True)
    assert sorted(os.listdir(out_dir)) == ["export.json", "model.keras"]
    assert result["out_dir"] == str(out_dir)
    assert _leftovers(tmp_path, "taken") == []
    # An empty existing directory is fine without `overwrite`.
    (tmp_path / "empty").mkdir()
    export_lib.export(zipped, str(tmp_path / "empty"), formats=("keras",))
    assert "model.keras" in os.listdir(tmp_path / "empty")


def _raise(*args, **kwargs):
    raise RuntimeError("converter exploded")


def test_failed_conversion_leaves_nothing_behind(zipped, tmp_path, monkeypatch):
    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_saved_model", _raise)
    with pytest.raises(RuntimeError, match="converter exploded"):
        export_lib.export(zipped, str(tmp_path / "new"))
    assert os.listdir(tmp_path) == []
    # With `overwrite`, a failure keeps the previous export as it was.
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.keras").write_text("previous export")
    with pytest.raises(RuntimeError, match="converter exploded"):
        export_lib.export(zipped, str(old), overwrite=True)
    assert os.listdir(old) == ["model.keras"]
    assert (old / "model.keras").read_text() == "previous export"
    assert _leftovers(tmp_path, "old") == [] and _leftovers(tmp_path, "new") == []


def test_parity_mismatch_fails_loudly_and_writes_nothing(zipped, tmp_path, monkeypatch):
    real = export_lib.run_tflite

    def off_by_a_bit(path, signature, x):
        outputs = real(path, signature, x)
        outputs["b"] = outputs["b"] + 1e-2
        return outputs

    monkeypatch.setattr(export_lib, "run_tflite", off_by_a_bit)
    with pytest.raises(export_lib.ParityError, match=r"'model.tflite', task 'b'.*0\.01"):
        export_lib.export(zipped, str(tmp_path / "out"), formats=("tflite",))
    assert os.listdir(tmp_path) == []


def test_int8_export_reports_accuracy_per_task(zipped, fashion, tmp_path):
    x_train, _, x_test, y_test = fashion
    labels = {"a": y_test[:500], "b": y_test[:500]}
    result = export_lib.export(
        zipped,
        str(tmp_path / "int8"),
        formats=("tflite",),
        quantize="int8",
        representative_data=x_train[:200],
        parity_data=(x_test[:500], labels),
    )
    assert result["parity"] == {}
    figures = result["quantized"]["tflite"]
    logits = zipped(x_test[:500])
    for task in TASKS:
        keras_accuracy = float(np.mean(np.argmax(logits[task], -1) == y_test[:500]))
        assert figures[task]["keras_accuracy"] == pytest.approx(keras_accuracy)
        assert figures[task]["accuracy"] > 0.6  # One epoch of training gives about 0.8.
        assert abs(figures[task]["accuracy"] - keras_accuracy) < 0.03
        assert figures[task]["top1_agreement"] > 0.95
    # int8 weights: about a quarter of float32's 4 bytes per parameter.
    assert result["artifacts"]["tflite"]["bytes"] < 0.35 * 4 * zipped.count_params()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"formats": ("onnx",)}, "`formats` must be"),
        ({"formats": ()}, "`formats` must be"),
        ({"quantize": "int4"}, "`quantize` must be one of"),
        ({"formats": ("keras",), "quantize": "dynamic"}, "applies to TFLite only"),
        ({"quantize": "int8"}, "needs `representative_data`"),
        ({"parity_data": np.zeros((4, 3))}, "`parity_data` inputs must have shape"),
        ({"tolerance": -1.0}, "`tolerance` must be"),
    ],
)
def test_invalid_arguments(zipped, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export_lib.export(zipped, str(tmp_path / "out"), **kwargs)
    assert os.listdir(tmp_path) == []


def test_models_export_cannot_handle(tmp_path):
    a, b = keras.Input((3,)), keras.Input((3,))
    two_inputs = keras.Model([a, b], keras.layers.Add()([a, b]))
    with pytest.raises(ValueError, match="has 2 inputs"):
        export_lib.export(two_inputs, str(tmp_path / "x"))
    list_outputs = keras.Model(a, [keras.layers.Dense(2)(a), keras.layers.Dense(3)(a)])
    with pytest.raises(ValueError, match="outputs as a list"):
        export_lib.export(list_outputs, str(tmp_path / "x"))


def test_size_speed_report(zipped, lenet_a, lenet_b, sample, tmp_path):
    report = deploy_report.size_speed_report(
        zipped,
        {"a": lenet_a, "b": lenet_b},
        str(tmp_path),
        sample_inputs=sample,
        formats=("keras", "tflite"),
        runs=20,
        warmup=2,
    )
    assert sorted(os.listdir(tmp_path)) == ["separate_a", "separate_b", "zipped"]
    params = report.parameters
    assert params["separate"] == lenet_a.count_params() + lenet_b.count_params()
    # File sizes follow the parameter counts (float32 weights dominate both files).
    param_ratio = params["zipped"] / params["separate"]
    assert param_ratio < 0.9
    for fmt in ("keras", "tflite"):
        assert report.size_ratio(fmt) == pytest.approx(param_ratio, abs=0.03)
        each = report.sizes[fmt]["each"]
        assert report.sizes[fmt]["separate"] == each["a"] + each["b"]
    assert set(report.latency_ms) == {"tflite", "keras"}
    for timing in report.latency_ms.values():
        assert 0 < timing["zipped"] < 1e3 and 0 < timing["separate"] < 1e3
    markdown = report.to_markdown()
    assert "| TFLite file (float32) |" in markdown and "latency, TFLite interpreter" in markdown
    assert "| latency, SavedModel" not in markdown  # Not exported, so not measured.
    json.dumps(report.to_dict())


def test_deployment_report_replaces_its_directory_only_with_overwrite(
    zipped, lenet_a, lenet_b, tmp_path
):
    out_dir = tmp_path / "deploy"
    out_dir.mkdir()
    (out_dir / "stale.txt").write_text("from an earlier run")
    separate = {"a": lenet_a, "b": lenet_b}
    options = dict(formats=("keras",), runs=3, warmup=1)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        deploy_report.deployment_report(zipped, separate, str(out_dir), **options)
    assert os.listdir(out_dir) == ["stale.txt"]
    markdown = deploy_report.deployment_report(
        zipped, separate, str(out_dir), overwrite=True, **options
    )
    assert sorted(os.listdir(out_dir)) == [
        "deployment_report.json",
        "deployment_report.md",
        "separate_a",
        "separate_b",
        "zipped",
    ]
    assert (out_dir / "deployment_report.md").read_text() == markdown
    assert "| .keras file |" in markdown and "| TFLite file" not in markdown
    saved = json.loads((out_dir / "deployment_report.json").read_text())
    assert saved["sizes"]["keras"]["separate"] == sum(saved["sizes"]["keras"]["each"].values())
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_task_model_fallback_endpoints_match(zipped, sample, tmp_path, monkeypatch):
    # A zipped model export cannot walk as a chain gets serve_<task> from
    # zipped_network.task_model (copies of the task's weights); parity holds all the same.
    monkeypatch.setattr(export_lib, "_task_chain", lambda model, task: None)
    functions = export_lib.task_functions(zipped)
    assert all(isinstance(f, keras.Model) for f in functions.values())
    result = export_lib.export(
        zipped, str(tmp_path / "fallback"), formats=("saved_model",), parity_data=sample[0][:50]
    )
    scale = max(1.0, float(np.abs(zipped(sample[0][:50])["a"]).max()))
    assert max(result["parity"]["saved_model/serve_a"].values()) <= FLOAT32_TOLERANCE * scale


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_task_functions_match_the_zipped_model(lenet_a, lenet_b, calibration, sample, share):
    # Nothing shared (every layer task-specific) and everything shared (one tensor through
    # the hidden layers); share=0.7 is covered by the exports above.
    zipped, _ = mtz_tf.zip_models(
        {"a": lenet_a, "b": lenet_b}, {"a": calibration, "b": calibration}, share=share, verbose=0
    )
    x = sample[0][:20]
    expected = zipped(x)
    for task, forward in export_lib.task_functions(zipped).items():
        assert not isinstance(forward, keras.Model)  # The weight-sharing chain walk.
        assert_close(forward(tf.constant(x)), expected[task])


@pytest.mark.slow
def test_conv_zipped_model_with_batch_norm_round_trips(fashion, tmp_path):
    # Two VGG-16 with BatchNorm (per-task BN after shared convs), half shared.
    x = fashion[2][:64]
    pair = {t: mtz_tf.models.vgg16((28, 28, 1), 10, 0.125, seed=s) for s, t in enumerate(TASKS)}
    calib = tf.data.Dataset.from_tensor_slices(fashion[0][:256]).batch(128)
    zipped, _ = mtz_tf.zip_models(pair, {t: calib for t in TASKS}, share=0.5, verbose=0)
    out_dir = str(tmp_path / "conv")
    result = export_lib.export(zipped, out_dir, per_task_tflite=True, parity_data=x)
    expected = zipped(x)
    saved = tf.saved_model.load(os.path.join(out_dir, "saved_model"))
    for task in TASKS:
        single = saved.signatures[f"serve_{task}"](input=tf.constant(x))
        assert_close(next(iter(single.values())), expected[task])
        tflite = export_lib.run_tflite(
            os.path.join(out_dir, f"model_{task}.tflite"), f"serve_{task}", x
        )
        assert_close(next(iter(tflite.values())), expected[task])
    scale = max(1.0, max(float(np.abs(v).max()) for v in expected.values()))
    assert max(result["parity"]["tflite"].values()) <= FLOAT32_TOLERANCE * scale


def test_padding_cropping_upsampling_relu6_model_exports_with_parity(tmp_path):
    """The keras.applications layers the reader accepts (Rescaling, ZeroPadding2D,
    ReLU(6), Cropping2D, UpSampling2D) survive SavedModel and TFLite, per task too."""
    from test_graph import _padded_relu6_model

    model = _padded_relu6_model()
    other = keras.models.clone_model(model)
    x = np.random.default_rng(0).uniform(0, 255, size=(16, 8, 8, 3)).astype("float32")
    calib = tf.data.Dataset.from_tensor_slices(x).batch(8)
    zipped, _ = mtz_tf.zip_models(
        {"a": model, "b": other}, {"a": calib, "b": calib}, share=0.5, verbose=0
    )
    result = export_with_task_parity(zipped, str(tmp_path / "small"), x)
    assert {"keras", "tflite", "tflite_a", "tflite_b"} <= set(result["parity"])

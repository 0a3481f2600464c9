"""Repair after each zipped unit (mtz_tf.repair), checked against the plain Keras models."""

import keras
import numpy as np
import pytest
from conftest import assert_close, with_batch_norm_statistics

import mtz_tf
from mtz_tf import data, zipped_network


def _calibration_array(calibration) -> np.ndarray:
    return np.concatenate([np.asarray(batch) for batch in calibration])


def _outputs(model, layer: str, x: np.ndarray) -> np.ndarray:
    """Layer ``layer``'s output of a plain Keras model, float64."""
    probe = keras.Model(model.input, model.get_layer(layer).output)
    return np.asarray(probe.predict(x, verbose=0), dtype=np.float64)


def _augmented(h: np.ndarray) -> np.ndarray:
    return np.concatenate([h, np.ones((len(h), 1))], axis=1)


def _dense(model, name):
    kernel, bias = model.get_layer(name).get_weights()
    return np.asarray(kernel, np.float64), np.asarray(bias, np.float64)


def _zip_fc1(lenet_a, lenet_b, calibration, repair):
    """fc1 fully shared, fc2 and the head not: only fc2 is repaired (it reads fc1)."""
    zipped, report = mtz_tf.zip_models(
        {"a": lenet_a, "b": lenet_b},
        {"a": calibration, "b": calibration},
        share=[300, 0],
        repair=repair,
        verbose=0,
    )
    return zipped, report


def _normal_equation_gap(zipped, originals, x):
    """Per task, max |ĥ̃ᵀ (ĥ̃ W̃' − z)| / (N · max|ĥ̃| · max|z|): zero at the least-squares
    fit of the original fc2 pre-activations z from the zipped fc1 outputs ĥ."""
    gaps = {}
    for task, original in originals.items():
        plain = zipped_network.task_model(zipped, task)
        kernel, bias = _dense(original, "fc2")
        target = _outputs(original, "fc1", x) @ kernel + bias
        dense = [layer for layer in plain.layers if isinstance(layer, keras.layers.Dense)]
        new_kernel, new_bias = (np.asarray(w, np.float64) for w in dense[1].get_weights())
        inputs = _augmented(_outputs(plain, dense[0].name, x))
        residual = inputs @ np.concatenate([new_kernel, new_bias[None]]) - target
        scale = len(x) * np.abs(inputs).max() * np.abs(target).max()
        gaps[task] = float(np.abs(inputs.T @ residual).max() / scale)
    return gaps


def test_refit_is_the_least_squares_fit_of_the_next_pre_activations(lenet_a, lenet_b, calibration):
    x = _calibration_array(calibration)
    originals = {"a": lenet_a, "b": lenet_b}
    refit, report = _zip_fc1(lenet_a, lenet_b, calibration, "refit")
    unrepaired, plain_report = _zip_fc1(lenet_a, lenet_b, calibration, "none")
    assert [layer.repair for layer in report.layers] == ["refit: fc2", ""]
    assert [layer.repair for layer in plain_report.layers] == ["", ""]
    assert report.repair == "refit" and mtz_tf.ZipReport.from_dict(report.to_dict()).repair == (
        "refit"
    )
    fitted = _normal_equation_gap(refit, originals, x)
    untouched = _normal_equation_gap(unrepaired, originals, x)
    for task in originals:
        assert fitted[task] < 1e-5, (task, fitted[task])
        assert untouched[task] > 100 * fitted[task], (task, untouched[task], fitted[task])
    # The refit kernel adds no parameter.
    assert refit.count_params() == unrepaired.count_params()


def test_statistics_repair_restores_each_inputs_mean_and_deviation(lenet_a, lenet_b, calibration):
    x = _calibration_array(calibration)
    zipped, report = _zip_fc1(lenet_a, lenet_b, calibration, "statistics")
    unrepaired, _ = _zip_fc1(lenet_a, lenet_b, calibration, "none")
    assert [layer.repair for layer in report.layers] == ["statistics: fc2", ""]
    for task, original in {"a": lenet_a, "b": lenet_b}.items():
        kernel, bias = _dense(original, "fc2")
        # Without repair, zipped fc2's rows are the original rows in the zipped order.
        plain = zipped_network.task_model(unrepaired, task)
        permuted = [layer for layer in plain.layers if isinstance(layer, keras.layers.Dense)]
        permuted = np.asarray(permuted[1].get_weights()[0], np.float64)
        source = np.argmin(np.abs(permuted[:, None, :] - kernel[None, :, :]).max(axis=2), axis=1)
        assert_close(permuted, kernel[source], what="row order")
        plain = zipped_network.task_model(zipped, task)
        dense = [layer for layer in plain.layers if isinstance(layer, keras.layers.Dense)]
        new_kernel, new_bias = (np.asarray(w, np.float64) for w in dense[1].get_weights())
        h = _outputs(original, "fc1", x)[:, source]
        h_zipped = _outputs(plain, dense[0].name, x)
        live = h_zipped.std(0) > 0  # a dead zipped unit gets scale 0 and its mean back
        scale = np.where(live, h.std(0) / np.where(live, h_zipped.std(0), 1.0), 0.0)
        assert_close(new_kernel, scale[:, None] * kernel[source], what="scaled rows")
        shift = h.mean(0) - scale * h_zipped.mean(0)
        assert_close(new_bias, bias + shift @ kernel[source], what="bias")


def _bn_convnet(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 1))
    x = inputs
    for i in (1, 2):
        x = keras.layers.Conv2D(6, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, name="head")(x)
    return with_batch_norm_statistics(keras.Model(inputs, outputs), seed)


def test_batch_norm_statistics_are_re_estimated_on_the_zipped_network():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 12, 12, 1)).astype("float32")
    calibration = data.to_dataset(x, batch_size=32)
    models = {"a": _bn_convnet(1), "b": _bn_convnet(2)}
    zipped, report = mtz_tf.zip_models(
        models, {"a": calibration, "b": calibration}, share=0.5, verbose=0
    )
    assert [layer.repair for layer in report.layers] == ["batch_norm", "batch_norm"]
    for task in models:
        plain = zipped_network.task_model(zipped, task)
        convs = [layer for layer in plain.layers if isinstance(layer, keras.layers.Conv2D)]
        norms = [
            layer for layer in plain.layers if isinstance(layer, keras.layers.BatchNormalization)
        ]
        for conv, norm in zip(convs, norms):
            z = _outputs(plain, conv.name, x).reshape(-1, conv.filters)
            assert_close(norm.moving_mean.numpy(), z.mean(0), 1e-5, f"{task} {conv.name} mean")
            assert_close(norm.moving_variance.numpy(), z.var(0), 1e-5, f"{task} {conv.name} var")
    unrepaired, _ = mtz_tf.zip_models(
        models, {"a": calibration, "b": calibration}, share=0.5, repair="none", verbose=0
    )
    kept = [v for v in unrepaired.weights if "moving_mean" in v.path]
    original = [v for v in models["a"].weights if "moving_mean" in v.path]
    assert_close(  # the same values, in the zipped channel order
        np.sort(kept[0].numpy()), np.sort(original[0].numpy()), 1e-6, "repair='none' keeps them"
    )


def test_an_unknown_repair_is_refused(lenet_a, lenet_b, calibration):
    with pytest.raises(ValueError, match="`repair` must be one of"):
        mtz_tf.zip_models(
            {"a": lenet_a, "b": lenet_b},
            {"a": calibration, "b": calibration},
            repair="bn",
            verbose=0,
        )

"""Zipping convolutional networks: LeNet-5 and VGG-16 with BatchNorm, conv Hessians,
more than two models and adding a task to a zipped model loaded from disk."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close

import mtz_tf
from mtz_tf import data, layer_zip, models, training


@pytest.fixture(scope="module")
def small(fashion):
    x, y = fashion[0][:4000], fashion[1][:4000]
    return x, y, data.to_dataset(x[:600], batch_size=200)


def _trained(build, small, seed):
    x, y, _ = small
    model = build(seed)
    training.train_classifier(model, x, y, epochs=1, seed=seed, verbose=0)
    return model


@pytest.fixture(scope="module")
def lenet5_models(small):
    return [_trained(lambda s: models.lenet5(seed=s), small, seed) for seed in (1, 2, 3, 4)]


@pytest.fixture(scope="module")
def vgg(small):
    return _trained(lambda s: models.vgg16((28, 28, 1), 10, 0.125, seed=s), small, 1)


@pytest.mark.parametrize("hessian", ["channel", "patch"])
def test_lenet5_permutation_recovery(lenet5_models, small, fashion, hessian):
    model = lenet5_models[0]
    permuted = models.permute_hidden(model, seed=9)
    calib = small[2]
    zipped, report = mtz_tf.zip_models(
        {"a": model, "b": permuted}, {"a": calib, "b": calib}, hessian=hessian, verbose=0
    )
    x = fashion[2][:200]
    assert_close(zipped(x)["a"], model(x))
    assert_close(zipped(x)["b"], model(x))
    assert all(layer.merge_cost < 1e-6 for layer in report.layers)


@pytest.mark.slow
@pytest.mark.parametrize("batch_norm", ["task", "fold"])
def test_vgg16_with_batch_norm_permutation_recovery(vgg, small, fashion, batch_norm):
    permuted = models.permute_hidden(vgg, seed=4)
    zipped, report = mtz_tf.zip_models(
        {"a": vgg, "b": permuted},
        {"a": small[2], "b": small[2]},
        batch_norm=batch_norm,
        repair="none",  # exact recovery: keep the BatchNorm statistics
        verbose=0,
    )
    x = fashion[2][:100]
    assert_close(zipped(x)["a"], vgg(x))
    assert_close(zipped(x)["b"], vgg(x))
    conv_layers = [layer for layer in zipped.layers if isinstance(layer, mtz_tf.ZippedConv2D)]
    # Folded BN: fully shared layers are computed once; per-task BN keeps outputs per task.
    assert all(layer.common_output == (batch_norm == "fold") for layer in conv_layers)
    single = mtz_tf.zipped_network.task_model(zipped, "b")
    assert_close(single(x), zipped(x)["b"])


def explicit_patches(x, kh, kw, stride, padding):
    """Patch rows by explicit slicing: the slow, obviously correct reference."""
    n, h, w, c = x.shape
    if padding == "same":
        out_h, out_w = -(-h // stride), -(-w // stride)
        pad_h = max((out_h - 1) * stride + kh - h, 0)
        pad_w = max((out_w - 1) * stride + kw - w, 0)
        x = np.pad(
            x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
        )
    else:
        out_h, out_w = (h - kh) // stride + 1, (w - kw) // stride + 1
    rows = []
    for i in range(n):
        for r in range(out_h):
            for q in range(out_w):
                rows.append(
                    x[i, r * stride : r * stride + kh, q * stride : q * stride + kw, :].reshape(-1)
                )
    return np.array(rows)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_hessians_equal_explicit_patches(padding, stride):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 7, 6, 4)).astype(np.float32)
    inputs = keras.Input((7, 6, 4))
    hidden = keras.layers.Conv2D(5, 3, strides=stride, padding=padding, name="c1")(inputs)
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(hidden))
    model = keras.Model(inputs, outputs)
    calib = tf.data.Dataset.from_tensor_slices(x).batch(2)
    states = mtz_tf.zipped_network.separate_states(
        {"a": mtz_tf.graph.read_plan(model), "b": mtz_tf.graph.read_plan(model)},
        {"a": model, "b": model},
    )
    plan = mtz_tf.graph.read_plan(model)
    zipped = mtz_tf.zipped_network.build_model(plan, ["a", "b"], states)
    layer = mtz_tf.zipped_network.zipped_layers(zipped)[0]
    calibration = mtz_tf.frontier.FullPasses({"a": calib, "b": calib})
    patch = layer_zip.layers_hessians(zipped, [layer], states[:1], calibration, "patch")[0][
        0
    ].numpy()
    rows = explicit_patches(x, 3, 3, stride, padding)
    rows = np.hstack([rows, np.ones((len(rows), 1))])
    np.testing.assert_allclose(patch, rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6)
    channel = layer_zip.layers_hessians(zipped, [layer], states[:1], calibration, "channel")[0][0]
    pixels = np.hstack([x.reshape(-1, 4), np.ones((x.shape[0] * 42, 1))])
    np.testing.assert_allclose(channel.numpy(), pixels.T @ pixels / len(pixels), rtol=1e-5)


def test_three_models_and_adding_a_fourth_from_disk(lenet5_models, small, fashion, tmp_path):
    tasks = {"a": lenet5_models[0], "b": lenet5_models[1], "c": lenet5_models[2]}
    calib = {t: small[2] for t in tasks}
    zipped, report = mtz_tf.zip_models(tasks, calib, share=[10, 25, 250], verbose=0)
    assert [layer.shared for layer in report.layers] == [10, 25, 250]
    x = fashion[2][:200]
    outputs = zipped(x)
    for task in tasks:
        assert outputs[task].shape == (200, 10)
    path = str(tmp_path / "three.keras")
    zipped.save(path)
    loaded = keras.saving.load_model(path)
    four, four_report = mtz_tf.add_task(
        loaded, "d", lenet5_models[3], {t: small[2] for t in "abcd"}, verbose=0
    )
    assert list(four.output) == ["a", "b", "c", "d"]
    assert [layer.shared for layer in four_report.layers] == [10, 25, 250]
    # The old tasks' own neurons are untouched, the new task shares every shared neuron.
    old, new = (
        mtz_tf.zipped_network.zipped_layers(loaded),
        mtz_tf.zipped_network.zipped_layers(four),
    )
    for before, after in zip(old, new):
        assert all(after.sharing)
        for t in range(3):
            np.testing.assert_array_equal(
                before.task_kernels[t].numpy(), after.task_kernels[t].numpy()
            )
    accuracy = np.mean(np.argmax(four(x)["d"], -1) == fashion[3][:200])
    assert accuracy > 0.5  # still a working classifier after joining
    with pytest.raises(ValueError, match="must be a new Python identifier"):
        mtz_tf.add_task(loaded, "a", lenet5_models[3], calib, verbose=0)


def test_unsupported_layers_and_architecture_mismatch_are_named(lenet5_models, small):
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.DepthwiseConv2D(3, name="depthwise")(inputs)
    x = keras.layers.Flatten()(keras.layers.Conv2D(4, 3)(x))
    odd = keras.Model(inputs, keras.layers.Dense(10)(x))
    calib = {"a": small[2], "b": small[2]}
    with pytest.raises(ValueError, match="DepthwiseConv2D layer 'depthwise' reads the model"):
        mtz_tf.zip_models({"a": lenet5_models[0], "b": odd}, calib)
    with pytest.raises(ValueError, match=r"Model 'b' differs from model 'a' in depth: 4 vs 7"):
        mtz_tf.zip_models({"a": lenet5_models[0], "b": models.lenet_300_100()}, calib)
    with pytest.raises(ValueError, match="must be at most its width 20"):
        mtz_tf.zip_models({"a": lenet5_models[0], "b": lenet5_models[1]}, calib, share=[21, 0, 0])
    with pytest.raises(ValueError, match="`hessian` must be one of"):
        mtz_tf.zip_models({"a": lenet5_models[0], "b": lenet5_models[1]}, calib, hessian="x")


def test_batch_norm_folding_handles_zero_scale():
    rng = np.random.default_rng(0)
    kernel, bias = rng.normal(size=(3, 3, 2, 4)), rng.normal(size=4)
    gamma = np.array([1.0, 0.0, 2.0, -1.0])  # γ = 0: the channel is the constant β
    beta, mean, var = rng.normal(size=4), rng.normal(size=4), rng.random(4) + 0.1
    folded_kernel, folded_bias = mtz_tf.zipped_network.fold_batch_norm(
        kernel, bias, (gamma, beta, mean, var), 1e-3
    )
    z = rng.normal(size=(5, 4))
    expected = gamma * (z - mean) / np.sqrt(var + 1e-3) + beta
    # Applying the folded affine map to the pre-bias response z - bias reproduces BN(z).
    got = (z - bias) * (folded_kernel[0, 0, 0] / kernel[0, 0, 0]) + folded_bias
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert np.all(folded_kernel[..., 1] == 0) and folded_bias[1] == beta[1]

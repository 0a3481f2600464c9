"""Tests for mtz_tf.compress.ista (and the channel groups it relies on)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close

from mtz_tf import data, models
from mtz_tf.compress import bn_graph, flops, ista, l1_filter_pruning


def _bn_block(x, filters, kernel, name, padding="valid", dense=False, use_bias=False):
    if dense:
        x = keras.layers.Dense(filters, use_bias=use_bias, name=name)(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, padding=padding, use_bias=use_bias, name=name)(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _chain_model():
    """Valid convolutions, max- and average-pooling, conv -> Dense boundary, bias-less head.

    12x12x3 -> conv1 3x3 (10x10x6) -> maxpool 2 same (5x5) -> conv2 3x3 (3x3x5) ->
    avgpool 2 same (2x2) -> flatten (20) -> fc1 (7) -> fc2 (3, no bias, no BN).
    """
    inputs = keras.Input((12, 12, 3))
    x = _bn_block(inputs, 6, 3, "conv1")
    x = keras.layers.MaxPooling2D(2, padding="same", name="pool1")(x)
    x = _bn_block(x, 5, 3, "conv2")
    x = keras.layers.AveragePooling2D(2, padding="same", name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = _bn_block(x, 7, None, "fc1", dense=True)
    outputs = keras.layers.Dense(3, use_bias=False, name="fc2")(x)
    return keras.Model(inputs, outputs, name="chain")


def _randomize_bn(model, seed=0):
    """Random BN parameters and statistics, so that every removal has something to absorb."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.normal(1.0, 0.5, c).astype(np.float32),
                    rng.uniform(0.2, 1.0, c).astype(np.float32),
                    rng.normal(0.0, 0.3, c).astype(np.float32),
                    rng.uniform(0.5, 2.0, c).astype(np.float32),
                ]
            )


def _set(model, name, key, index, value):
    layer = model.get_layer(name)
    variable = getattr(layer, key)
    array = variable.numpy()
    array[index] = value
    variable.assign(array)


def _inputs(shape, n=6, seed=1):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


# --- the proximal step ---------------------------------------------------------------


def test_soft_threshold_matches_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50).astype(np.float32)
    x[:3] = [0.3, -0.3, 0.0]
    t = 0.3
    expected = np.array([np.sign(v) * max(abs(v) - t, 0.0) for v in x.tolist()])
    got = np.asarray(ista.soft_threshold(x, t))
    assert_close(got, expected, tol=1e-6)  # one float32 subtraction: an ulp of |x|
    assert np.all(got[:3] == 0.0)  # |x| <= t gives exact zeros


def _tiny_bn_model():
    inputs = keras.Input((5,))
    x = _bn_block(inputs, 4, None, "fc1", dense=True)
    outputs = keras.layers.Dense(2, name="fc2")(x)
    return keras.Model(inputs, outputs)


def test_ista_sgd_step_is_exact_and_momentum_free():
    model = _tiny_bn_model()
    lr, rho, lam, momentum = 0.1, 0.5, 2.0, 0.9
    optimizer = ista.ISTASGD({"fc1_bn": lam}, rho, learning_rate=lr, momentum=momentum)
    variables = model.trainable_variables
    optimizer.build(variables)
    gamma = model.get_layer("fc1_bn").gamma
    kernel = model.get_layer("fc1").kernel
    gamma.assign(np.array([1.0, -0.05, 0.12, -2.0], np.float32))
    rng = np.random.default_rng(0)
    reference_gamma, reference_kernel = gamma.numpy().astype(np.float64), kernel.numpy()
    velocity = np.zeros_like(reference_kernel)
    for _ in range(3):
        grads = [rng.normal(size=v.shape).astype(np.float32) for v in variables]
        g_gamma = grads[[v.path for v in variables].index(gamma.path)]
        g_kernel = grads[[v.path for v in variables].index(kernel.path)]
        optimizer.apply(grads, variables)
        z = reference_gamma - lr * g_gamma
        reference_gamma = np.sign(z) * np.maximum(np.abs(z) - lr * rho * lam, 0.0)
        velocity = momentum * velocity - lr * g_kernel
        reference_kernel = reference_kernel + velocity
        assert_close(gamma.numpy(), reference_gamma, tol=1e-5)
        assert_close(kernel.numpy(), reference_kernel, tol=1e-5)
    assert np.count_nonzero(gamma.numpy() == 0.0) >= 1


def test_ista_sgd_under_model_fit_matches_gradient_tape(tmp_path):
    keras.utils.set_random_seed(0)
    model = _tiny_bn_model()
    x = _inputs((5,), n=16)
    y = np.arange(16) % 2
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    gamma = model.get_layer("fc1_bn").gamma
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grad = tape.gradient(loss, gamma.value).numpy()
    lr, rho, lam = 0.05, 0.3, 1.5
    z = gamma.numpy() - lr * grad
    expected = np.sign(z) * np.maximum(np.abs(z) - lr * rho * lam, 0.0)
    model.compile(optimizer=ista.ISTASGD({"fc1_bn": lam}, rho, learning_rate=lr), loss=loss_fn)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert_close(gamma.numpy(), expected, tol=1e-5)
    path = str(tmp_path / "compiled.keras")  # the optimizer is serialisable with the model
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, ista.ISTASGD)
    assert loaded.optimizer.lambdas == {"fc1_bn": lam} and loaded.optimizer.rho == rho


def test_ista_sgd_config_round_trip_and_errors():
    optimizer = ista.ISTASGD({"a": 1.0}, 0.2, learning_rate=0.03)
    clone = ista.ISTASGD.from_config(optimizer.get_config())
    assert clone.lambdas == {"a": 1.0} and clone.rho == 0.2
    with pytest.raises(ValueError, match="`rho` must be non-negative"):
        ista.ISTASGD({"a": 1.0}, -1.0)
    with pytest.raises(ValueError, match="`lambdas` must be non-negative"):
        ista.ISTASGD({"a": -1.0}, 1.0)
    with pytest.raises(TypeError, match="`lambdas` must be a dict"):
        ista.ISTASGD([1.0], 1.0)
    model = _tiny_bn_model()
    with pytest.raises(ValueError, match=r"names BatchNorm layers \['nope'\]"):
        ista.ISTASGD({"nope": 1.0}, 1.0).build(model.trainable_variables)


# --- lambda_l -------------------------------------------------------------------------


def test_memory_lambdas_by_hand():
    # 8x8x3 -> conv1 3x3 same (8x8x4) -> pool (4x4) -> conv2 3x3 valid (2x2x5) -> flatten
    # -> fc1 (6) -> fc2 (2, output).
    inputs = keras.Input((8, 8, 3))
    x = _bn_block(inputs, 4, 3, "conv1", padding="same")
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = _bn_block(x, 5, 3, "conv2")
    x = keras.layers.Flatten()(x)
    x = _bn_block(x, 6, None, "fc1", dense=True)
    model = keras.Model(inputs, keras.layers.Dense(2, name="fc2")(x))
    lambdas = ista.memory_lambdas(model)
    # conv1: (8*8 output pixels + 3*3*3 fan-in + 3*3*5 of conv2) / (8*8 input pixels)
    assert lambdas["conv1_bn"] == pytest.approx((64 + 27 + 45) / 64)  # 2.125
    # conv2: (2*2 + 3*3*4 + fc1 reads 2*2 positions x 6 units) / 64
    assert lambdas["conv2_bn"] == pytest.approx((4 + 36 + 24) / 64)  # 1.0
    assert lambdas["fc1_bn"] == 0.0  # read only by the output layer: the last layer


def test_resnet_groups_couple_the_residual_stream():
    model = models.resnet20((28, 28, 1), 10, width_multiplier=0.25, seed=0)
    graph = bn_graph.read_bn_graph(model)
    assert all(g.prunable for g in graph.groups)
    stream = next(g for g in graph.groups if "stage3_block3_bn2" in [w.bn for w in g.writers])
    assert {w.bn for w in stream.writers} == {
        "stage3_block1_bn2",
        "stage3_block1_proj_bn",
        "stage3_block2_bn2",
        "stage3_block3_bn2",
    }
    assert {r.name for r in stream.readers} == {
        "stage3_block2_conv1",
        "stage3_block3_conv1",
        "fc",
    }
    lambdas = ista.memory_lambdas(model)
    assert len(lambdas) == 19 + 2  # 19 convolutions + 2 projections, each with its BN


# --- removal -------------------------------------------------------------------------


def test_remove_zero_channels_exact_through_pooling_and_flatten(tmp_path):
    keras.utils.set_random_seed(0)
    model = _chain_model()
    _randomize_bn(model)
    _set(model, "conv1_bn", "gamma", [0, 3], 0.0)
    _set(model, "conv2_bn", "gamma", [1, 2, 4], 0.0)
    _set(model, "fc1_bn", "gamma", [5], 0.0)
    before = [w.copy() for w in model.get_weights()]
    x = _inputs((12, 12, 3))
    pruned = ista.remove_zero_channels(model)
    assert_close(pruned.predict(x, verbose=0), model.predict(x, verbose=0))
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)  # input model untouched
    assert pruned.get_layer("conv1").filters == 4
    assert pruned.get_layer("conv2").filters == 2
    assert pruned.get_layer("fc1").units == 6
    assert pruned.get_layer("fc1").kernel.shape == (2 * 2 * 2, 6)
    assert pruned.get_layer("fc2").use_bias  # the constant needed a bias
    expected_params = (
        (27 * 4 + 4 * 4) + (9 * 4 * 2 + 4 * 2) + (8 * 6 + 4 * 6) + (6 * 3 + 3)
    )  # conv1+bn1, conv2+bn2, fc1+bn, fc2 with bias
    assert pruned.count_params() == expected_params < model.count_params()
    assert flops.count_flops(pruned) < flops.count_flops(model)
    path = str(tmp_path / "pruned.keras")
    pruned.save(path)
    loaded = keras.models.load_model(path)
    assert_close(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_remove_zero_channels_exact_through_resnet_add():
    keras.utils.set_random_seed(0)
    model = models.resnet20((16, 16, 1), 10, width_multiplier=0.5, seed=0)
    _randomize_bn(model)
    # Random BN statistics let activations grow along the residual streams; scale the logits
    # to O(1) so that 1e-5 is a float32 rounding tolerance.
    fc = model.get_layer("fc")
    fc.kernel.assign(fc.kernel.numpy() * 0.05)
    channels = [1, 5]
    # Stage-3 stream: every block adding into it has gamma = 0 on `channels`. The constants
    # are chosen so that the stream carries 0 where 3x3 same-padded convolutions read it
    # (exact at the border) and a non-zero constant where the final Dense reads it through
    # global average pooling: 0.5 + (-0.8) -> ReLU 0; 0 + (-0.2) -> 0; 0 + 0.6 -> 0.6.
    for name, beta in [
        ("stage3_block1_bn2", 0.5),
        ("stage3_block1_proj_bn", -0.8),
        ("stage3_block2_bn2", -0.2),
        ("stage3_block3_bn2", 0.6),
    ]:
        _set(model, name, "gamma", channels, 0.0)
        _set(model, name, "beta", channels, beta)
    # Inner block channels (read by same-padded 3x3 convolutions) with ReLU(beta) = 0.
    for name in ["stage1_block2_bn1", "stage2_block1_bn1", "stage3_block3_bn1"]:
        _set(model, name, "gamma", [0, 2], 0.0)
        _set(model, name, "beta", [0, 2], -0.4)
    # A stage-2 stream channel zero in only some of its writers must stay.
    _set(model, "stage2_block1_bn2", "gamma", [3], 0.0)
    _set(model, "stage2_block1_proj_bn", "gamma", [3], 0.0)
    x = _inputs((16, 16, 1))
    pruned = ista.remove_zero_channels(model)
    assert_close(pruned.predict(x, verbose=0), model.predict(x, verbose=0))
    for name in ["stage3_block1_conv2", "stage3_block1_proj_conv", "stage3_block3_conv2"]:
        assert pruned.get_layer(name).filters == 32 - 2
    assert pruned.get_layer("stage3_block1_conv1").filters == 32
    assert pruned.get_layer("stage3_block2_conv1").kernel.shape[2] == 30
    assert pruned.get_layer("stage2_block1_conv2").filters == 16  # stream kept whole
    assert pruned.get_layer("stage2_block1_conv1").filters == 14
    assert pruned.get_layer("fc").kernel.shape == (30, 10)
    # The 0.6 constant went into the classifier's bias.
    shift = 0.6 * model.get_layer("fc").kernel.numpy()[channels].sum(axis=0)
    assert_close(
        pruned.get_layer("fc").bias.numpy(), model.get_layer("fc").bias.numpy() + shift, tol=1e-5
    )
    assert pruned.count_params() < model.count_params()


def test_remove_zero_channels_vgg16_conv_to_dense_boundary():
    # At 28x28 the last VGG block runs at 2x2 and pool5 gives 1x1: conv13 -> fc1 is exact.
    model = models.vgg16((28, 28, 1), 10, width_multiplier=0.125, seed=0)
    _randomize_bn(model)
    _set(model, "bn13", "gamma", [0, 4, 7], 0.0)  # positive betas: absorbed into fc1_bn
    _set(model, "fc1_bn", "gamma", [1, 2], 0.0)  # absorbed into fc2's bias
    _set(model, "bn3", "gamma", [2], 0.0)
    _set(model, "bn3", "beta", [2], -1.0)  # ReLU(beta) = 0: nothing to absorb, exact
    x = _inputs((28, 28, 1))
    pruned = ista.remove_zero_channels(model)
    assert_close(pruned.predict(x, verbose=0), model.predict(x, verbose=0))
    assert pruned.get_layer("conv13").filters == 64 - 3
    assert pruned.get_layer("fc1").kernel.shape == (61, 62)
    assert pruned.get_layer("conv3").filters == 15


def test_same_padding_border_effect_is_confined_to_the_border():
    inputs = keras.Input((9, 9, 2))
    x = _bn_block(inputs, 4, 3, "conv1", padding="same")
    outputs = keras.layers.Conv2D(3, 3, padding="same", name="conv2")(x)
    model = keras.Model(inputs, outputs)
    _randomize_bn(model)  # betas > 0: the removed channel carries a non-zero constant
    _set(model, "conv1_bn", "gamma", [1], 0.0)
    x = _inputs((9, 9, 2))
    pruned = ista.remove_zero_channels(model)
    expected = model.predict(x, verbose=0)
    got = pruned.predict(x, verbose=0)
    assert_close(got[:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1])
    diff = np.abs(got - expected)
    assert diff[:, 0].max() > 1e-3  # zero padding never carried the constant
    # "mean" absorption: the per-channel error averages to zero over output positions.
    mean_pruned = ista.remove_zero_channels(model, absorption="mean")
    error = mean_pruned.predict(x, verbose=0) - expected  # (n, 9, 9, 3)
    assert_close(mean_pruned.predict(x, verbose=0).mean(axis=(1, 2)), expected.mean(axis=(1, 2)))
    assert np.abs(error[:, 1:-1, 1:-1]).max() > 1e-4  # no longer exact inside
    with pytest.raises(ValueError, match="`absorption` must be one of"):
        ista.remove_zero_channels(model, absorption="border")


def test_tap_coverage_against_explicit_loop():
    for size, kernel, stride, dilation in [(2, 3, 1, 1), (9, 3, 2, 1), (7, 5, 1, 2), (1, 3, 1, 1)]:
        outputs = -(-size // stride)
        pad = max((outputs - 1) * stride + (kernel - 1) * dilation + 1 - size, 0) // 2
        expected = [
            np.mean([0 <= i * stride + t * dilation - pad < size for i in range(outputs)])
            for t in range(kernel)
        ]
        got = ista.tap_coverage(size, kernel, stride, dilation, "same")
        np.testing.assert_allclose(got, expected)
    np.testing.assert_array_equal(ista.tap_coverage(5, 3, 1, 1, "valid"), np.ones(3))


def test_all_zero_group_keeps_one_channel_and_nothing_zero_changes_nothing():
    model = _chain_model()
    _randomize_bn(model)
    same = ista.remove_zero_channels(model)
    assert same.count_params() == model.count_params()
    _set(model, "conv2_bn", "gamma", slice(None), 0.0)
    pruned = ista.remove_zero_channels(model)
    assert pruned.get_layer("conv2").filters == 1
    x = _inputs((12, 12, 3))
    assert_close(pruned.predict(x, verbose=0), model.predict(x, verbose=0))


# --- gamma-W rescaling -----------------------------------------------------------------


@pytest.mark.parametrize("builder", ["chain", "resnet20"])
def test_rescale_gamma_preserves_function(builder):
    if builder == "chain":
        model, shape = _chain_model(), (12, 12, 3)
    else:
        model, shape = models.resnet20((16, 16, 1), 10, width_multiplier=0.25, seed=0), (16, 16, 1)
    _randomize_bn(model)
    x = _inputs(shape)
    scaled = ista.rescale_gamma(model, 0.01)
    assert_close(scaled.predict(x, verbose=0), model.predict(x, verbose=0))
    bn = model.layers[2].name
    np.testing.assert_allclose(
        scaled.get_layer(bn).gamma.numpy(), 0.01 * model.get_layer(bn).gamma.numpy(), rtol=1e-6
    )
    back = ista.rescale_gamma(scaled, 100.0)
    for a, b in zip(back.get_weights(), model.get_weights(), strict=True):
        assert_close(a, b, tol=1e-5)


def test_rescale_gamma_errors():
    with pytest.raises(ValueError, match="`alpha` must be a positive finite number"):
        ista.rescale_gamma(_chain_model(), 0.0)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("sigmoid", name="squash")(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    with pytest.raises(ValueError, match="positively homogeneous.*'squash'"):
        ista.rescale_gamma(model, 0.5)


# --- errors -----------------------------------------------------------------------------


def test_model_without_batchnorm_is_refused():
    model = models.lenet5()
    for fn in (
        ista.memory_lambdas,
        ista.remove_zero_channels,
        lambda m: ista.rescale_gamma(m, 0.1),
        lambda m: l1_filter_pruning.l1_filter_prune(m, 0.5),
    ):
        with pytest.raises(ValueError, match="ISTA needs BatchNorm scales"):
            fn(model)


def test_batchnorm_that_cannot_be_pruned_is_explained():
    inputs = keras.Input((4,))
    x = keras.layers.BatchNormalization(name="input_bn")(inputs)  # normalises the input
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    with pytest.raises(ValueError, match="ISTA needs BatchNorm scales.*'input_bn' does not"):
        ista.memory_lambdas(model)
    with pytest.raises(ValueError, match="`tolerance` must be non-negative"):
        ista.remove_zero_channels(_chain_model(), tolerance=-1.0)


# --- pipeline and baseline --------------------------------------------------------------


def test_ista_prune_removes_channels_and_round_trips(tmp_path):
    keras.utils.set_random_seed(0)
    model = _chain_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 12, 12, 3)).astype(np.float32)
    y = (x[:, :6, :, 0].mean(axis=(1, 2)) > 0).astype(np.int64) + (x[..., 1].mean((1, 2)) > 0)
    train = data.to_dataset(x, y, batch_size=64, shuffle=True, seed=0)
    pruned, report = ista.ista_prune(
        model,
        train,
        rho=2.0,
        steps=30,
        fine_tune_steps=5,
        alpha=0.5,
        learning_rate=0.05,
        validation=data.to_dataset(x[:100], y[:100], batch_size=40),
    )
    # The validation accuracy of each stage is that of an independent argmax count.
    assert report.validation_accuracy["fine_tuned"] == pytest.approx(
        np.mean(np.argmax(pruned.predict(x[:100], verbose=0), axis=-1) == y[:100])
    )
    assert report.validation_accuracy["input"] == pytest.approx(
        np.mean(np.argmax(model.predict(x[:100], verbose=0), axis=-1) == y[:100])
    )
    assert report.params_after == pruned.count_params() < report.params_before
    assert report.params_before == model.count_params()
    assert json.loads(report.to_json())["channels"] == {
        name: list(counts) for name, counts in report.channels.items()
    }
    assert report.flops_after < report.flops_before
    assert sum(after for _, after in report.channels.values()) < sum(
        before for before, _ in report.channels.values()
    )
    assert report.channels["fc1_bn"] == [7, 7]  # lambda = 0 for the last layer
    path = str(tmp_path / "ista.keras")
    pruned.save(path)
    x_test = x[:8]
    assert_close(
        keras.models.load_model(path).predict(x_test, verbose=0),
        pruned.predict(x_test, verbose=0),
    )


def test_l1_filter_pruning_keeps_largest_filters_and_matches_params():
    model = _chain_model()
    _randomize_bn(model)
    kernel = model.get_layer("conv1").kernel.numpy()
    norms = np.abs(kernel).sum(axis=(0, 1, 2))
    pruned = l1_filter_pruning.l1_filter_prune(model, 0.5, bn_names={"conv1_bn"})
    kept = pruned.get_layer("conv1").kernel.numpy()
    np.testing.assert_allclose(
        np.sort(np.abs(kept).sum(axis=(0, 1, 2))), np.sort(norms)[3:], rtol=1e-6
    )
    assert pruned.get_layer("conv2").filters == 5  # not named: untouched
    target = model.count_params() // 2
    matched, fraction = l1_filter_pruning.l1_filter_prune_to_params(model, target)
    assert matched.count_params() <= target and 0 < fraction < 1
    with pytest.raises(ValueError, match="`keep_fraction` must be in"):
        l1_filter_pruning.l1_filter_prune(model, 0.0)


def test_recalibrate_batchnorm_sets_exact_batch_statistics():
    model = _tiny_bn_model()
    bn = model.get_layer("fc1_bn")
    x = _inputs((5,), n=64)
    pre = model.get_layer("fc1")(x).numpy()  # the BatchNorm's input
    # Two batches of 40: the first 64 inputs are read, across the batch boundary.
    ista.recalibrate_batchnorm(
        model, data.to_dataset(np.concatenate([x, x[:16]]), batch_size=40), examples=64
    )
    assert_close(bn.moving_mean.numpy(), pre.mean(axis=0), tol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), pre.var(axis=0), rtol=1e-4)
    assert bn.momentum == 0.99  # restored


def test_remove_zero_channels_exact_through_cropping_and_upsampling():
    """Cropping2D and UpSampling2D pass a dead channel's constant to the readers, so the
    channel is removed and the constant absorbed exactly (ZeroPadding2D would not pass it)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(6, 3, padding="same", use_bias=False, name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Cropping2D(1)(x)
    x = keras.layers.UpSampling2D(2, interpolation="bilinear")(x)
    x = keras.layers.Conv2D(4, 1, name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="fc")(x))
    _randomize_bn(model)
    _set(model, "bn1", "gamma", [1, 4], 0.0)
    _set(model, "bn1", "beta", [1, 4], 0.7)  # ReLU(0.7) = 0.7: a constant to absorb
    x = _inputs((8, 8, 2))
    pruned = ista.remove_zero_channels(model)
    assert pruned.get_layer("c1").filters == 4
    assert_close(pruned.predict(x, verbose=0), model.predict(x, verbose=0))


def test_ista_data_arguments_are_checked_before_any_work():
    model = _chain_model()
    x = _inputs((12, 12, 3), n=8)
    y = np.zeros(8, np.int64)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(TypeError, match="must be a batched tf.data.Dataset"):
        ista.ista_prune(model, x, rho=1.0, steps=1, fine_tune_steps=0)
    with pytest.raises(ValueError, match=r"yields inputs of shape \(None, 12, 12\)"):
        ista.ista_prune(model, data.to_dataset(x[..., 0], y), rho=1.0, steps=1, fine_tune_steps=0)
    with pytest.raises(ValueError, match="one-hot labels"):
        ista.fine_tune(model, data.to_dataset(x, np.eye(3)[y]), steps=1)
    with pytest.raises(ValueError, match="validation data"):
        ista.ista_prune(
            model,
            data.to_dataset(x, y),
            rho=1.0,
            steps=1,
            fine_tune_steps=0,
            validation=data.to_dataset(x),
        )
    for got, want in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)  # nothing trained, nothing changed

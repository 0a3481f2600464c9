"""Tests for mtz_tf.compress.neuron_merging against independent computations."""

import json
import os

import keras
import numpy as np
import pytest
from conftest import assert_close

from mtz_tf import data, models, torch_weights, training
from mtz_tf.compress import criteria
from mtz_tf.compress import neuron_merging as nm

NPZ = "/work/shared/data/lenet300100_fashion_mnist_torch.npz"
NPZ = os.environ.get("MTZ_LENET300_NPZ", NPZ)


def _dense_model(activation="relu", hidden=6, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(hidden, activation=activation, name="hidden")(inputs)
    outputs = keras.layers.Dense(3, name="out")(x)
    return keras.Model(inputs, outputs)


def _conv_bn_model(seed=0, bias=False):
    """conv -> BN -> ReLU -> pool -> conv -> BN -> ReLU -> Flatten -> Dense -> Dense."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(6, 3, padding="same", use_bias=bias, name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="r1")(x)
    x = keras.layers.MaxPooling2D(2, name="p1")(x)
    x = keras.layers.Conv2D(5, 3, padding="same", use_bias=bias, name="c2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU(name="r2")(x)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dense(7, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(3, name="fc2")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)
    for name in ("bn1", "bn2"):  # Non-trivial BatchNorm statistics.
        layer = model.get_layer(name)
        n = layer.gamma.shape[0]
        layer.set_weights(
            [
                rng.uniform(0.5, 1.5, n),
                rng.normal(0, 0.3, n),
                rng.normal(0, 0.3, n),
                rng.uniform(0.5, 2.0, n),
            ]
        )
    return model


def _x(shape, n=64, seed=1):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")


def _predict(model, x):
    return model.predict(x, verbose=0)


# ---------------------------------------------------------------------------------------------
# Exactness on positively scaled duplicates.


def test_dense_duplicate_merges_without_changing_outputs():
    model = _dense_model()
    kernel, bias = model.get_layer("hidden").get_weights()
    kernel *= 5.0
    bias = np.full(6, 0.2)
    kernel[:, 1] = 0.1 * kernel[:, 0]  # Neuron 1 = 0.1 x neuron 0: smallest, pruned first.
    bias[1] = 0.1 * bias[0]
    model.get_layer("hidden").set_weights([kernel, bias])
    x = _x((4,))
    merged, report = nm.compress(model, 1 / 6, threshold=0.99)
    assert merged.get_layer("hidden").units == 5
    assert report.layers[0].merged == 1 and report.layers[0].kept == 5
    assert_close(_predict(merged, x), _predict(model, x))
    pruned, _ = nm.compress(model, 1 / 6, merge=False)
    assert not np.allclose(_predict(pruned, x), _predict(model, x), atol=1e-3)


def test_conv_flatten_duplicate_merges_without_changing_outputs():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inputs)  # 4x4x4
    x = keras.layers.MaxPooling2D(2, name="pool")(x)  # 2x2x4
    x = keras.layers.Flatten(name="flat")(x)
    outputs = keras.layers.Dense(3, name="fc")(x)
    model = keras.Model(inputs, outputs)
    kernel, bias = model.get_layer("c1").get_weights()
    kernel[..., 2] = 0.3 * kernel[..., 3]  # Channel 2 = 0.3 x channel 3.
    bias[:] = [0.5, -0.4, 0.03, 0.1]
    kernel[..., :2] *= 4.0
    model.get_layer("c1").set_weights([kernel, bias])
    merged, _ = nm.compress(model, {"c1": 0.25}, threshold=0.99)
    assert merged.get_layer("c1").filters == 3
    assert merged.get_layer("fc").kernel.shape == (2 * 2 * 3, 3)
    x = _x((6, 6, 2))
    assert_close(_predict(merged, x), _predict(model, x))


def _duplicate_bn_channel(model, i, j, s, epsilon):
    """Makes channel i of c1/bn1 an exact positive multiple of channel j (slope γ_i/γ_j)."""
    kernel = model.get_layer("c1").get_weights()[0]
    kernel[..., i] = s * kernel[..., j]
    model.get_layer("c1").set_weights([kernel])
    gamma, beta, mean, var = model.get_layer("bn1").get_weights()
    mean[i] = s * mean[j]
    var[i] = s**2 * (var[j] + epsilon) - epsilon
    beta[i] = gamma[i] / gamma[j] * beta[j]
    model.get_layer("bn1").set_weights([gamma, beta, mean, var])


def test_bn_duplicate_is_exact_with_the_exact_scale_and_not_with_the_reference_one():
    model = _conv_bn_model()
    eps = model.get_layer("bn1").epsilon
    # Channel 0 = 0.2 x channel 4; small norm, so l2-norm prunes it at 1/6.
    kernel = model.get_layer("c1").get_weights()[0]
    kernel[..., 1:] *= 3.0
    model.get_layer("c1").set_weights([kernel])
    _duplicate_bn_channel(model, 0, 4, 0.2, eps)
    x = _x((8, 8, 2))
    ratio = {"c1": 1 / 6}
    exact, report = nm.compress(model, ratio, criterion="l2-norm", scale="exact", threshold=0.99)
    assert report.layers[0].merged == 1 and report.layers[0].batch_norm == "bn1"
    assert_close(_predict(exact, x), _predict(model, x))
    reference, _ = nm.compress(model, ratio, criterion="l2-norm", scale="reference", threshold=0.99)
    assert not np.allclose(_predict(reference, x), _predict(model, x), atol=1e-3)


def _loop_bn_matrix(v, keep, gamma, beta, mean, var, eps, threshold, lamda, scale):
    """A literal per-pair transcription of the BatchNorm variant (the slow reference)."""
    n, k = len(v), len(keep)
    z = np.zeros((k, n))
    for j, idx in enumerate(keep):
        z[j, idx] = 1.0
    for i in range(n):
        if i in keep:
            continue
        cos, slopes, mism = [], [], []
        for m in keep:
            c = v[i] @ v[m] / (np.linalg.norm(v[i]) * np.linalg.norm(v[m]))
            s = np.linalg.norm(v[i]) / np.linalg.norm(v[m])
            if scale == "reference":
                slope = s * (gamma[m] / gamma[i]) * (var[i] / var[m])
                b = (gamma[m] / var[m]) * (s * (-(var[i] * beta[i] / gamma[i]) + mean[i]) - mean[m])
                b = abs(b + beta[m]) / slope
            else:
                si, sm = np.sqrt(var[i] + eps), np.sqrt(var[m] + eps)
                slope = s * (gamma[i] / gamma[m]) * (sm / si)
                crossing = mean[i] - si * beta[i] / gamma[i]
                b = abs(gamma[m] * (crossing / s - mean[m]) / sm + beta[m])
            cos.append(1 - c)
            slopes.append(slope)
            mism.append(b if (scale == "reference" or slope > 0) else np.nan)
        mism = np.array(mism)
        ok = ~np.isnan(mism)
        lo, hi = (np.nanmin(mism), np.nanmax(mism)) if ok.any() else (0.0, 0.0)
        norm = (mism - lo) / (hi - lo) if hi > lo else np.zeros_like(mism)
        score = np.where(ok, lamda * np.array(cos) + (1 - lamda) * norm, np.inf)
        best = int(np.argmin(score))
        if np.isfinite(score[best]) and 1 - cos[best] >= threshold:
            z[best, i] = slopes[best]
    return z


@pytest.mark.parametrize("scale", nm.SCALES)
@pytest.mark.parametrize("lamda", [0.0, 0.85, 1.0])
def test_merge_matrix_bn_matches_a_per_pair_loop(scale, lamda):
    rng = np.random.default_rng(3)
    n = 12
    v = rng.normal(size=(n, 5))
    v[7] = 0.5 * v[2] + 0.05 * rng.normal(size=5)  # A near-duplicate to be picked.
    gamma = rng.uniform(-0.2, 1.5, n)  # Some negative γ: exact mode must skip those pairs.
    beta, mean = rng.normal(size=n), rng.normal(size=n)
    var = rng.uniform(0.3, 2.0, n)
    keep = np.array([0, 2, 3, 5, 9, 11])
    args = (v, keep, gamma, beta, mean, var, 1e-3, 0.1, lamda, scale)
    np.testing.assert_allclose(nm.merge_matrix_bn(*args), _loop_bn_matrix(*args), rtol=1e-10)


def test_bn_lamda_trades_cosine_against_bias():
    # Pruned neuron 2 is nearly parallel to kept 0 (the cosine-best partner), but kept 0 has a
    # very different BatchNorm offset, so kept 1 is the bias-best partner.
    v = np.array([[1.0, 0.0], [1.0, 0.3], [1.0, 0.02]])
    keep = np.array([0, 1])
    gamma, var = np.ones(3), np.ones(3)
    mean = np.zeros(3)
    beta = np.array([2.0, 0.0, 0.0])  # Neuron 0 has a very different offset.
    args = dict(epsilon=0.0, threshold=None, scale="exact")
    z_cos = nm.merge_matrix_bn(v, keep, gamma, beta, mean, var, lamda=1.0, **args)
    z_bias = nm.merge_matrix_bn(v, keep, gamma, beta, mean, var, lamda=0.0, **args)
    assert z_cos[0, 2] > 0 and z_cos[1, 2] == 0
    assert z_bias[1, 2] > 0 and z_bias[0, 2] == 0
    # Exact slope for unit γ and σ is the norm ratio.
    np.testing.assert_allclose(z_bias[1, 2], np.linalg.norm(v[2]) / np.linalg.norm(v[1]))


def test_merge_matrix_mostsim_and_threshold():
    v = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 0.1, 0.0], [0.0, 0.0, 2.0]])
    keep = np.array([0, 1])
    z = nm.merge_matrix(v, keep, threshold=0.45)
    assert z.shape == (2, 4)
    np.testing.assert_allclose(z[:, :2], np.eye(2))
    np.testing.assert_allclose(z[:, 2], [np.linalg.norm(v[2]), 0.0])  # Into neuron 0.
    np.testing.assert_allclose(z[:, 3], 0.0)  # Orthogonal to both: only pruned.
    # No threshold merges neuron 3 too (into the first of the tied partners).
    assert np.count_nonzero(nm.merge_matrix(v, keep, threshold=None)[:, 3]) == 1


# ---------------------------------------------------------------------------------------------
# Pruning equals removing the kept units' complement (an independent zeroing computation).


def _zero_inputs(model, consumer, channels, positions=1):
    """Copy of ``model`` whose ``consumer`` ignores the given input channels."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    layer = copy.get_layer(consumer)
    kernel = layer.kernel.numpy()
    if kernel.ndim == 2:
        blocks = kernel.reshape(positions, -1, kernel.shape[-1])
        blocks[:, channels, :] = 0.0
        kernel = blocks.reshape(kernel.shape)
    else:
        kernel[:, :, channels, :] = 0.0
    layer.kernel.assign(kernel)
    return copy


def test_prune_only_equals_ignoring_the_removed_channels():
    model = _conv_bn_model(bias=True)
    x = _x((8, 8, 2))
    pruned, _ = nm.compress(model, 0.5, criterion="l1-norm", merge=False)
    # Kept channels by an independent l1 computation on the kernels (BN: no bias in the vector).
    expected = model
    previous = np.arange(2)  # Kept input channels of the current layer.
    for name, consumer, positions in (("c1", "c2", 1), ("c2", "fc1", 16), ("fc1", "fc2", 1)):
        kernel = model.get_layer(name).get_weights()[0]
        n = kernel.shape[-1]
        vectors = kernel.reshape(-1, n).T
        if name == "fc1":  # No BatchNorm: the bias is part of the neuron vector.
            vectors = np.concatenate([vectors, model.get_layer(name).bias.numpy()[:, None]], 1)
        norms = np.abs(vectors).sum(axis=1)
        keep = np.sort(np.argsort(-norms)[: int(round(n * 0.5))])
        # Prune-only is slicing: kept inputs (per flattened position) and kept outputs.
        if kernel.ndim == 4:
            sliced = kernel[:, :, previous, :][..., keep]
        else:
            channels_in = 5 if name == "fc1" else 7
            blocks = kernel.reshape(-1, channels_in, n)  # (positions, channels in, n)
            sliced = blocks[:, previous, :].reshape(-1, n)[:, keep]
        np.testing.assert_array_equal(pruned.get_layer(name).get_weights()[0], sliced)
        previous = keep
        removed = np.setdiff1d(np.arange(n), keep)
        expected = _zero_inputs(expected, consumer, removed, positions)
    assert_close(_predict(pruned, x), _predict(expected, x))
    assert pruned.count_params() < model.count_params()


def test_vgg16_chain_prunes_every_conv_and_fc1():
    model = models.vgg16(input_shape=(28, 28, 1), width_multiplier=0.0625, seed=0)
    assert nm.prunable_layers(model) == [f"conv{i}" for i in range(1, 14)] + ["fc1"]
    merged, report = nm.compress(model, 0.5, threshold=0.0)
    assert all(r.batch_norm is not None for r in report.layers)
    assert all(r.merged == r.units - r.kept for r in report.layers)  # Threshold 0: all merged.
    assert merged.get_layer("fc2").kernel.shape == (16, 10)
    assert merged.output_shape == model.output_shape


def test_residual_blocks_prune_only_the_inner_conv():
    model = models.resnet20(input_shape=(8, 8, 3), width_multiplier=0.5, seed=0)
    names = nm.prunable_layers(model)
    assert names == [f"stage{s}_block{b}_conv1" for s in (1, 2, 3) for b in (1, 2, 3)]
    x = _x((8, 8, 3), n=8)
    pruned, _ = nm.compress(model, 0.5, merge=False)
    expected = model
    for name in names:
        kernel = model.get_layer(name).get_weights()[0]
        n = kernel.shape[-1]
        keep = criteria.select(kernel.reshape(-1, n).T, nm.keep_count(n, 0.5), "l1-norm")
        assert pruned.get_layer(name).filters == len(keep)
        consumer = name.replace("conv1", "conv2")
        expected = _zero_inputs(expected, consumer, np.setdiff1d(np.arange(n), keep))
    assert_close(_predict(pruned, x), _predict(expected, x))
    merged, _ = nm.compress(model, 0.5)  # The BN variant runs through the residual graph too.
    assert merged.count_params() == pruned.count_params() < model.count_params()


# ---------------------------------------------------------------------------------------------
# The result is an ordinary smaller Keras model; the input is untouched.


def test_input_untouched_result_smaller_and_round_trips(tmp_path):
    model = _conv_bn_model()
    before = [w.copy() for w in model.get_weights()]
    merged, _ = nm.compress(model, 0.5, criterion="l2-GM")
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert merged.count_params() < model.count_params()
    assert merged.get_layer("c1").filters == 3 and merged.get_layer("fc1").units == 4
    path = str(tmp_path / "merged.keras")
    merged.save(path)
    loaded = keras.models.load_model(path)
    x = _x((8, 8, 2), n=8)
    assert_close(_predict(loaded, x), _predict(merged, x))


def test_sequential_model_and_ratio_zero():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(8, name="a"),
            keras.layers.ReLU(name="relu"),
            keras.layers.Dropout(0.2, name="drop"),
            keras.layers.Dense(2, name="b"),
        ]
    )
    same, _ = nm.compress(model, 0.0)
    x = _x((5,))
    assert_close(_predict(same, x), _predict(model, x))
    smaller, report = nm.compress(model, 0.5)
    assert isinstance(smaller, keras.Sequential) and smaller.get_layer("a").units == 4
    assert (report.params_before, report.params_after) == (
        model.count_params(),
        smaller.count_params(),
    )
    assert report.criterion == "l1-norm" and report.merge
    decoded = json.loads(report.to_json())
    assert decoded["params_after"] == smaller.count_params()
    assert decoded["layers"][0]["kept"] == 4


def test_keep_count_rounds_like_the_reference():
    assert [nm.keep_count(300, r) for r in (0.5, 0.6, 0.7, 0.8)] == [150, 120, 90, 60]
    assert nm.keep_count(5, 0.5) == 2  # round(2.5) = 2, half to even.
    assert nm.keep_count(1, 0.9) == 1  # Never empty.


# ---------------------------------------------------------------------------------------------
# Bad input says what is wrong.


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_prune_fraction_outside_unit_interval(fraction):
    with pytest.raises(ValueError, match=r"`prune_fraction` for layer .* must be in \[0, 1\)"):
        nm.compress(_dense_model(), fraction)


def test_bad_arguments():
    model = _dense_model()
    with pytest.raises(TypeError, match="must be a number"):
        nm.compress(model, "half")
    with pytest.raises(ValueError, match="`criterion` must be one of"):
        nm.compress(model, 0.5, criterion="l3")
    with pytest.raises(ValueError, match="`scale` must be one of"):
        nm.compress(model, 0.5, scale="approximate")
    with pytest.raises(ValueError, match=r"`lamda` must be in \[0, 1\]"):
        nm.compress(model, 0.5, lamda=2.0)
    with pytest.raises(TypeError, match="must be a keras.Model"):
        nm.compress(model.get_layer("hidden"), 0.5)
    with pytest.raises(ValueError, match="not a Dense/Conv2D layer"):
        nm.compress(model, {"nope": 0.5})
    with pytest.raises(ValueError, match="'out': its units are the model's output"):
        nm.compress(model, {"out": 0.5})


def test_residual_add_cannot_be_pruned_by_name():
    model = models.resnet20(input_shape=(8, 8, 3), width_multiplier=0.25)
    with pytest.raises(ValueError, match="join others in Add"):
        nm.compress(model, {"stage1_block1_conv2": 0.5})


def test_unsupported_layer_is_named():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(6, activation="relu", name="hidden")(inputs)
    x = keras.layers.LayerNormalization(name="ln")(x)
    outputs = keras.layers.Dense(2, name="out")(x)
    model = keras.Model(inputs, outputs)
    with pytest.raises(ValueError, match="LayerNormalization 'ln'.*cannot trace through"):
        nm.compress(model, 0.5)
    with pytest.raises(ValueError, match="cannot trace through"):
        nm.prunable_layers(model)


def test_grouped_convolution_is_named():
    inputs = keras.Input((6, 6, 4))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c")(inputs)
    x = keras.layers.Conv2D(4, 3, groups=2, activation="relu", name="g")(x)
    outputs = keras.layers.Dense(2, name="out")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    with pytest.raises(ValueError, match="Cannot prune layer 'c'.*grouped convolution"):
        nm.compress(model, 0.5)
    with pytest.raises(ValueError, match="Cannot prune layer 'g'.*grouped convolution"):
        nm.compress(model, {"g": 0.5})


def test_merging_through_a_batch_norm_after_the_activation_is_refused():
    """Such a BatchNorm is not the layer's own: pruning takes it along (see the standalone
    BatchNorm test below), merging through its offset would not be exact."""
    inputs = keras.Input((4,))
    x = keras.layers.Dense(6, activation="relu", name="hidden")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(x))
    with pytest.raises(ValueError, match="'hidden': its activation 'a BatchNormalization reach"):
        nm.compress(model, 0.5)
    pruned, _ = nm.compress(model, 0.5, merge=False)
    assert pruned.get_layer("bn").gamma.shape == (3,)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "elu", "gelu"])
def test_non_homogeneous_activation_refuses_to_merge_but_prunes(activation):
    model = _dense_model(activation=activation)
    with pytest.raises(ValueError, match="not positively homogeneous"):
        nm.compress(model, 0.5)
    pruned, _ = nm.compress(model, 0.5, merge=False)
    assert pruned.get_layer("hidden").units == 3


def test_softmax_hidden_layer_cannot_even_be_pruned():
    with pytest.raises(ValueError, match="'softmax' is not element-wise"):
        nm.compress(_dense_model(activation="softmax"), 0.5, merge=False)


def test_capped_relu_refuses_to_merge():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(6, name="hidden")(inputs)
    x = keras.layers.ReLU(max_value=6.0, name="relu6")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(x))
    with pytest.raises(ValueError, match="not positively homogeneous"):
        nm.compress(model, 0.5)


# ---------------------------------------------------------------------------------------------
# The published numbers (same weights and test set as the paper).


@pytest.mark.skipif(not os.path.exists(NPZ), reason="reference LeNet-300-100 weights not found")
def test_reproduces_published_lenet300_l1_cells_at_half():
    try:
        images, labels = data.load(split="test", source="idx")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST IDX files not found")
    x = data.normalize(images, "symmetric")
    model = torch_weights.lenet_300_100_from_torch_npz(NPZ)
    assert training.accuracy(model, x, labels) == pytest.approx(0.8980, abs=1e-6)
    pruned, _ = nm.compress(model, 0.5, merge=False)
    merged, _ = nm.compress(model, 0.5, threshold=0.45)
    assert training.accuracy(pruned, x, labels) == pytest.approx(0.8840, abs=5e-4)
    assert training.accuracy(merged, x, labels) == pytest.approx(0.8869, abs=5e-4)
    assert merged.count_params() == 784 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10


@pytest.mark.parametrize("separate_softmax", [False, True])
def test_output_units_are_never_pruned(separate_softmax):
    """A float ratio prunes every hidden layer and leaves the output layer whole, even when
    its activation (softmax, applied in the layer or by an Activation layer after it)
    mixes units; naming the output layer is refused."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, activation="relu", name="h1")(inputs)
    x = keras.layers.Dense(8, activation="relu", name="h2")(x)
    if separate_softmax:
        outputs = keras.layers.Activation("softmax")(keras.layers.Dense(4, name="predictions")(x))
    else:
        outputs = keras.layers.Dense(4, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs)
    assert nm.prunable_layers(model) == ["h1", "h2"]
    merged, _ = nm.compress(model, 0.5)
    assert [merged.get_layer(n).units for n in ("h1", "h2", "predictions")] == [4, 4, 4]
    with pytest.raises(ValueError, match="'predictions': its units are the model's output"):
        nm.compress(model, {"predictions": 0.5})


def test_prune_only_takes_a_standalone_batch_norm_with_the_channels_it_normalizes():
    """A BatchNorm reached through an activation (not the layer's own) is an affine map per
    channel: pruning slices its parameters with the channels; merging through it, whose
    offset a kept channel's multiple does not pass, is refused."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(6, 3, activation="relu", name="c1")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3, name="c2")(h))
    rng = np.random.default_rng(1)
    model.get_layer("c1").bias.assign(rng.normal(size=6))
    bn = model.get_layer("bn")
    for variable, values in zip(
        (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance),
        (rng.uniform(0.5, 1.5, 6), rng.normal(size=6), rng.normal(size=6), rng.uniform(0.5, 2, 6)),
    ):
        variable.assign(values)
    pruned, _ = nm.compress(model, {"c1": 0.5}, criterion="l1-norm", merge=False)
    kernel, bias = (w for w in model.get_layer("c1").get_weights())
    vectors = np.concatenate([kernel.reshape(-1, 6).T, bias[:, None]], axis=1)
    keep = np.sort(np.argsort(-np.abs(vectors).sum(axis=1))[:3])
    # The reference: the same graph at width 3, built from the kept channels' weights.
    reference = keras.models.clone_model(pruned)
    reference.get_layer("c1").set_weights([kernel[..., keep], bias[keep]])
    reference.get_layer("bn").set_weights([w[keep] for w in bn.get_weights()])
    c2 = model.get_layer("c2").get_weights()
    reference.get_layer("c2").set_weights([c2[0][:, :, keep, :], c2[1]])
    x = _x((8, 8, 3))
    assert_close(pruned(x), reference(x))
    with pytest.raises(ValueError, match="BatchNormalization reached through other layers"):
        nm.compress(model, {"c1": 0.5})

"""Depthwise convolutions and standalone BatchNorms: channel-wise units that join their input
channels' coupled group (a MobileNet inverted-residual block and a pre-activation BatchNorm,
small enough to run in seconds)."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    FLOAT32_TOLERANCE,
    assert_close,
    export_with_task_parity,
    with_batch_norm_statistics,
)

import mtz_tf
from mtz_tf import cost, data, graph, models, zipped_network
from mtz_tf.compress import neuron_merging as nm
from mtz_tf.layers import ZippedBatchNormalization, ZippedDepthwiseConv2D


def mobile_block_model(seed: int) -> keras.Model:
    """Stem, an inverted-residual block (expand, padded depthwise, project, Add), a
    pre-activation BatchNorm after the Add and a strided depthwise conv with bias before
    the head: every way a channel-wise unit joins a group."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    stream = keras.layers.ReLU(6.0, name="stem_relu")(x)
    x = keras.layers.Conv2D(12, 1, use_bias=False, name="expand")(stream)
    x = keras.layers.BatchNormalization(name="expand_bn")(x)
    x = keras.layers.ReLU(6.0, name="expand_relu")(x)
    x = keras.layers.ZeroPadding2D(1, name="pad")(x)
    x = keras.layers.DepthwiseConv2D(3, use_bias=False, name="dw")(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.ReLU(6.0, name="dw_relu")(x)
    x = keras.layers.Conv2D(6, 1, use_bias=False, name="project")(x)
    x = keras.layers.BatchNormalization(name="project_bn")(x)
    x = keras.layers.Add(name="add")([stream, x])
    x = keras.layers.BatchNormalization(name="post_bn")(x)
    x = keras.layers.Activation("relu", name="post_relu")(x)
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", activation="relu", name="dw2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x), name=f"mobile{seed}")
    return with_batch_norm_statistics(model, seed, gamma=(0.5, 1.0), variance=(0.8, 1.2))


@pytest.fixture(scope="module")
def block():
    x = np.random.default_rng(0).normal(size=(16, 12, 12, 3)).astype(np.float32)
    return mobile_block_model(0), x, data.to_dataset(x, batch_size=8)


def test_channelwise_units_join_their_input_group():
    plan = graph.read_plan(mobile_block_model(0))
    names = [u.name for u in plan.units]
    assert names == ["stem", "expand", "dw", "project", "post_bn", "dw2", "head"]
    kinds = {u.name: u.kind for u in plan.units}
    assert kinds["dw"] == kinds["dw2"] == "DepthwiseConv2D"
    assert kinds["post_bn"] == "BatchNormalization"
    assert plan.units[names.index("post_bn")].activation == "relu"
    groups = [[names[u] for u in g] for g in plan.zip_groups()]
    assert groups == [["stem", "project", "post_bn", "dw2"], ["expand", "dw"]]
    zip_groups = plan.zip_groups()
    # Channel-wise units are writers of their group, not readers of it.
    assert plan.input_group(names.index("dw"), zip_groups) is None
    assert plan.input_group(names.index("project"), zip_groups) == 1
    assert plan.input_group(names.index("head"), zip_groups) == 0


def test_depthwise_refusals_name_the_layer():
    def model(layer, first=True):
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3)(inputs) if first else inputs
        x = layer(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(2)(x))

    with pytest.raises(ValueError, match="'dm' uses depth_multiplier=2"):
        graph.read_plan(model(keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dm")))
    with pytest.raises(ValueError, match="'first' reads the model input"):
        graph.read_plan(model(keras.layers.DepthwiseConv2D(3, name="first"), first=False))
    with pytest.raises(ValueError, match="'bn0' normalizes the model input"):
        graph.read_plan(model(keras.layers.BatchNormalization(name="bn0"), first=False))


def _pairwise_costs_by_inverses(w_a, w_b, h_a, h_b):
    """The paper's ½ dᵀ (H_A⁻¹ + H_B⁻¹)⁻¹ d pair by pair, with explicit inverses."""
    costs = np.zeros((w_a.shape[1], w_b.shape[1]))
    for i in range(w_a.shape[1]):
        for j in range(w_b.shape[1]):
            d = w_a[:, i] - w_b[:, j]
            m = np.linalg.inv(np.linalg.inv(h_a[i]) + np.linalg.inv(h_b[j]))
            costs[i, j] = 0.5 * d @ m @ d
    return costs


def _spd(rng, n, d):
    x = rng.normal(size=(n, 3 * d, d))
    return np.einsum("nkp,nkq->npq", x, x) / (3 * d) + 0.1 * np.eye(d)


def test_per_neuron_merge_costs_and_weights():
    rng = np.random.default_rng(0)
    d, n_a, n_b = 5, 4, 6
    w_a, w_b = rng.normal(size=(d, n_a)), rng.normal(size=(d, n_b))
    h_a, h_b = _spd(rng, n_a, d), _spd(rng, n_b, d)
    costs = cost.merge_costs(w_a, w_b, h_a, h_b, damping=0.0).numpy()
    expected = _pairwise_costs_by_inverses(w_a, w_b, h_a, h_b)
    np.testing.assert_allclose(costs, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())
    # A tie of channel c of every task: (Σ H_t,c)⁻¹ Σ H_t,c w_t,c, cost at the optimum.
    weights, hessians = [w_a, w_b[:, :n_a]], [h_a, h_b[:n_a]]
    merged = cost.merged_weights(weights, hessians, damping=0.0).numpy()
    for c in range(n_a):
        rhs = sum(h[c] @ w[:, c] for w, h in zip(weights, hessians))
        np.testing.assert_allclose(merged[:, c], np.linalg.solve(h_a[c] + h_b[c], rhs))
    tie = cost.tie_costs(weights, hessians, damping=0.0).numpy()
    np.testing.assert_allclose(tie, np.diag(expected[:, :n_a]), rtol=1e-9)


def test_zipped_depthwise_layer_is_a_depthwise_conv_per_task():
    rng = np.random.default_rng(1)
    layer = ZippedDepthwiseConv2D(
        ["a", "b"],
        units=[5, 4],
        shared_units=3,
        common_input=False,
        kernel_size=(3, 3),
        strides=(2, 2),
        padding="same",
        activation="relu",
    )
    xs = [rng.normal(size=(2, 7, 7, n)).astype("float32") for n in (5, 4)]
    outputs = layer(xs)
    for t, task in enumerate(["a", "b"]):
        kernel, bias = layer.task_weights(task)
        plain = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", activation="relu")
        plain.build(xs[t].shape)
        plain.set_weights([np.swapaxes(kernel.numpy(), -1, -2), bias.numpy()])
        assert_close(outputs[t], plain(xs[t]))
        (task_layer,) = layer.task_layers(task)
        assert_close(task_layer(xs[t]), outputs[t])
    restored = ZippedDepthwiseConv2D.from_config(layer.get_config())
    restored.build(None)
    restored.set_weights(layer.get_weights())
    for a, b in zip(restored(xs), outputs):
        assert_close(a, b)


def test_zipped_batch_norm_layer_is_each_tasks_batch_norm():
    rng = np.random.default_rng(2)
    layer = ZippedBatchNormalization(
        ["a", "b"],
        units=[4, 6],
        shared_units=2,
        common_input=False,
        batch_norm={"epsilon": 1e-3, "momentum": 0.99},
        activation="relu",
    )
    xs = [rng.normal(size=(3, 5, 5, n)).astype("float32") for n in (4, 6)]
    layer(xs)
    for norm in layer.norms:
        norm.moving_mean.assign(rng.normal(size=norm.moving_mean.shape))
        norm.gamma.assign(rng.uniform(0.5, 1.5, size=norm.gamma.shape))
    assert layer.parameter_counts() == (0, 4 * (4 + 6))
    outputs = layer(xs)
    for t, task in enumerate(["a", "b"]):
        expected = tf.nn.relu(layer.norms[t](xs[t], training=False))
        assert_close(outputs[t], expected)
        x = xs[t]
        for plain in layer.task_layers(task):
            x = plain(x)
        assert_close(x, expected)


@pytest.mark.parametrize("batch_norm", ["task", "fold"])
def test_block_zipped_with_a_permuted_copy_is_the_original(block, batch_norm):
    model, x, calibration = block
    permuted = models.permute_hidden(model, seed=3)
    expected = model(x)
    assert_close(permuted(x), expected)
    zipped, report = mtz_tf.zip_models(
        {"a": model, "b": permuted},
        {"a": calibration, "b": calibration},
        batch_norm=batch_norm,
        repair="none",  # exact recovery: keep the synthetic BatchNorm statistics
        verbose=0,
    )
    outputs = zipped(x)
    for task in ("a", "b"):
        assert_close(outputs[task], expected)
        assert_close(zipped_network.task_model(zipped, task)(x), expected)
    assert all(layer.shared == min(layer.widths.values()) for layer in report.layers)
    scale = max(float(np.abs(w).max()) for w in model.get_weights()) ** 2
    assert max(layer.merge_cost for layer in report.layers) < 1e-10 * scale


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_block_shares_count_parameters_consistently(block, share):
    """share=0 gives back both models; at any share every task's plain model holds the
    shared parameters once each, so Σ_t |task model| = total + (T − 1)·shared."""
    model, x, calibration = block
    other = mobile_block_model(1)
    zipped, report = mtz_tf.zip_models(
        {"a": model, "b": other}, {"a": calibration, "b": calibration}, share=share, verbose=0
    )
    task_models = {t: zipped_network.task_model(zipped, t) for t in ("a", "b")}
    sizes = sum(m.count_params() for m in task_models.values())
    parameters = report.parameters
    assert sizes == parameters["total"] + parameters["shared"]
    if share == 0.0:
        assert_close(zipped(x)["a"], model(x))
        assert_close(zipped(x)["b"], other(x))
        assert parameters["shared"] == 0
        assert parameters["total"] == model.count_params() + other.count_params()
    else:
        shared = {layer.name: layer.shared for layer in report.layers}
        assert shared == {"stem": 3, "expand": 6, "dw": 6, "project": 3, "post_bn": 3, "dw2": 3}
        assert parameters["shared"] > 0 and parameters["total"] < parameters["input_models"]


def test_zipped_block_exports_with_parity(block, tmp_path):
    model, x, calibration = block
    other = mobile_block_model(1)
    zipped, _ = mtz_tf.zip_models(
        {"a": model, "b": other}, {"a": calibration, "b": calibration}, share=0.5, verbose=0
    )
    out_dir = str(tmp_path / "mobile")
    result = export_with_task_parity(zipped, out_dir, x)
    expected = zipped(x)
    scale = max(1.0, max(float(np.abs(v).max()) for v in expected.values()))
    assert max(result["parity"]["tflite"].values()) <= FLOAT32_TOLERANCE * scale
    reloaded = keras.saving.load_model(os.path.join(out_dir, "model.keras"))
    for task in ("a", "b"):
        assert_close(reloaded(x)[task], expected[task])


def test_a_third_task_joins_and_a_checkpointed_zip_resumes(block, tmp_path):
    model, x, calibration = block
    expected = model(x)
    first, second = models.permute_hidden(model, seed=3), models.permute_hidden(model, seed=4)
    calibrations = {"a": calibration, "b": calibration}
    exact = dict(repair="none", verbose=0)  # keeps the synthetic BatchNorm statistics
    zipped, _ = mtz_tf.zip_models({"a": model, "b": first}, calibrations, **exact)
    joined, report = mtz_tf.add_task(
        zipped, "c", second, {**calibrations, "c": calibration}, **exact
    )
    for task in ("a", "b", "c"):
        assert_close(joined(x)[task], expected)
    assert all(layer.shared == min(layer.widths.values()) for layer in report.layers)
    options = dict(share=0.5, verbose=0, checkpoint_dir=str(tmp_path / "ckpt"))
    done, _ = mtz_tf.zip_models({"a": model, "b": first}, calibrations, **options)
    resumed, _ = mtz_tf.zip_models({"a": model, "b": first}, calibrations, **options)
    for task in ("a", "b"):
        assert_close(resumed(x)[task], done(x)[task])


def squeeze_excite_model(seed: int, mean=(0.4, 0.5, 0.6)) -> keras.Model:
    """EfficientNet's block in small: input Rescaling and Normalization, a depthwise conv
    with a squeeze-excite gate (GAP -> Reshape -> reduce -> expand, sigmoid) multiplied
    onto its channels, swish activations."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((10, 10, 3))
    x = keras.layers.Rescaling(1 / 255.0, name="scale")(inputs)
    x = keras.layers.Normalization(mean=list(mean), variance=[0.05, 0.08, 0.1], name="normalize")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(x)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.Activation("swish", name="stem_act")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.Activation("swish", name="dw_act")(x)
    gate = keras.layers.GlobalAveragePooling2D(name="squeeze")(x)
    gate = keras.layers.Reshape((1, 1, 8), name="se_reshape")(gate)
    gate = keras.layers.Conv2D(3, 1, activation="swish", name="se_reduce")(gate)
    gate = keras.layers.Conv2D(8, 1, activation="sigmoid", name="se_expand")(gate)
    x = keras.layers.Multiply(name="excite")([x, gate])
    x = keras.layers.Conv2D(6, 1, use_bias=False, name="project")(x)
    x = keras.layers.BatchNormalization(name="project_bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name=f"se{seed}")
    return with_batch_norm_statistics(model, seed, gamma=(0.5, 1.0), variance=(0.8, 1.2))


def test_squeeze_excite_gate_joins_the_group_it_multiplies():
    model = squeeze_excite_model(0)
    plan = graph.read_plan(model)
    names = [u.name for u in plan.units]
    groups = [[names[u] for u in g] for g in plan.zip_groups()]
    assert groups == [["stem", "dw", "se_expand"], ["se_reduce"], ["project"]]
    x = np.random.default_rng(1).uniform(0, 255, size=(12, 10, 10, 3)).astype(np.float32)
    calibration = data.to_dataset(x, batch_size=6)
    permuted = models.permute_hidden(model, seed=5)
    expected = model(x)
    assert_close(permuted(x), expected)
    zipped, report = mtz_tf.zip_models(
        {"a": model, "b": permuted}, {"a": calibration, "b": calibration}, repair="none", verbose=0
    )
    for task in ("a", "b"):
        assert_close(zipped(x)[task], expected)
        assert_close(zipped_network.task_model(zipped, task)(x), expected)
    assert all(layer.shared == min(layer.widths.values()) for layer in report.layers)
    other = squeeze_excite_model(1)
    apart, _ = mtz_tf.zip_models(
        {"a": model, "b": other}, {"a": calibration, "b": calibration}, share=0.0, verbose=0
    )
    assert_close(apart(x)["b"], other(x))


def test_normalization_is_taken_on_the_model_input_only():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.Normalization(mean=[0.0] * 4, variance=[1.0] * 4, name="late")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    late = keras.Model(inputs, keras.layers.Dense(2)(x))
    with pytest.raises(ValueError, match="'late' normalizes the outputs of zippable layers"):
        graph.read_plan(late)
    a, b = squeeze_excite_model(0), squeeze_excite_model(0, mean=(0.0, 0.5, 0.6))
    calibration = data.to_dataset(np.zeros((4, 10, 10, 3), np.float32), batch_size=4)
    with pytest.raises(ValueError, match="at layer 'normalize': mean"):
        mtz_tf.zip_models({"a": a, "b": b}, {"a": calibration, "b": calibration}, verbose=0)


def test_neuron_merging_prunes_a_squeeze_excite_block_with_its_gate():
    """A conv whose channels a squeeze-excite gate scales loses the gate's outputs with its
    pruned channels; dead channels (ReLU of a negative constant) go exactly; merging is
    refused, since the gate scales each channel by its own factor."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(10, 3, padding="same", name="body")(inputs)
    x = keras.layers.BatchNormalization(name="body_bn")(x)
    x = keras.layers.ReLU(name="body_relu")(x)
    gate = keras.layers.GlobalAveragePooling2D()(x)
    gate = keras.layers.Dense(4, activation="relu", name="se_reduce")(gate)
    gate = keras.layers.Dense(10, name="se_expand")(gate)
    gate = keras.layers.Activation("sigmoid")(gate)
    gate = keras.layers.Reshape((1, 1, 10))(gate)
    x = keras.layers.Multiply(name="excite")([x, gate])
    x = keras.layers.Conv2D(5, 1, name="project")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    model = with_batch_norm_statistics(model, 0)
    bn = model.get_layer("body_bn")
    gamma, beta = bn.gamma.numpy(), bn.beta.numpy()
    gamma[[2, 7]], beta[[2, 7]] = 0.0, -1.0
    bn.gamma.assign(gamma)
    bn.beta.assign(beta)
    assert nm.prunable_layers(model) == ["body", "se_reduce", "project"]
    pruned, report = nm.compress(model, {"body": 0.2}, criterion="l1-norm", merge=False)
    assert pruned.get_layer("se_expand").units == 8 and pruned.get_layer("body").filters == 8
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
    kept = report.layers[0].kept
    assert kept == 8
    with pytest.raises(ValueError, match="squeeze-excite gate 'se_expand'"):
        nm.compress(model, {"body": 0.2})
    # Prune exactly the dead channels: zero their filters so that l1-norm ranks them last.
    body = model.get_layer("body")
    kernel = body.kernel.numpy()
    kernel[..., [2, 7]] = 0.0
    body.kernel.assign(kernel)
    pruned, _ = nm.compress(model, {"body": 0.2}, merge=False)
    assert_close(pruned(x), model(x))

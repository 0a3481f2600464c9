"""Models nobody here wrote: keras.applications families (weights=None, 32x32 inputs).

ResNet50, ResNet50V2 (pre-activation BatchNorm), MobileNetV2 (depthwise convolutions),
EfficientNetB0 (input Normalization, squeeze-excite gates) and MobileNetV3Small (hard sigmoid
written with Keras ops, a 1×1-convolution head flattened before its softmax) zip; the families
whose layers the reader does not represent yet (BatchNorm over DenseNet's concatenations) are
refused with an error that names the first such layer.
"""

import keras
import numpy as np
import pytest
from conftest import assert_close, export_with_task_parity, with_batch_norm_statistics

import mtz_tf
from mtz_tf import data, graph, models, zipped_network
from mtz_tf.compress import ista
from mtz_tf.compress import neuron_merging as nm

SHAPE = (32, 32, 3)


def _randomized_batch_norm(model, seed):
    """BatchNorm statistics as training would leave them, with the variances near 1 so that
    activations stay O(1) through 50 layers."""
    return with_batch_norm_statistics(model, seed, gamma=(0.5, 1.0), variance=(0.8, 1.2))


@pytest.fixture(scope="module")
def resnet50():
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=SHAPE, classes=10)
    return _randomized_batch_norm(model, 1)


@pytest.fixture(scope="module")
def images():
    x = np.random.default_rng(0).normal(size=(8,) + SHAPE).astype(np.float32)
    return x, data.to_dataset(x, batch_size=8)


def _recovers_from_a_permuted_copy(model, x, calibration, share=1.0):
    """Zips ``model`` with a unit-permuted copy of itself at ``share`` and checks that both
    tasks compute the original, at no merge cost; returns ``(zipped, report)``."""
    permuted = models.permute_hidden(model, seed=3)
    expected = model(x)
    assert_close(permuted(x), expected)
    zipped, report = mtz_tf.zip_models(
        {"a": model, "b": permuted},
        {"a": calibration, "b": calibration},
        share=share,
        repair="none",  # exact recovery: keep the synthetic BatchNorm statistics
        verbose=0,
    )
    outputs = zipped(x)
    assert_close(outputs["a"], expected)
    assert_close(outputs["b"], expected)
    if share == 1.0:
        assert all(layer.shared == min(layer.widths.values()) for layer in report.layers)
    assert max(layer.merge_cost for layer in report.layers) < 1e-8
    return zipped, report


@pytest.mark.slow
def test_resnet50_zipped_with_a_permuted_copy_is_the_original(resnet50, images):
    x, calibration = images
    _, report = _recovers_from_a_permuted_copy(resnet50, x, calibration)
    assert len(report.layers) == 53 and len(report.coupled_groups) == 4


@pytest.mark.slow
def test_resnet50_share_zero_keeps_both_models(resnet50, images):
    x, calibration = images
    other = _randomized_batch_norm(
        keras.applications.ResNet50(weights=None, input_shape=SHAPE, classes=10), 2
    )
    zipped, report = mtz_tf.zip_models(
        {"a": resnet50, "b": other}, {"a": calibration, "b": calibration}, share=0.0, verbose=0
    )
    outputs = zipped(x)
    assert_close(outputs["a"], resnet50(x))
    assert_close(outputs["b"], other(x))
    assert report.parameters["shared"] == 0
    assert report.parameters["total"] == resnet50.count_params() + other.count_params()


@pytest.fixture(scope="module")
def mobilenet_v2():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=SHAPE, classes=10, alpha=0.35)
    return _randomized_batch_norm(model, 1)


@pytest.mark.slow
def test_mobilenet_v2_zipped_with_a_permuted_copy_is_the_original(mobilenet_v2, images):
    """Every depthwise convolution joins its expansion's group (the stem's for the first)."""
    x, calibration = images
    _, report = _recovers_from_a_permuted_copy(mobilenet_v2, x, calibration)
    names = [layer.name for layer in report.layers]
    assert len(names) == 52 and sum(name.endswith("depthwise") for name in names) == 17
    groups = [set(members) for members in report.coupled_groups]
    assert {"block_1_expand", "block_1_depthwise"} in groups
    assert {"Conv1", "expanded_conv_depthwise"} in groups


@pytest.mark.slow
def test_resnet50_v2_zipped_with_a_permuted_copy_is_the_original(images):
    """Pre-activation BatchNorms join the stream they normalize."""
    keras.utils.set_random_seed(0)
    model = _randomized_batch_norm(
        keras.applications.ResNet50V2(weights=None, input_shape=SHAPE, classes=10), 1
    )
    x, calibration = images
    _, report = _recovers_from_a_permuted_copy(model, x, calibration)
    names = [layer.name for layer in report.layers]
    assert len(names) == 70 and "post_bn" in names
    stream = next(set(g) for g in report.coupled_groups if "conv2_block1_0_conv" in g)
    assert {"conv2_block1_3_conv", "conv2_block2_preact_bn", "conv3_block1_preact_bn"} <= stream


@pytest.mark.slow
def test_efficientnet_b0_zipped_with_a_permuted_copy_is_the_original(images):
    """Each squeeze-excite expansion joins the group of the channels its gate multiplies."""
    keras.utils.set_random_seed(0)
    model = _randomized_batch_norm(
        keras.applications.EfficientNetB0(weights=None, input_shape=SHAPE, classes=10), 1
    )
    x, calibration = images
    _, report = _recovers_from_a_permuted_copy(model, x, calibration)
    groups = [set(members) for members in report.coupled_groups]
    assert {"block2a_expand_conv", "block2a_dwconv", "block2a_se_expand"} in groups


@pytest.fixture(scope="module")
def mobilenet_v3():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV3Small(weights=None, input_shape=SHAPE, classes=10)
    return _randomized_batch_norm(model, 1)


@pytest.mark.slow
def test_mobilenet_v3_small_zipped_with_a_permuted_copy_is_the_original(mobilenet_v3, images):
    """The hard sigmoid's ops nodes are element-wise steps between a squeeze-excite expansion
    and the gate it multiplies; the head is the 1×1 convolution before Flatten and softmax."""
    x, calibration = images
    _, report = _recovers_from_a_permuted_copy(mobilenet_v3, x, calibration)
    groups = [set(members) for members in report.coupled_groups]
    assert {
        "expanded_conv_3_expand",
        "expanded_conv_3_depthwise",
        "expanded_conv_3_squeeze_excite_conv_1",
    } in groups
    assert len(report.layers) == 53 and report.layers[-1].name == "conv_2"


def test_mobilenet_v3_small_reads_its_ops_and_head(mobilenet_v3):
    plan = graph.read_plan(mobilenet_v3)
    assert plan.units[-1].name == "logits"
    assert [s.kind for s in plan.steps[plan.unit_step(len(plan.units) - 1) + 1 :]] == [
        "Flatten",
        "Activation",
    ]
    rescalings = [s.config for s in plan.steps if s.kind == "Rescaling"]
    hard_sigmoids = [c for c in rescalings if (c["scale"], c["offset"]) == (1.0, 3.0)]
    assert len(hard_sigmoids) == 9  # one per squeeze-excite block
    assert plan.steps[plan.output_step].name == "predictions"


def test_neuron_merging_and_ista_prune_mobilenet_v3_small(mobilenet_v3, images):
    """Pruning an expansion takes its depthwise channels and its squeeze-excite gate's
    outputs with it, through the ops-written hard sigmoid; dead channels go exactly."""
    x, _ = images
    model = keras.models.clone_model(mobilenet_v3)
    model.set_weights(mobilenet_v3.get_weights())
    dead = [1, 4]
    for name in ("expanded_conv_3_expand_bn", "expanded_conv_3_depthwise_bn"):
        bn = model.get_layer(name)
        gamma, beta = bn.gamma.numpy(), bn.beta.numpy()
        gamma[dead], beta[dead] = 0.0, -3.0  # hard_silu(-3) = 0: the channels carry nothing
        bn.gamma.assign(gamma)
        bn.beta.assign(beta)
    n = model.get_layer("expanded_conv_3_expand").filters
    pruned, _ = nm.compress(model, {"expanded_conv_3_expand": len(dead) / n}, merge=False)
    assert pruned.get_layer("expanded_conv_3_depthwise").kernel.shape[-2] == n - len(dead)
    assert pruned.get_layer("expanded_conv_3_squeeze_excite_conv_1").filters == n - len(dead)
    assert_close(pruned(x), model(x))
    with pytest.raises(ValueError, match="positively homogeneous"):  # hard_silu
        nm.compress(model, {"expanded_conv_3_expand": 0.5})
    bn = model.get_layer("conv_1_bn")  # the last convolution, read through pooling
    gamma, beta = bn.gamma.numpy(), bn.beta.numpy()
    gamma[dead], beta[dead] = 0.0, 0.7  # constant channels, absorbed by conv_2's bias
    bn.gamma.assign(gamma)
    bn.beta.assign(beta)
    removed = ista.remove_zero_channels(model)
    width = model.get_layer("conv_1").filters
    assert removed.get_layer("conv_1").filters == width - len(dead)
    assert_close(removed(x), model(x))
    smaller, report = nm.compress(mobilenet_v3, 0.5, merge=False)
    # Blocks 8-10 run on 1×1 maps at 32×32, where a gate (B, 1, 1, C) cannot be told from
    # the feature map it scales: their expansions stay whole.
    names = {entry.name for entry in report.layers}
    assert {"conv", "expanded_conv_3_expand", "expanded_conv_7_expand"} <= names
    assert "expanded_conv_8_expand" not in names
    assert "logits" not in {entry.name for entry in report.layers}
    assert smaller.count_params() < 0.75 * mobilenet_v3.count_params()


def test_neuron_merging_prunes_resnet50_where_no_stream_is_written(resnet50, images):
    """The stem and the inner convolutions of each bottleneck block are prunable (the
    others write a residual stream), the classifier never; the result is a smaller working
    model."""
    x, _ = images
    prunable = nm.prunable_layers(resnet50)
    assert len(prunable) == 33 and prunable[0] == "conv1_conv"
    assert all(name.endswith(("_1_conv", "_2_conv")) for name in prunable[1:])
    merged, report = nm.compress(resnet50, 0.5)
    assert merged.get_layer("conv2_block1_1_conv").filters == 32
    assert merged.get_layer("conv5_block3_2_conv").filters == 256
    assert merged.get_layer("conv5_block3_3_conv").filters == 2048
    assert merged.get_layer("predictions").units == 10
    assert merged.count_params() < 0.7 * resnet50.count_params()
    assert np.all(np.isfinite(merged(x).numpy())) and merged(x).shape == (8, 10)
    assert {entry.name for entry in report.layers} == set(prunable)


def test_ista_removes_dead_channels_of_resnet50_exactly(resnet50, images):
    """Channels whose BatchNorm scale is zero and whose ReLU(β) is zero carry nothing; ISTA's
    removal takes them out of the inner convolutions and the function stays the same."""
    x, _ = images
    model = keras.models.clone_model(resnet50)
    model.set_weights(resnet50.get_weights())
    for name in ("conv2_block1_1_bn", "conv4_block3_2_bn"):
        bn = model.get_layer(name)
        gamma, beta = bn.gamma.numpy(), bn.beta.numpy()
        gamma[:3], beta[:3] = 0.0, -0.5
        bn.gamma.assign(gamma)
        bn.beta.assign(beta)
    pruned = ista.remove_zero_channels(model)
    assert pruned.get_layer("conv2_block1_1_conv").filters == 61
    assert pruned.get_layer("conv4_block3_2_conv").filters == 253
    assert_close(pruned(x), model(x))


@pytest.fixture(scope="module")
def densenet():
    """keras.applications' DenseNet builder (which DenseNet121 calls with blocks [6, 12, 24,
    16]) with blocks [2, 1, 1, 1]: nested concatenations, BatchNorms and 1×1 convolutions
    reading several layers' outputs, transitions and a head on the whole concatenation."""
    from keras.src.applications import densenet  # the public module has fixed depths only

    keras.utils.set_random_seed(0)
    model = densenet.DenseNet([2, 1, 1, 1], weights=None, input_shape=SHAPE, classes=10)
    return _randomized_batch_norm(model, 2)


@pytest.mark.slow
@pytest.mark.heavy
def test_densenet121_zipped_with_a_permuted_copy_is_the_original(images):
    """182 hidden units, 58 BatchNorms spanning up to 32 concatenated layers' channels.
    Measured: max |diff| 1.5e-8 on outputs of 0.12, merge costs ≤ 6.3e-21, 39 min here."""
    x, calibration = images
    keras.utils.set_random_seed(0)
    model = keras.applications.DenseNet121(weights=None, input_shape=SHAPE, classes=10)
    plan = graph.read_plan(_randomized_batch_norm(model, 2))
    assert sum(plan.spans(u) for u in range(len(plan.units))) == 58
    _recovers_from_a_permuted_copy(model, x, calibration)


def test_densenet_zipped_at_half_share_with_a_permuted_copy_is_the_original(
    densenet, images, tmp_path
):
    """Concatenations are laid out shared-first: readers take every segment's shared
    channels as one prefix, and half of each layer shared still recovers the original
    exactly; each task's own model has the original's parameters, and it deploys."""
    x, calibration = images
    lines = []
    assert mtz_tf.describe(densenet, print_fn=lines.append)
    pool2_bn = next(line for line in lines if " pool2_bn " in line)
    assert "conv1_conv + ... + conv2_block2_2_conv (3 layers, concatenated)" in pool2_bn
    assert pool2_bn.split()[-1] == "follows"
    assert any(line.startswith("5 channel-wise units read a Concatenate") for line in lines)
    zipped, report = _recovers_from_a_permuted_copy(densenet, x, calibration, share=0.5)
    assert any(isinstance(layer, mtz_tf.layers.SharedFirstConcatenate) for layer in zipped.layers)
    spanning = report.layers[[u.name for u in graph.read_plan(densenet).units].index("pool2_bn")]
    blocks = ("conv1_conv", "conv2_block1_2_conv", "conv2_block2_2_conv")
    by_name = {layer.name: layer.shared for layer in report.layers}
    assert spanning.shared == sum(by_name[name] for name in blocks)
    for task in ("a", "b"):
        assert zipped_network.task_model(zipped, task).count_params() == densenet.count_params()
    counts = zipped_network.parameter_counts(zipped)
    assert densenet.count_params() < counts["total"] < 2 * densenet.count_params()
    loaded = keras.saving.load_model(_saved(zipped, tmp_path / "zipped.keras"))
    assert_close(loaded(x), zipped(x))
    export_with_task_parity(zipped, str(tmp_path / "export"), x)


@pytest.mark.slow
def test_densenet_takes_a_third_task_joining_at_the_shared_first_layout(densenet, images):
    """A task joining a zipped DenseNet takes the concatenations' shared-first layout; a
    permuted copy ties to the shared neurons at no cost and every task keeps its outputs."""
    x, calibration = images
    copies = {name: models.permute_hidden(densenet, seed) for name, seed in (("b", 3), ("c", 5))}
    data_of = {task: calibration for task in ("a", "b", "c")}
    zipped, _ = mtz_tf.zip_models(
        {"a": densenet, "b": copies["b"]},
        {"a": calibration, "b": calibration},
        share=0.5,
        repair="none",  # exact recovery: keep the synthetic BatchNorm statistics
        verbose=0,
    )
    joined, report = mtz_tf.add_task(zipped, "c", copies["c"], data_of, repair="none", verbose=0)
    expected = densenet(x)
    assert_close(joined(x), {task: expected for task in ("a", "b", "c")})
    assert max(layer.merge_cost for layer in report.layers) < 1e-8


def test_neuron_merging_and_ista_prune_densenet_bottlenecks(densenet, images):
    """Each dense layer's 1×1 bottleneck convolution is prunable (its channels go to its
    BatchNorm and the 3×3 convolution only); layers whose outputs are concatenated are not.
    ISTA removes a bottleneck's dead channels exactly."""
    x, _ = images
    assert nm.prunable_layers(densenet) == [
        "conv2_block1_1_conv",
        "conv2_block2_1_conv",
        "conv3_block1_1_conv",
        "conv4_block1_1_conv",
        "conv5_block1_1_conv",
    ]
    smaller, report = nm.compress(densenet, 0.5)
    assert {entry.name: entry.kept for entry in report.layers}["conv2_block1_1_conv"] == 64
    assert smaller.get_layer("conv2_block1_2_conv").kernel.shape[-2] == 64
    assert smaller.count_params() < 0.8 * densenet.count_params()
    model = keras.models.clone_model(densenet)
    model.set_weights(densenet.get_weights())
    bn = model.get_layer("conv3_block1_1_bn")
    gamma, beta = bn.gamma.numpy(), bn.beta.numpy()
    gamma[:5], beta[:5] = 0.0, -0.5  # relu(-0.5) = 0: the channels carry nothing
    bn.gamma.assign(gamma)
    bn.beta.assign(beta)
    removed = ista.remove_zero_channels(model)
    assert removed.get_layer("conv3_block1_1_conv").filters == 128 - 5
    assert_close(removed(x), model(x))


def _saved(model, path):
    model.save(path)
    return path


@pytest.mark.parametrize(
    "build, first_refused",
    [
        # Separable convolutions (depthwise and pointwise in one layer); 71×71 at least.
        (
            lambda: keras.applications.Xception(weights=None, input_shape=(71, 71, 3)),
            "block2_sepconv1",
        ),
    ],
)
def test_families_not_read_yet_are_refused_by_their_first_layer(build, first_refused):
    model = build()
    lines = []
    assert not mtz_tf.describe(model, print_fn=lines.append)
    assert first_refused in lines[0]


def test_neuron_merging_prunes_mobilenet_v2_through_its_depthwise_convolutions(
    mobilenet_v2, images
):
    """An expansion's pruned channels take their depthwise channels (and BatchNorm) with
    them; channels that carry nothing are removed exactly. Merging is refused: a depthwise
    channel has its own kernel."""
    x, _ = images
    prunable = nm.prunable_layers(mobilenet_v2)
    assert "block_3_expand" in prunable and "Conv_1" in prunable
    assert "block_3_project" not in prunable and "predictions" not in prunable
    model = keras.models.clone_model(mobilenet_v2)
    model.set_weights(mobilenet_v2.get_weights())
    dead = [0, 5, 7]  # zero filters whose depthwise channels output exactly zero
    expand = model.get_layer("block_3_expand")
    kernel = expand.kernel.numpy()
    kernel[..., dead] = 0.0
    expand.kernel.assign(kernel)
    for name in ("block_3_expand_BN", "block_3_depthwise_BN"):
        bn = model.get_layer(name)
        for variable, value in ((bn.gamma, 0.0), (bn.beta, -1.0)):
            v = variable.numpy()
            v[dead] = value
            variable.assign(v)
    n = expand.filters
    pruned, report = nm.compress(model, {"block_3_expand": len(dead) / n}, merge=False)
    assert pruned.get_layer("block_3_expand").filters == n - len(dead)
    assert pruned.get_layer("block_3_depthwise").kernel.shape[-2] == n - len(dead)
    assert report.layers[0].kept == n - len(dead)
    assert_close(pruned(x), model(x))
    smaller, _ = nm.compress(mobilenet_v2, 0.5, merge=False)
    assert smaller.count_params() < 0.75 * mobilenet_v2.count_params()
    assert np.all(np.isfinite(smaller(x).numpy()))
    with pytest.raises(ValueError, match="not positively homogeneous|DepthwiseConv2D"):
        nm.compress(mobilenet_v2, 0.5)


def test_ista_removes_dead_channels_of_mobilenet_v2_exactly(mobilenet_v2, images):
    """Dead channels of the last convolution and of a residual stream (every project conv
    adding into it) go; the function stays the same."""
    x, _ = images
    model = keras.models.clone_model(mobilenet_v2)
    model.set_weights(mobilenet_v2.get_weights())
    for name in ("Conv_1_bn", "block_4_project_BN", "block_5_project_BN", "block_3_project_BN"):
        bn = model.get_layer(name)
        gamma, beta = bn.gamma.numpy(), bn.beta.numpy()
        gamma[:4], beta[:4] = 0.0, 0.0
        bn.gamma.assign(gamma)
        bn.beta.assign(beta)
    pruned = ista.remove_zero_channels(model)
    assert pruned.get_layer("Conv_1").filters == model.get_layer("Conv_1").filters - 4
    width = model.get_layer("block_5_project").filters
    assert pruned.get_layer("block_5_project").filters == width - 4
    assert_close(pruned(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize(
    "build, dead_batch_norm, dead_layer",
    [
        (keras.applications.ResNet50V2, "conv2_block1_2_bn", "conv2_block1_2_conv"),
        (keras.applications.EfficientNetB0, None, None),
    ],
)
def test_neuron_merging_and_ista_take_the_other_families(
    build, dead_batch_norm, dead_layer, images
):
    """Pruning half of every prunable layer leaves the head whole and shrinks the model;
    ISTA removes a dead relu channel exactly (ResNet50V2's 3×3 conv; its 1×1 conv feeds a
    ZeroPadding2D, through which ISTA does not absorb constants) and keeps the function."""
    x, _ = images
    keras.utils.set_random_seed(0)
    model = _randomized_batch_norm(build(weights=None, input_shape=SHAPE, classes=10), 4)
    smaller, report = nm.compress(model, 0.5, merge=False)
    assert model.layers[-1].name not in {entry.name for entry in report.layers}
    assert report.params_after == smaller.count_params() < 0.75 * model.count_params()
    if dead_batch_norm is not None:
        bn = model.get_layer(dead_batch_norm)
        gamma, beta = bn.gamma.numpy(), bn.beta.numpy()
        gamma[:3], beta[:3] = 0.0, -0.5  # relu(-0.5) = 0: the channels carry nothing
        bn.gamma.assign(gamma)
        bn.beta.assign(beta)
    removed = ista.remove_zero_channels(model)
    if dead_layer is not None:
        assert removed.get_layer(dead_layer).filters == model.get_layer(dead_layer).filters - 3
    assert_close(removed(x), model(x))

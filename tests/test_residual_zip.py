"""Zipping residual networks: coupled channel groups through Add, one matching per stream."""

import keras
import numpy as np
import pytest
from conftest import InterruptAtTraining, assert_close, max_abs_diff, with_batch_norm_statistics

import mtz_tf
from mtz_tf import data, models


@pytest.fixture(scope="module")
def resnet():
    return with_batch_norm_statistics(models.resnet20((28, 28, 1), 5, 0.25, seed=1), 0)


@pytest.fixture(scope="module")
def resnet8():
    return with_batch_norm_statistics(
        models.resnet20((28, 28, 1), 5, 0.25, seed=3, blocks_per_stage=1), 2
    )


@pytest.fixture(scope="module")
def images(fashion):
    x = fashion[2][:128]
    return x, data.to_dataset(x, batch_size=64)


@pytest.mark.slow
def test_resnet20_permutation_recovery(resnet, images):
    x, calib = images
    permuted = models.permute_hidden(resnet, seed=5)
    zipped, report = mtz_tf.zip_models(
        {"a": resnet, "b": permuted}, {"a": calib, "b": calib}, repair="none", verbose=0
    )
    assert_close(permuted(x), resnet(x))
    outputs = zipped(x)
    assert_close(outputs["a"], resnet(x))
    assert_close(outputs["b"], resnet(x))
    assert all(layer.merge_cost < 1e-8 for layer in report.layers)
    assert len(report.coupled_groups) == 3 and len(report.layers) == 21


@pytest.mark.parametrize("hessian", ["channel", pytest.param("patch", marks=pytest.mark.slow)])
def test_resnet_permutation_recovery_with_folded_batch_norm(resnet8, images, hessian):
    x, calib = images
    permuted = models.permute_hidden(resnet8, seed=6)
    zipped, report = mtz_tf.zip_models(
        {"a": resnet8, "b": permuted},
        {"a": calib, "b": calib},
        batch_norm="fold",
        hessian=hessian,
        verbose=0,
    )
    assert_close(zipped(x)["a"], resnet8(x))
    assert_close(zipped(x)["b"], resnet8(x))
    # Folded and fully shared: one trunk computed once, a head per task.
    assert all(layer.common_output for layer in mtz_tf.zipped_network.zipped_layers(zipped)[:-1])


@pytest.mark.slow
def test_three_resnets_zip_into_one(resnet8, images):
    x, calib = images
    base = resnet8
    tasks = {"a": base, "b": models.permute_hidden(base, 1), "c": models.permute_hidden(base, 2)}
    zipped, report = mtz_tf.zip_models(tasks, {t: calib for t in tasks}, repair="none", verbose=0)
    for task in tasks:
        assert_close(zipped(x)[task], base(x))
    # Everything but the heads and the per-task BatchNorms is stored once.
    heads = 3 * base.get_layer("fc").count_params()
    trunk = base.count_params() - base.get_layer("fc").count_params()
    bn = sum(layer.count_params() for layer in base.layers if "bn" in layer.name)
    assert report.parameters["total"] == trunk - bn + 3 * bn + heads


@pytest.mark.slow
def test_partial_share_keeps_streams_consistent(resnet8, images):
    x, calib = images
    resnet = resnet8
    other = with_batch_norm_statistics(
        models.resnet20((28, 28, 1), 5, 0.25, seed=4, blocks_per_stage=1), 1
    )
    zipped, report = mtz_tf.zip_models(
        {"a": resnet, "b": other}, {"a": calib, "b": calib}, share=0.5, verbose=0
    )
    by_name = {layer.name: layer for layer in report.layers}
    for group in report.coupled_groups:
        assert len({by_name[name].shared for name in group}) == 1
    assert by_name["stem_conv"].shared == 2 and by_name["stage3_block1_proj_conv"].shared == 8
    outputs = zipped(x)
    assert np.all(np.isfinite(outputs["a"])) and outputs["b"].shape == (128, 5)
    # Nothing shared: the zipped model is the two models side by side.
    unshared, _ = mtz_tf.zip_models(
        {"a": resnet, "b": other}, {"a": calib, "b": calib}, share=0.0, verbose=0
    )
    assert_close(unshared(x)["a"], resnet(x))
    assert_close(unshared(x)["b"], other(x))


@pytest.mark.slow
def test_adding_a_permuted_copy_to_a_zipped_resnet_from_disk(resnet8, images, tmp_path):
    x, calib = images
    pair = {"a": resnet8, "b": models.permute_hidden(resnet8, 11)}
    zipped, _ = mtz_tf.zip_models(pair, {t: calib for t in pair}, repair="none", verbose=0)
    path = str(tmp_path / "pair.keras")
    zipped.save(path)
    loaded = keras.saving.load_model(path)
    before = [w.copy() for w in loaded.get_weights()]
    third = models.permute_hidden(resnet8, 12)
    joined, report = mtz_tf.add_task(
        loaded, "c", third, {t: calib for t in "abc"}, repair="none", verbose=0
    )
    # Every stream's matching recovers the newcomer's permutation: all three equal the base.
    for task in "abc":
        assert_close(joined(x)[task], resnet8(x))
    assert all(layer.merge_cost < 1e-8 for layer in report.layers)
    assert len(report.coupled_groups) == 3
    assert all(np.array_equal(b, a) for b, a in zip(before, loaded.get_weights()))


@pytest.mark.slow
def test_adding_a_task_to_a_partially_zipped_resnet(resnet8, images):
    x, calib = images
    other = with_batch_norm_statistics(
        models.resnet20((28, 28, 1), 5, 0.25, seed=4, blocks_per_stage=1), 1
    )
    newcomer = with_batch_norm_statistics(
        models.resnet20((28, 28, 1), 5, 0.25, seed=5, blocks_per_stage=1), 3
    )
    pair, calibration = {"a": calib, "b": calib}, {t: calib for t in "abc"}
    zipped, first = mtz_tf.zip_models({"a": resnet8, "b": other}, pair, share=0.5, verbose=0)
    joined, report = mtz_tf.add_task(zipped, "c", newcomer, calibration, verbose=0)
    assert [r.shared for r in report.layers] == [r.shared for r in first.layers]
    old, new = (
        mtz_tf.zipped_network.zipped_layers(zipped),
        mtz_tf.zipped_network.zipped_layers(joined),
    )
    for before, after in zip(old, new):
        assert all(after.sharing)
        for t in range(2):  # the zipped tasks' own neurons are untouched
            np.testing.assert_array_equal(
                before.task_kernels[t].numpy(), after.task_kernels[t].numpy()
            )
    # The stem reads the image: the newcomer's own filters are its unmatched ones, unchanged.
    stem = newcomer.get_layer("stem_conv").kernel.numpy()
    own = new[0].task_kernels[2].numpy()
    assert own.shape[-1] == stem.shape[-1] - new[0].shared_kernel.shape[-1]
    for j in range(own.shape[-1]):
        assert min(np.abs(stem - own[..., j : j + 1]).max(axis=(0, 1, 2))) < 1e-6
    outputs = joined(x)
    assert max_abs_diff(outputs["a"], zipped(x)["a"]) > 1e-4  # the shared weights moved
    assert np.all(np.isfinite(outputs["c"])) and outputs["c"].shape == (128, 5)
    # A task's plain model follows the residual graph and computes exactly its output.
    plain = mtz_tf.zipped_network.task_model(joined, "c")
    assert not any(isinstance(layer, mtz_tf.layers.ZippedConv2D) for layer in plain.layers)
    assert_close(plain(x), outputs["c"])
    # Nothing shared: the newcomer sits beside the others with its own outputs.
    unshared, _ = mtz_tf.zip_models({"a": resnet8, "b": other}, pair, share=0.0, verbose=0)
    side_by_side, _ = mtz_tf.add_task(unshared, "c", newcomer, calibration, verbose=0)
    assert_close(side_by_side(x)["c"], newcomer(x))
    assert_close(side_by_side(x)["a"], resnet8(x))


@pytest.mark.slow
def test_share_budget_gives_each_stream_one_count(resnet8, images):
    _, calib = images
    other = with_batch_norm_statistics(
        models.resnet20((28, 28, 1), 5, 0.25, seed=4, blocks_per_stage=1), 1
    )
    pair, calibration = {"a": resnet8, "b": other}, {"a": calib, "b": calib}
    budget = mtz_tf.ShareBudget(parameters=0.5, steps=5)
    zipped, report = mtz_tf.zip_models(pair, calibration, share=budget, verbose=0)
    counts = {layer.name: layer.shared for layer in report.layers}
    assert list(counts.values()) == report.share_allocation["counts"]
    for group in report.coupled_groups:
        assert len({counts[name] for name in group}) == 1
    assert mtz_tf.shared_parameter_fraction(zipped) >= 0.5
    assert report.share_allocation["estimated_shared_parameter_fraction"] == pytest.approx(
        mtz_tf.shared_parameter_fraction(zipped)
    )
    widths = [layer.units for layer in mtz_tf.graph.read_plan(resnet8).hidden_units]
    assert list(counts.values()) != widths  # not simply everything


@pytest.mark.slow
def test_residual_zip_resumes_from_checkpoint(resnet8, images, fashion, tmp_path):
    _, calib = images
    other = models.permute_hidden(resnet8, 9)
    pair, calibration = {"a": resnet8, "b": other}, {"a": calib, "b": calib}
    x, y = fashion[0][:512], fashion[1][:512] % 5
    schedule = [0, 0, 2, 0, 0, 2, 0, 0, 2]  # retrain after units 3, 6 and 9

    def retrain(callbacks=()):
        streams = {t: data.training_stream(x, y, batch_size=32, seed=i) for i, t in enumerate(pair)}
        return mtz_tf.Retrain(
            streams, steps_per_layer=schedule, callbacks=list(callbacks), verbose=0
        )

    full, full_report = mtz_tf.zip_models(
        pair, calibration, share=0.5, retrain=retrain(), verbose=0
    )

    checkpoint = str(tmp_path / "ckpt")
    with pytest.raises(KeyboardInterrupt):
        mtz_tf.zip_models(
            pair,
            calibration,
            share=0.5,
            retrain=retrain([InterruptAtTraining(2)]),
            checkpoint_dir=checkpoint,
            verbose=0,
        )
    assert mtz_tf.checkpoint.read_progress(checkpoint)["completed_layers"] == 5
    resumed, resumed_report = mtz_tf.zip_models(
        pair, calibration, share=0.5, retrain=retrain(), checkpoint_dir=checkpoint, verbose=0
    )
    for a, b in zip(full.weights, resumed.weights):
        assert_close(a.numpy(), b.numpy(), tol=1e-5)
    assert resumed_report.retrain_steps == full_report.retrain_steps == 6
    assert [r.shared for r in resumed_report.layers] == [r.shared for r in full_report.layers]


def _two_writer_model(a_kernel, b_kernel, name):
    inputs = keras.Input((3,))
    a = keras.layers.Dense(2, name="a")(inputs)
    b = keras.layers.Dense(2, name="b")(inputs)
    x = keras.layers.ReLU(name="relu")(keras.layers.Add(name="add")([a, b]))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x), name=name)
    model.get_layer("a").set_weights([a_kernel, np.zeros(2)])
    model.get_layer("b").set_weights([b_kernel, np.zeros(2)])
    return model


def test_stream_matching_uses_the_summed_cost_of_all_writers():
    rng = np.random.default_rng(0)
    a_kernel = np.array([[1.0, 1.01], [0.5, 0.49], [0.0, 0.02]])  # two near-equal neurons
    b_kernel = 10 * rng.normal(size=(3, 2))
    model_a = _two_writer_model(a_kernel, b_kernel, "m_a")
    model_b = _two_writer_model(a_kernel, b_kernel[:, ::-1], "m_b")  # b's neurons swapped
    x = rng.normal(size=(256, 3)).astype("float32")
    calib = data.to_dataset(x, batch_size=128)
    _, report = mtz_tf.zip_models(
        {"a": model_a, "b": model_b}, {"a": calib, "b": calib}, matching="optimal", verbose=0
    )
    costs = {layer.name: layer.merge_cost for layer in report.layers}
    # Writer a alone would keep index order (cost 0); the sum with writer b swaps the pair.
    assert costs["b"] < 1e-8 < costs["a"]
    assert report.coupled_groups == [["a", "b"]]


def test_residual_bad_input(resnet, images):
    _, calib = images
    other = models.permute_hidden(resnet, seed=5)
    pair, calibration = {"a": resnet, "b": other}, {"a": calib, "b": calib}
    with pytest.raises(ValueError, match="must share the same number of neurons"):
        mtz_tf.zip_models(pair, calibration, share={"stem_conv": 2}, verbose=0)
    inputs = keras.Input((8, 8, 1))
    a = keras.layers.Conv2D(2, 3, padding="same", name="a")(inputs)
    b = keras.layers.Conv2D(2, 3, padding="same", name="b")(inputs)
    s = keras.layers.Conv2D(4, 1, name="s")(inputs)
    x = keras.layers.Add()([keras.layers.Concatenate()([a, b]), s])
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="fc")(x))
    small = data.to_dataset(np.zeros((4, 8, 8, 1), "float32"), batch_size=4)
    with pytest.raises(ValueError, match=r"\['s'\] have only part of their channels coupled"):
        mtz_tf.zip_models({"a": model, "b": model}, {"a": small, "b": small}, verbose=0)


def test_hessians_of_per_task_inputs_are_each_tasks_own(resnet8, images):
    """A layer that takes one input per task gets each task's own input covariance."""
    x, calib = images
    other = models.permute_hidden(resnet8, 8)
    zipped, _ = mtz_tf.zip_models(
        {"a": resnet8, "b": other}, {"a": calib, "b": calib}, share=0.0, verbose=0
    )
    plan = mtz_tf.graph.read_plan(resnet8)
    states = mtz_tf.zipped_network.read_states(zipped, plan)
    layers = mtz_tf.zipped_network.zipped_layers(zipped)
    for state in states:
        state.input_shared_units = state.input_units[0]  # cover every input channel
    calibration = {"a": calib, "b": calib}
    frontier = mtz_tf.frontier.Frontier(plan, ["a", "b"], calibration, budget=2**30)
    frontier.reset(zipped, completed=1)  # units 1 and 2 are computed past the frontier
    for feed in (mtz_tf.frontier.FullPasses(calibration), frontier):
        hessians = mtz_tf.layer_zip.layers_hessians(
            zipped, layers[1:3], states[1:3], feed, "channel"
        )
        check_hessians(hessians, plan, (resnet8, other), x)


def check_hessians(hessians, plan, models, x):
    for index, per_task in zip((1, 2), hessians):
        for model, h in zip(models, per_task):
            name = plan.units[index].name
            inputs = keras.Model(model.input, model.get_layer(name).input)(x).numpy()
            rows = inputs.reshape(-1, inputs.shape[-1]).astype(np.float64)
            assert_close(h.numpy(), rows.T @ rows / len(rows), what=f"H of {name!r}")


def test_padding_rescaling_and_relu6_zip_back_to_the_original():
    """Rescaling, ZeroPadding2D, ReLU(6) after a unit and after an Add, Cropping2D and
    UpSampling2D (the layers between keras.applications' convolutions): a model zipped with
    a permuted copy of itself computes the original, and its task model and .keras file too."""
    from test_graph import _padded_relu6_model

    model = with_batch_norm_statistics(_padded_relu6_model(), seed=1)
    permuted = models.permute_hidden(model, seed=3)
    x = np.random.default_rng(0).uniform(0, 255, size=(16, 8, 8, 3)).astype("float32")
    calib = data.to_dataset(x, batch_size=8)
    zipped, report = mtz_tf.zip_models(
        {"a": model, "b": permuted}, {"a": calib, "b": calib}, repair="none", verbose=0
    )
    expected = model(x)
    assert_close(zipped(x)["a"], expected)
    assert_close(zipped(x)["b"], expected)
    assert_close(mtz_tf.zipped_network.task_model(zipped, "b")(x), expected)
    assert all(layer.merge_cost < 1e-8 for layer in report.layers)
    assert report.coupled_groups == [["c1", "c2"]]


@pytest.mark.parametrize("merge", ["Subtract", "Maximum", "Average"])
def test_every_sum_like_merge_couples_its_inputs(merge):
    """Subtract, Maximum and Average tie channel c of their inputs as Add does: the two
    convolutions form one stream, and a permuted copy zips back to the original."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    a = keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="a")(inputs)
    b = keras.layers.Conv2D(5, 1, name="b")(a)
    x = getattr(keras.layers, merge)(name="merge")([a, b])
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    permuted = models.permute_hidden(model, seed=2)
    x = np.random.default_rng(1).normal(size=(16, 6, 6, 2)).astype("float32")
    calib = data.to_dataset(x, batch_size=8)
    zipped, report = mtz_tf.zip_models(
        {"a": model, "b": permuted}, {"a": calib, "b": calib}, verbose=0
    )
    assert report.coupled_groups == [["a", "b"]]
    assert_close(zipped(x)["b"], model(x))

"""The zip frontier: kept calibration activations give what full passes from the input give."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close, concatenating_model, with_batch_norm_statistics

import mtz_tf
from mtz_tf import data, frontier, graph, models, zipped_network


@pytest.fixture(scope="module")
def images(fashion):
    x = fashion[2][:96]
    return x, data.to_dataset(x, batch_size=40)  # a short last batch


CASES = {
    "resnet8 (BatchNorm, residual)": lambda s: with_batch_norm_statistics(
        models.resnet20((28, 28, 1), 5, 0.25, seed=s, blocks_per_stage=1), s
    ),
    "lenet5 (next-layer refit)": lambda s: models.lenet5(seed=s),
    "concatenation and channel-wise units": concatenating_model,
}


def _zip(pair, calib, budget, monkeypatch, **options):
    monkeypatch.setattr(frontier, "DEFAULT_BUDGET_BYTES", budget)
    return mtz_tf.zip_models(pair, {"a": calib, "b": calib}, verbose=0, **options)


def _assert_same_zip(first, second, x):
    (zipped, report), (expected, expected_report) = first, second
    assert_close(zipped(x), expected(x), what="zipped outputs")
    for layer, reference in zip(expected_report.layers, report.layers):
        assert layer.shared == reference.shared
        assert layer.repair == reference.repair
        assert abs(layer.merge_cost - reference.merge_cost) <= 1e-5 * max(
            1.0, abs(reference.merge_cost)
        ), layer.name
    for layer, reference in zip(zipped.weights, expected.weights):
        assert_close(layer.numpy(), reference.numpy(), what=layer.path)


@pytest.mark.parametrize("case", list(CASES))
def test_zip_from_the_frontier_equals_the_zip_from_full_passes(case, images, monkeypatch):
    """Hessians, repairs and the zipped weights (BatchNorm statistics included) are those
    that full passes from the model input give."""
    x, calib = images
    pair = {"a": CASES[case](1), "b": CASES[case](2)}
    kept = _zip(pair, calib, 2**30, monkeypatch, share=0.5)
    full = _zip(pair, calib, 0, monkeypatch, share=0.5)
    _assert_same_zip(kept, full, x)


def test_retraining_recomputes_the_frontier(images, fashion, monkeypatch):
    """After light retraining moved every weight, the next units' Hessians are those of the
    retrained network (as full passes compute them)."""
    x, calib = images
    train = data.to_dataset(fashion[0][:256], fashion[1][:256], batch_size=64)
    retrain = mtz_tf.Retrain({"a": train, "b": train}, steps_per_layer=2)
    pair = {"a": models.lenet5(seed=1), "b": models.lenet5(seed=2)}
    kept = _zip(pair, calib, 2**30, monkeypatch, share=0.5, retrain=retrain)
    full = _zip(pair, calib, 0, monkeypatch, share=0.5, retrain=retrain)
    _assert_same_zip(kept, full, x)


def test_a_frontier_over_budget_falls_back_to_full_passes(images, monkeypatch):
    """A budget the inputs fit in but a wider frontier does not: the zip goes on with full
    passes from that unit on, with the same result."""
    x, calib = images
    pair = {"a": models.lenet5(seed=1), "b": models.lenet5(seed=2)}
    inputs = 2 * x.nbytes  # two tasks' calibration inputs
    plan = graph.read_plan(pair["a"])
    feed = frontier.Frontier(plan, ["a", "b"], {"a": calib, "b": calib}, budget=inputs + 1)
    assert feed.active
    feed.reset(zipped_network.build_model(plan, ["a", "b"], _states(pair, plan)), completed=1)
    assert not feed.active  # conv1's 6 maps of 24x24 outweigh a 28x28 image
    _assert_same_zip(
        _zip(pair, calib, inputs + 1, monkeypatch, share=0.5),
        _zip(pair, calib, 0, monkeypatch, share=0.5),
        x,
    )


def _states(pair, plan):
    states = zipped_network.separate_states({t: plan for t in pair}, pair)
    mtz_tf.driver.propagate_common(plan, states)
    return states


def test_the_frontier_keeps_only_what_unfinished_steps_read(images):
    """In a chain the frontier after unit u is the input of unit u + 1 alone, with the
    values the input models compute there."""
    x, calib = images
    pair = {"a": models.lenet5(seed=1), "b": models.lenet5(seed=2)}
    plan = graph.read_plan(pair["a"])
    model = zipped_network.build_model(plan, ["a", "b"], _states(pair, plan))
    feed = frontier.Frontier(plan, ["a", "b"], {"a": calib, "b": calib}, budget=2**30)
    unit_steps = [i for i, step in enumerate(plan.steps) if isinstance(step, graph.Unit)]
    feed.reset(model, completed=0)
    for u in range(len(plan.hidden_units)):
        feed.advance(model, u)
        reader = plan.steps[unit_steps[u + 1]]
        for t, task in enumerate(pair):
            kept = feed._batches[t]  # noqa: SLF001 - the property under test
            assert [set(values) for values in kept] == [set(reader.inputs)] * len(kept)
            source = plan.steps[reader.inputs[0]]
            flattened = getattr(source, "kind", None) == "Flatten"
            layer = pair[task].get_layer(source.name if flattened else reader.name)
            expected = keras.Model(pair[task].input, layer.input)(x).numpy()
            if flattened:  # zipped models flatten channel-major
                expected = np.transpose(expected, (0, 3, 1, 2)).reshape(len(x), -1)
            got = np.concatenate([values[reader.inputs[0]] for values in kept])
            assert_close(got, expected, what=f"task {task!r} after unit {u}")


def test_a_replicating_strategy_uses_full_passes(images):
    """Frontier activations are per process; a strategy that shards the calibration
    batches across replicas gets full passes."""
    _, calib = images
    plan = graph.read_plan(models.lenet5(seed=1))
    calibration = {"a": calib, "b": calib}
    assert isinstance(frontier.calibration_feed(plan, ["a", "b"], calibration), frontier.Frontier)
    with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
        feed = frontier.calibration_feed(plan, ["a", "b"], calibration)
    assert isinstance(feed, frontier.FullPasses)

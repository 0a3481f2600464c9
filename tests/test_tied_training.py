"""Retraining through tied task views trains the zipped model itself, one trace per topology."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close, concatenating_model, with_batch_norm_statistics

import mtz_tf
from mtz_tf import data, graph, models, tied_training, zipped_network
from mtz_tf.retrain import _default_loss, retrain_jointly

BUILDERS = {
    "resnet8 (BatchNorm, residual)": lambda s: with_batch_norm_statistics(
        models.resnet20((28, 28, 1), 10, 0.25, seed=s, blocks_per_stage=1), s
    ),
    "lenet5 (Dense after a channel-major Flatten)": lambda s: models.lenet5(seed=s),
    "concatenation and channel-wise units": concatenating_model,
}


@pytest.fixture(scope="module")
def batches(fashion):
    x, y = fashion[0][:192], fashion[1][:192]
    return {
        "calibration": data.to_dataset(x[:64], batch_size=64),
        "train": {
            "a": data.to_dataset(x, y, batch_size=32),
            "b": data.to_dataset(x[::-1], y[::-1], batch_size=32),
        },
        "x": x[:16],
    }


def _zipped(builder, batches, share):
    pair = {"a": builder(1), "b": builder(2)}
    calib = batches["calibration"]
    zipped, _ = mtz_tf.zip_models(pair, {"a": calib, "b": calib}, share=share, verbose=0)
    plan = graph.read_plan(pair["a"])
    return zipped, plan


def _copy(zipped, plan):
    return zipped_network.build_model(plan, ["a", "b"], zipped_network.read_states(zipped, plan))


def _nonempty(model):
    return [(v.path, v.numpy()) for v in model.weights if np.prod(v.shape)]


@pytest.mark.parametrize("case", list(BUILDERS))
def test_one_sgd_step_is_the_gradient_step_of_the_zipped_model(case, batches):
    """W' = W − lr · ∂(Σ_t L_t)/∂W for every weight of the zipped model (shared ones get
    every task's gradient), the gradient taken by hand through each task's path, and the
    BatchNorm statistics move as that pass moves them."""
    zipped, plan = _zipped(BUILDERS[case], batches, share=0.5)
    lr = 0.05
    reference = _copy(zipped, plan)
    (xa, ya), (xb, yb) = (next(iter(batches["train"][t])) for t in ("a", "b"))
    weights = reference.trainable_variables
    with tf.GradientTape() as tape:
        loss = 0.0
        for t, (x, y) in enumerate(((xa, ya), (xb, yb))):
            logits = zipped_network.task_values(
                reference, plan, t, [plan.output_step], {graph.MODEL_INPUT: x}, training=True
            )[0]
            loss += _default_loss(reference, "ab"[t])(y, logits)
    for variable, gradient in zip(weights, tape.gradient(loss, weights)):
        variable.assign_sub(lr * gradient)

    model = _copy(zipped, plan)
    session = {}
    retrain = mtz_tf.Retrain(batches["train"], optimizer=keras.optimizers.SGD(lr), verbose=0)
    retrain_jointly(model, plan, retrain, steps=1, start_step=0, session=session)
    assert isinstance(session["trainer"], tied_training.TiedTrainer)
    for (path, value), (_, expected) in zip(_nonempty(model), _nonempty(reference)):
        assert_close(value, expected, tol=1e-4, what=path)


@pytest.mark.parametrize("case", list(BUILDERS))
def test_tied_views_train_as_the_zipped_model_trains(case, batches):
    """Adam through the tied task views and Adam through the zipped model itself (the
    path for optimizers that are not element-wise, taken here by a clipnorm that never
    clips) end at the same weights and statistics after several steps."""
    zipped, plan = _zipped(BUILDERS[case], batches, share=0.5)
    results = []
    for optimizer in (keras.optimizers.Adam(1e-2), keras.optimizers.Adam(1e-2, clipnorm=1e9)):
        model = _copy(zipped, plan)
        session = {}
        retrain = mtz_tf.Retrain(batches["train"], optimizer=optimizer, verbose=0)
        retrain_jointly(model, plan, retrain, steps=4, start_step=1, session=session)
        results.append((model, "trainer" in session))
    (tied, used_views), (direct, used_fallback) = results
    assert used_views and not used_fallback
    moved = [np.any(v != w) for (_, v), (_, w) in zip(_nonempty(tied), _nonempty(zipped))]
    assert all(moved)
    for (path, value), (_, expected) in zip(_nonempty(tied), _nonempty(direct)):
        assert_close(value, expected, tol=1e-4, what=path)
    assert_close(tied(batches["x"]), direct(batches["x"]), tol=1e-3, what="outputs")


def test_a_zip_traces_one_step_per_topology(batches):
    """Retraining zips of one architecture at other shares reuses the session's trainer and
    its one traced step, continues the batch stream, and gives what fresh trainers give."""
    builder = BUILDERS["lenet5 (Dense after a channel-major Flatten)"]
    kept, fresh = {}, []
    retrain = mtz_tf.Retrain(batches["train"], optimizer=keras.optimizers.Adam(1e-3), verbose=0)
    start = 0
    for share in (0.25, 0.75):
        zipped, plan = _zipped(builder, batches, share)
        model = _copy(zipped, plan)
        retrain_jointly(model, plan, retrain, steps=3, start_step=start, session=kept)
        alone = _copy(zipped, plan)
        retrain_jointly(alone, plan, retrain, steps=3, start_step=start)
        fresh.append((model, alone))
        start += 3
    assert kept["trainer"].step.experimental_get_tracing_count() == 1
    for model, alone in fresh:
        for (path, value), (_, expected) in zip(_nonempty(model), _nonempty(alone)):
            assert_close(value, expected, tol=1e-5, what=path)


def test_a_new_concatenation_layout_is_a_new_topology(batches):
    """A Concatenate whose shared-first layout differs gives task views of another
    topology: the session builds a new trainer for it."""
    nothing, plan = _zipped(concatenating_model, batches, share=0.0)
    half, _ = _zipped(concatenating_model, batches, share=0.5)
    assert tied_training.topology_key(nothing) != tied_training.topology_key(half)
    session = {}
    retrain = mtz_tf.Retrain(batches["train"], optimizer=keras.optimizers.Adam(1e-3), verbose=0)
    retrain_jointly(_copy(nothing, plan), plan, retrain, steps=1, start_step=0, session=session)
    first = session["trainer"]
    retrain_jointly(_copy(half, plan), plan, retrain, steps=1, start_step=1, session=session)
    assert session["trainer"] is not first


@pytest.mark.parametrize(
    "optimizer, reason",
    [
        (keras.optimizers.Adam(), None),
        (keras.optimizers.SGD(0.1, momentum=0.9), None),
        (keras.optimizers.RMSprop(), None),
        (keras.optimizers.Adam(clipnorm=1.0), "clipping by norm"),
        (keras.optimizers.SGD(global_clipnorm=1.0), "clipping by norm"),
        (keras.optimizers.Adafactor(), "Adafactor is not one of the element-wise"),
        (keras.optimizers.Lamb(), "Lamb is not one of the element-wise"),
    ],
)
def test_only_element_wise_optimizers_train_through_views(optimizer, reason):
    found = tied_training.unsupported_reason(optimizer)
    assert (found is None) if reason is None else (reason in found)


def test_views_of_another_topology_refuse_to_load(batches):
    nothing, _ = _zipped(concatenating_model, batches, share=0.0)
    half, _ = _zipped(concatenating_model, batches, share=0.5)
    views = tied_training.TaskViews(nothing)
    with pytest.raises(ValueError, match="other shapes"):
        views.load(half)

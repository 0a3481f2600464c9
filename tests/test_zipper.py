"""zip_models end to end on trained LeNet-300-100 models (real Fashion-MNIST)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import InterruptAtTraining, assert_close

import mtz_tf
from mtz_tf import data, models
from mtz_tf.retrain import resolve_optimizer


def test_zipping_a_model_with_its_permutation_recovers_it(lenet_a, calibration, fashion):
    permuted = models.permute_hidden(lenet_a, seed=11)
    zipped, report = mtz_tf.zip_models(
        {"a": lenet_a, "b": permuted}, {"a": calibration, "b": calibration}, share=1.0, verbose=0
    )
    x = fashion[2][:300]
    outputs = zipped(x)
    expected = lenet_a(x)
    assert_close(outputs["a"], expected)
    assert_close(outputs["b"], expected)
    assert all(layer.merge_cost < 1e-8 for layer in report.layers)
    # Fully shared hidden layers are computed once: one tensor leaves the last hidden layer.
    hidden = [layer for layer in zipped.layers if isinstance(layer, mtz_tf.ZippedDense)][:-1]
    assert all(layer.common_output for layer in hidden)


def test_share_zero_leaves_every_task_unchanged(lenet_a, lenet_b, calibration, fashion):
    zipped, report = mtz_tf.zip_models(
        {"a": lenet_a, "b": lenet_b}, {"a": calibration, "b": calibration}, share=0.0, verbose=0
    )
    x = fashion[2][:300]
    assert_close(zipped(x)["a"], lenet_a(x))
    assert_close(zipped(x)["b"], lenet_b(x))
    assert report.parameters["total"] == report.parameters["input_models"]


def test_partial_share_parameter_counts(lenet_a, lenet_b, calibration):
    zipped, report = mtz_tf.zip_models(
        {"a": lenet_a, "b": lenet_b},
        {"a": calibration, "b": calibration},
        share={"fc1": 200, "fc2": 0.5},
        verbose=0,
    )
    # fc1: 200 shared neurons (784 inputs + bias) once, 100 specific per task.
    # fc2: inputs per task = 200 shared + 100 specific; 50 shared neurons (200 shared
    # weights + bias, and 100 cross weights per task), 50 specific per task (300 + 1 each).
    shared = 200 * 785 + 50 * 201
    specific = 2 * (100 * 785) + 2 * (100 * 50 + 50 * 301) + 2 * (101 * 10)
    assert report.parameters["shared"] == shared
    assert report.parameters["specific"] == specific
    assert zipped.count_params() == shared + specific
    assert [layer.shared for layer in report.layers] == [200, 50]


def test_keras_round_trip_gives_identical_outputs(lenet_a, lenet_b, calibration, fashion, tmp_path):
    zipped, _ = mtz_tf.zip_models(
        {"a": lenet_a, "b": lenet_b},
        {"a": calibration, "b": calibration},
        share=0.7,
        verbose=0,
    )
    path = str(tmp_path / "zipped.keras")
    zipped.save(path)
    restored = keras.saving.load_model(path)
    x = fashion[2][:100]
    for task in ("a", "b"):
        np.testing.assert_array_equal(zipped(x)[task], restored(x)[task])


def _retrain(fashion, steps=30, callbacks=()):
    x, y = fashion[0], fashion[1]
    train = {t: data.training_stream(x, y, batch_size=32, seed=i) for i, t in enumerate(("a", "b"))}
    return mtz_tf.Retrain(train, steps_per_layer=steps, callbacks=list(callbacks), verbose=0)


def _weights(model):
    return [w.numpy() for w in model.weights]


def test_resume_from_checkpoint_equals_uninterrupted_run(
    lenet_a, lenet_b, calibration, fashion, tmp_path
):
    models_ = {"a": lenet_a, "b": lenet_b}
    calib = {"a": calibration, "b": calibration}
    full, full_report = mtz_tf.zip_models(models_, calib, retrain=_retrain(fashion), verbose=0)

    checkpoint = str(tmp_path / "ckpt")
    with pytest.raises(KeyboardInterrupt):
        mtz_tf.zip_models(
            models_,
            calib,
            retrain=_retrain(fashion, callbacks=[InterruptAtTraining(2)]),
            checkpoint_dir=checkpoint,
            verbose=0,
        )
    assert mtz_tf.checkpoint.read_progress(checkpoint)["completed_layers"] == 1
    resumed, resumed_report = mtz_tf.zip_models(
        models_, calib, retrain=_retrain(fashion), checkpoint_dir=checkpoint, verbose=0
    )
    for a, b in zip(_weights(full), _weights(resumed)):
        assert_close(a, b, tol=1e-5)
    assert resumed_report.retrain_steps == full_report.retrain_steps == 60
    with pytest.raises(ValueError, match="holds a zip of other models"):
        mtz_tf.zip_models(models_, calib, share=0.5, checkpoint_dir=checkpoint, verbose=0)


def test_same_seeds_give_same_zipped_weights(lenet_a, lenet_b, calibration, fashion):
    runs = [
        mtz_tf.zip_models(
            {"a": lenet_a, "b": lenet_b},
            {"a": calibration, "b": calibration},
            share=0.8,
            retrain=_retrain(fashion, steps=10),
            verbose=0,
        )[0]
        for _ in range(2)
    ]
    for a, b in zip(_weights(runs[0]), _weights(runs[1])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_mirrored_strategy_gives_the_same_result(lenet_a, lenet_b, calibration, fashion):
    """Two replicas zip and retrain as one device does. SGD: Adam divides each gradient by
    its running scale, so a shared weight whose two tasks' gradients cancel to rounding
    noise moves by ±lr either way (Adam at 1e-4 differs by 3e-4 in 120 entries of fc2's
    shared kernel, at 1e-3 by 1.4e-5), where SGD keeps the rounding a rounding."""
    models_ = {"a": lenet_a, "b": lenet_b}
    calib = {"a": calibration, "b": calibration}

    def retrain():
        settings = _retrain(fashion, steps=20)
        settings.optimizer = keras.optimizers.SGD(0.01)
        return settings

    plain, plain_report = mtz_tf.zip_models(models_, calib, retrain=retrain(), verbose=0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored, mirrored_report = mtz_tf.zip_models(models_, calib, retrain=retrain(), verbose=0)
    for a, b in zip(_weights(plain), _weights(mirrored)):
        assert_close(a, b, tol=2e-5)
    for p, m in zip(plain_report.layers, mirrored_report.layers):
        np.testing.assert_allclose(p.merge_cost, m.merge_cost, rtol=1e-6)


def test_optimal_matching_costs_no_more_than_greedy(lenet_a, lenet_b, calibration):
    reports = {
        method: mtz_tf.zip_models(
            {"a": lenet_a, "b": lenet_b},
            {"a": calibration, "b": calibration},
            share=[100, 0],
            matching=method,
            verbose=0,
        )[1]
        for method in ("greedy", "optimal")
    }
    assert reports["optimal"].layers[0].merge_cost <= reports["greedy"].layers[0].merge_cost


def test_report_is_json_and_inputs_are_not_mutated(lenet_a, lenet_b, calibration, fashion):
    before = [_weights(lenet_a), _weights(lenet_b)]
    x_test, y_test = fashion[2], fashion[3]
    evaluation = {t: data.to_dataset(x_test, y_test, batch_size=500) for t in ("a", "b")}
    _, report = mtz_tf.zip_models(
        {"a": lenet_a, "b": lenet_b},
        {"a": calibration, "b": calibration},
        retrain=_retrain(fashion, steps=5),
        evaluation=evaluation,
        verbose=0,
    )
    decoded = json.loads(report.to_json())
    assert decoded["parameters"]["ratio"] == pytest.approx(
        decoded["parameters"]["total"] / decoded["parameters"]["input_models"]
    )
    # The counts every method's report carries, against Keras's own counts.
    assert decoded["params_before"] == lenet_a.count_params() + lenet_b.count_params()
    assert decoded["params_after"] == report.parameters["total"] < decoded["params_before"]
    assert mtz_tf.ZipReport.from_dict(decoded).to_dict() == decoded
    # The fixtures are compiled with Adam at 1e-3 (training.compile_classifier).
    assert decoded["retrain_optimizer"]["class_name"] == "Adam"
    assert decoded["retrain_optimizer"]["source"] == (
        "task 'a''s input model (its learning rate × 0.1)"
    )
    assert "Retraining optimizer: Adam, learning rate 0.0001" in report.table()
    expected_a = np.mean(np.argmax(lenet_a.predict(x_test, verbose=0), -1) == y_test)
    assert decoded["accuracy_original"]["a"] == pytest.approx(expected_a)
    assert set(decoded["layers"][0]["accuracy_after_retraining"]) == {"a", "b"}
    for original, model in zip(before, (lenet_a, lenet_b)):
        for a, b in zip(original, _weights(model)):
            np.testing.assert_array_equal(a, b)


def _tiny(width=8, depth=2, activation="relu", input_shape=(6,)):
    layers = [keras.Input(input_shape)]
    layers += [keras.layers.Dense(width, activation=activation) for _ in range(depth)]
    layers.append(keras.layers.Dense(3))
    return keras.Sequential(layers)


def _calib(shape=(6,), n=32):
    return tf.data.Dataset.from_tensor_slices(np.ones((n,) + shape, np.float32)).batch(8)


def test_bad_input_errors_name_the_problem():
    a, b = _tiny(), _tiny()
    calib = {"a": _calib(), "b": _calib()}
    with pytest.raises(
        ValueError, match=r"Model 'b' differs from model 'a' in depth: 4 vs 3 steps"
    ):
        mtz_tf.zip_models({"a": a, "b": _tiny(depth=3)}, calib)
    with pytest.raises(
        ValueError,
        match=r"Model 'b' differs from model 'a' at layer '\w+': activation 'tanh' vs 'relu'",
    ):
        mtz_tf.zip_models({"a": a, "b": _tiny(activation="tanh")}, calib)
    with pytest.raises(ValueError, match=r"takes inputs of shape \(7,\)"):
        mtz_tf.zip_models({"a": a, "b": _tiny(input_shape=(7,))}, calib)
    with pytest.raises(ValueError, match="must be at most its width 8"):
        mtz_tf.zip_models({"a": a, "b": b}, calib, share=[9, 1])
    with pytest.raises(ValueError, match="not a hidden layer"):
        mtz_tf.zip_models({"a": a, "b": b}, calib, share={"nope": 1})
    with pytest.raises(ValueError, match="one dataset per task"):
        mtz_tf.zip_models({"a": a, "b": b}, {"a": _calib(), "c": _calib()})
    with pytest.raises(ValueError, match="yields inputs of shape"):
        mtz_tf.zip_models({"a": a, "b": b}, {"a": _calib(), "b": _calib(shape=(5,))})
    empty = tf.data.Dataset.from_tensor_slices(np.zeros((0, 6), np.float32)).batch(8)
    with pytest.raises(ValueError, match="calibration data of task 'b' is empty"):
        mtz_tf.zip_models({"a": a, "b": b}, {"a": _calib(), "b": empty})
    with pytest.raises(ValueError, match="at least two models"):
        mtz_tf.zip_models({"a": a}, {"a": _calib()})
    with pytest.raises(ValueError, match="matching"):
        mtz_tf.zip_models({"a": a, "b": b}, calib, matching="hungarian")
    broken = _tiny()
    kernel = broken.layers[0].kernel
    kernel.assign(np.where(np.eye(*kernel.shape) > 0, np.nan, kernel.numpy()))
    snapshot = _weights(a)
    with pytest.raises(ValueError, match="NaN or infinite"):
        mtz_tf.zip_models({"a": a, "b": broken}, calib)
    for x, y in zip(snapshot, _weights(a)):
        np.testing.assert_array_equal(x, y)


def test_task_model_computes_one_task_exactly(lenet_a, lenet_b, calibration, fashion):
    zipped, _ = mtz_tf.zip_models(
        {"a": lenet_a, "b": lenet_b},
        {"a": calibration, "b": calibration},
        share=0.6,
        verbose=0,
    )
    x = fashion[2][:100]
    for task in ("a", "b"):
        single = mtz_tf.zipped_network.task_model(zipped, task)
        assert not any(isinstance(layer, mtz_tf.ZippedDense) for layer in single.layers)
        assert_close(single(x), zipped(x)[task])
    with pytest.raises(ValueError, match="Unknown task 'c'"):
        mtz_tf.zipped_network.task_model(zipped, "c")


def test_baselines_cost_more_than_mtz(lenet_a, lenet_b, calibration, fashion):
    # Different calibration data per task: with identical first-layer Hessians the
    # Hessian-weighted merge would reduce to the plain average.
    other = data.to_dataset(data.calibration_subset(fashion[0][::-1], 1000, seed=1), batch_size=250)
    costs = {}
    for pairing, tie in (
        ("random", "average"),
        ("euclidean", "average"),
        ("hessian", "average"),
        ("hessian", "hessian"),
    ):
        _, report = mtz_tf.zip_models(
            {"a": lenet_a, "b": lenet_b},
            {"a": calibration, "b": other},
            share=[300, 0],
            pairing=pairing,
            tie=tie,
            verbose=0,
        )
        costs[pairing, tie] = report.layers[0].merge_cost
    # The Hessian-weighted merge is optimal for any pairing; MTZ pairing beats random.
    assert costs["hessian", "hessian"] < costs["hessian", "average"]
    assert costs["hessian", "hessian"] < costs["euclidean", "average"]
    assert costs["euclidean", "average"] < costs["random", "average"]
    with pytest.raises(ValueError, match="`pairing` must be one of"):
        mtz_tf.zip_models(
            {"a": lenet_a, "b": lenet_b}, {"a": calibration, "b": calibration}, pairing="cosine"
        )
    with pytest.raises(TypeError, match="criterion"):  # the old name is not taken silently
        mtz_tf.zip_models(
            {"a": lenet_a, "b": lenet_b}, {"a": calibration, "b": calibration}, criterion="random"
        )


@pytest.mark.slow
def test_share_budget_allocates_counts_to_meet_the_target(lenet_a, lenet_b, calibration):
    models_ = {"a": lenet_a, "b": lenet_b}
    calib = {"a": calibration, "b": calibration}
    zipped, report = mtz_tf.zip_models(
        models_, calib, share=mtz_tf.ShareBudget(parameters=0.5, steps=8), verbose=0
    )
    counts = [layer.shared for layer in report.layers]
    assert counts == report.share_allocation["counts"]
    assert mtz_tf.shared_parameter_fraction(zipped) >= 0.5
    assert counts != [300, 100]  # not simply everything
    # A stricter merge-cost budget shares no more and stays within its budget.
    budget = 0.5 * sum(layer.merge_cost for layer in report.layers)
    _, cheap = mtz_tf.zip_models(
        models_, calib, share=mtz_tf.ShareBudget(cost=budget, steps=8), verbose=0
    )
    assert sum(layer.merge_cost for layer in cheap.layers) <= budget + 1e-9
    with pytest.raises(ValueError, match="exactly one of"):
        mtz_tf.ShareBudget(parameters=0.5, cost=1.0)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        mtz_tf.ShareBudget(parameters=1.5)


def test_multi_head_model_then_neuron_merging(lenet_a, lenet_b, calibration, fashion):
    calib = {"a": calibration, "b": calibration}
    zipped, _ = mtz_tf.zip_models({"a": lenet_a, "b": lenet_b}, calib, verbose=0)
    plain = mtz_tf.zipped_network.multi_head_model(zipped)
    assert not any(isinstance(layer, mtz_tf.ZippedDense) for layer in plain.layers)
    x = fashion[2][:100]
    for task in ("a", "b"):
        assert_close(plain(x)[task], zipped(x)[task])
    smaller, _ = mtz_tf.compress.merge_neurons(plain, 0.5)
    hidden = [layer.units for layer in smaller.layers if isinstance(layer, keras.layers.Dense)]
    assert hidden[:2] == [150, 50] and set(smaller(x)) == {"a", "b"}
    partial, _ = mtz_tf.zip_models({"a": lenet_a, "b": lenet_b}, calib, share=0.5, verbose=0)
    with pytest.raises(ValueError, match="not fully shared"):
        mtz_tf.zipped_network.multi_head_model(partial)


def _classifier(optimizer=None):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="out")])
    if optimizer is not None:
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    return model


def test_default_retraining_optimizer_is_the_input_models_own(caplog):
    """The input models' optimizer, fresh, at a tenth of its compiled learning rate (light
    retraining); a schedule as compiled; Adam at 1e-4 for uncompiled models."""
    stream = {"a": data.to_dataset(np.zeros((4, 4)), np.zeros(4, "int64"))}
    retrain = mtz_tf.Retrain(stream, 1, verbose=0)
    own = keras.optimizers.SGD(learning_rate=0.05, momentum=0.9)
    model = _classifier(own)
    resolved, record = resolve_optimizer(retrain, {"task 'a'": model, "task 'b'": model})
    assert retrain.optimizer is None  # the user's settings are not changed
    fresh = resolved.new_optimizer()
    assert isinstance(fresh, keras.optimizers.SGD) and fresh is not own
    assert float(fresh.learning_rate) == pytest.approx(0.005)
    assert float(own.learning_rate) == pytest.approx(0.05)
    assert record["class_name"] == "SGD"
    assert record["source"] == "task 'a' (its learning rate × 0.1)"
    assert record["config"]["momentum"] == pytest.approx(0.9)
    assert record["config"]["learning_rate"] == pytest.approx(0.005)
    assert json.loads(json.dumps(record)) == record
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, 100, 0.5)
    scheduled, record = resolve_optimizer(
        retrain, {"task 'a'": _classifier(keras.optimizers.SGD(schedule))}
    )
    assert record["source"] == "task 'a'"
    rate = scheduled.new_optimizer().learning_rate  # at iteration 0, the schedule's start
    assert float(rate) == pytest.approx(0.05)
    # Uncompiled models: Adam at 1e-4.
    _, record = resolve_optimizer(retrain, {"task 'a'": _classifier()})
    assert (record["class_name"], record["source"]) == ("Adam", "default")
    assert record["config"]["learning_rate"] == pytest.approx(1e-4)
    # The user's choice wins.
    chosen = mtz_tf.Retrain(stream, 1, optimizer=keras.optimizers.RMSprop(2e-4), verbose=0)
    _, record = resolve_optimizer(chosen, {"task 'a'": model})
    assert (record["class_name"], record["source"]) == ("RMSprop", "Retrain.optimizer")
    # Models that disagree: the first one's, said in the record and a warning.
    other = _classifier(keras.optimizers.Adam(3e-4))
    with caplog.at_level("WARNING"):
        resolved, record = resolve_optimizer(retrain, {"task 'a'": other, "task 'b'": model})
    assert isinstance(resolved.new_optimizer(), keras.optimizers.Adam)
    assert record["config"]["learning_rate"] == pytest.approx(3e-5)
    assert "differ" in record["source"] and "task 'b'" in record["source"]
    assert "different optimizers" in caplog.text


def test_joint_retraining_feeds_each_task_through_its_own_path(fashion):
    """With nothing shared the tasks are separate networks: what joint retraining does to
    task b's weights and BatchNorm statistics cannot depend on task a's data."""
    from conftest import with_batch_norm_statistics

    from mtz_tf import graph, zipped_network
    from mtz_tf.retrain import retrain_jointly

    pair = {
        t: with_batch_norm_statistics(
            models.resnet20((28, 28, 1), 5, 0.25, seed=s, blocks_per_stage=1), s
        )
        for t, s in (("a", 1), ("b", 2))
    }
    x, y = fashion[0][:128], fashion[1][:128] % 5
    calib = data.to_dataset(x[:64], batch_size=64)
    zipped, _ = mtz_tf.zip_models(
        pair, {"a": calib, "b": calib}, share=0.0, repair="none", verbose=0
    )
    plan = graph.read_plan(pair["a"])
    before = _task_weights(zipped, 1)
    after = []
    for scale in (1.0, -3.0):
        model = zipped_network.build_model(
            plan, ["a", "b"], zipped_network.read_states(zipped, plan)
        )
        train = {
            "a": data.to_dataset(scale * x, y, batch_size=32),
            "b": data.to_dataset(x, y, batch_size=32),
        }
        retrain = mtz_tf.Retrain(train, optimizer=keras.optimizers.SGD(0.1), verbose=0)
        retrain_jointly(model, plan, retrain, steps=3, start_step=0)
        after.append(_task_weights(model, 1))
        assert any(np.any(v != w) for (_, v), (_, w) in zip(after[-1], before))
    for (name, first), (_, second) in zip(*after):
        assert_close(first, second, tol=1e-6, what=name)


def _task_weights(zipped, t):
    """(path, value) of task t's own kernels and BatchNorm variables in a zipped model."""
    from mtz_tf import zipped_network

    return [
        (variable.path, variable.numpy())
        for layer in zipped_network.zipped_layers(zipped)
        for variable in [layer.task_kernels[t], *(layer.norms[t].weights if layer.norms else [])]
    ]

"""Activations by identity, and zips refused when models compute different functions."""

import keras
import numpy as np
import pytest
from conftest import assert_close

import mtz_tf
from mtz_tf import activations, data, io_utils, models
from mtz_tf.compress import bn_graph, ista
from mtz_tf.compress import neuron_merging as nm


def relu(x):  # a user's function that shares Keras's name but computes tanh
    return keras.ops.tanh(x)


@keras.saving.register_keras_serializable(package="mtz_test")
def shifted_tanh(x):
    return keras.ops.tanh(x) + 0.25


@keras.saving.register_keras_serializable(package="mtz_test")
def centered(x):  # not element-wise: every output depends on every unit
    return x - keras.ops.mean(x, axis=-1, keepdims=True)


def _mlp(seed, activation="relu", use_bias=True, width=12, head="linear"):
    init = keras.initializers.GlorotUniform(seed=seed)
    inputs = keras.Input((8,))
    x = keras.layers.Dense(
        width,
        activation=activation,
        use_bias=use_bias,
        kernel_initializer=init,
        bias_initializer="glorot_uniform",
        name="h0",
    )(inputs)
    x = keras.layers.Dense(10, activation=activation, kernel_initializer=init, name="h1")(x)
    outputs = keras.layers.Dense(3, activation=head, kernel_initializer=init, name="out")(x)
    return keras.Model(inputs, outputs)


def _conv(seed, pool=2, strides=1, epsilon=1e-3, use_bias=True, batch_norm=True):
    init = keras.initializers.GlorotUniform(seed=seed)
    inputs = keras.Input((10, 10, 1))
    x = keras.layers.Conv2D(
        4, 3, strides=strides, use_bias=use_bias, kernel_initializer=init, name="c1"
    )(inputs)
    if batch_norm:
        x = keras.layers.BatchNormalization(epsilon=epsilon, name="bn1")(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.MaxPooling2D(pool, name="pool")(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, kernel_initializer=init, name="out")(x))
    if batch_norm:  # statistics other than the identity, so that folding them matters
        rng = np.random.default_rng(seed)
        bn = model.get_layer("bn1")
        gamma, variance = rng.uniform(0.5, 2.0, (2, 4))
        bn.set_weights([gamma, rng.normal(size=4), rng.normal(size=4), variance])
    return model


X = np.random.default_rng(0).standard_normal((64, 8)).astype("float32")


def _calibration(x=X, tasks=("a", "b")):
    return {t: data.to_dataset(x, batch_size=32) for t in tasks}


def test_identify_uses_the_function_not_its_name():
    assert activations.identify(keras.activations.relu) == "relu"
    assert activations.identify(relu) is None
    assert activations.identify(shifted_tanh) == "mtz_test>shifted_tanh"
    assert activations.resolve("mtz_test>shifted_tanh") is shifted_tanh
    assert activations.is_elementwise("mtz_test>shifted_tanh")
    assert not activations.is_elementwise("mtz_test>centered")


def test_an_unregistered_function_named_relu_is_refused_not_replaced():
    pair = {"a": _mlp(1, relu), "b": _mlp(2, relu)}
    with pytest.raises(ValueError, match="custom activation .*relu.*register_keras_serializable"):
        mtz_tf.zip_models(pair, _calibration(), share=0.0, verbose=0)


def test_a_registered_custom_activation_is_computed_saved_and_kept(tmp_path):
    model_a, model_b = _mlp(1, shifted_tanh), _mlp(2, shifted_tanh)
    zipped, _ = mtz_tf.zip_models(
        {"a": model_a, "b": model_b}, _calibration(), share=0.0, verbose=0
    )
    assert_close(zipped(X)["a"], model_a(X))
    assert_close(zipped(X)["b"], model_b(X))
    assert_close(mtz_tf.zipped_network.task_model(zipped, "b")(X), model_b(X))
    path = str(tmp_path / "z.keras")
    io_utils.save_model(zipped, path)
    assert_close(io_utils.load_model(path)(X)["a"], model_a(X))
    # Zipping a model with its own permutation recovers it exactly, through the custom act.
    permuted = models.permute_hidden(model_a, seed=3)
    zipped, _ = mtz_tf.zip_models({"a": model_a, "b": permuted}, _calibration(), verbose=0)
    assert_close(zipped(X)["b"], model_a(X))


def test_a_custom_activation_that_mixes_units_is_refused():
    pair = {"a": _mlp(1, centered), "b": _mlp(2, centered)}
    with pytest.raises(ValueError, match="does not act on each neuron alone"):
        mtz_tf.zip_models(pair, _calibration(), verbose=0)


@pytest.mark.parametrize(
    ("other", "pattern"),
    [
        (lambda: _mlp(2, "tanh"), "at layer 'h0': activation 'tanh' vs 'relu'"),
        (lambda: _mlp(2, use_bias=False), "at layer 'h0': use_bias False vs True"),
    ],
)
def test_zip_models_refuses_models_that_compute_other_functions(other, pattern):
    with pytest.raises(ValueError, match=pattern):
        mtz_tf.zip_models({"a": _mlp(1), "b": other()}, _calibration(), verbose=0)


@pytest.mark.parametrize(
    ("other", "pattern"),
    [
        (lambda: _conv(2, pool=3), "pool_size"),
        (lambda: _conv(2, strides=2), "strides"),
        (lambda: _conv(2, epsilon=1e-5), "BatchNormalization epsilon"),
    ],
)
def test_conv_options_must_agree(other, pattern):
    x = np.random.default_rng(1).standard_normal((32, 10, 10, 1)).astype("float32")
    with pytest.raises(ValueError, match=pattern):
        mtz_tf.zip_models({"a": _conv(1), "b": other()}, _calibration(x), verbose=0)


def test_add_task_refuses_a_model_with_other_activations():
    zipped, _ = mtz_tf.zip_models({"a": _mlp(1), "b": _mlp(2)}, _calibration(), verbose=0)
    with pytest.raises(ValueError, match="at layer 'h0': activation 'tanh' vs 'relu'"):
        mtz_tf.add_task(zipped, "c", _mlp(3, "tanh"), _calibration(tasks="abc"), verbose=0)
    with pytest.raises(ValueError, match="use_bias False vs True"):
        mtz_tf.add_task(zipped, "c", _mlp(3, use_bias=False), _calibration(tasks="abc"), verbose=0)


def test_add_task_refuses_other_pooling_and_accepts_the_same_function():
    x = np.random.default_rng(1).standard_normal((32, 10, 10, 1)).astype("float32")
    zipped, _ = mtz_tf.zip_models({"a": _conv(1), "b": _conv(2)}, _calibration(x), verbose=0)
    with pytest.raises(
        ValueError, match=r"at layer 'pool': pool_size \(3, 3\) vs \(2, 2\) \(zipped layer 'pool'\)"
    ):
        mtz_tf.add_task(zipped, "c", _conv(3, pool=3), _calibration(x, "abc"), verbose=0)
    with pytest.raises(ValueError, match="BatchNormalization epsilon"):
        mtz_tf.add_task(zipped, "c", _conv(3, epsilon=1e-5), _calibration(x, "abc"), verbose=0)
    joined, _ = mtz_tf.add_task(zipped, "c", _conv(3), _calibration(x, "abc"), verbose=0)
    assert set(joined.output) == {"a", "b", "c"}


X_IMAGE = np.random.default_rng(1).standard_normal((32, 10, 10, 1)).astype("float32")


def test_add_task_into_a_folded_zip_of_bias_free_batch_normalized_models():
    # Like mtz_tf.models.vgg16: Conv2D(use_bias=False) + BatchNorm, folded into a bias.
    pair = {"a": _conv(1, use_bias=False), "b": _conv(2, use_bias=False)}
    zipped, _ = mtz_tf.zip_models(
        pair, _calibration(X_IMAGE), share=0.0, batch_norm="fold", verbose=0
    )
    newcomer = _conv(3, use_bias=False)
    joined, _ = mtz_tf.add_task(zipped, "c", newcomer, _calibration(X_IMAGE, "abc"), verbose=0)
    outputs = joined(X_IMAGE)
    for task, model in dict(pair, c=newcomer).items():
        assert_close(outputs[task], model(X_IMAGE))
    # Without BatchNorm the newcomer's layer has no bias to fold into: another function.
    with pytest.raises(ValueError, match=r"at layer 'c1': use_bias False vs True"):
        mtz_tf.add_task(
            zipped,
            "c",
            _conv(3, use_bias=False, batch_norm=False),
            _calibration(X_IMAGE, "abc"),
            verbose=0,
        )


def _residual(seed, shortcut="h0"):
    init = keras.initializers.GlorotUniform
    inputs = keras.Input((8,))
    h = {"h0": keras.layers.Dense(8, kernel_initializer=init(seed), name="h0")(inputs)}
    h["h1"] = keras.layers.Dense(8, "relu", kernel_initializer=init(seed + 1), name="h1")(h["h0"])
    h["h2"] = keras.layers.Dense(8, kernel_initializer=init(seed + 2), name="h2")(h["h1"])
    x = keras.layers.Add(name="add")([h[shortcut], h["h2"]])
    x = keras.layers.Activation("relu", name="act")(x)
    return keras.Model(inputs, keras.layers.Dense(3, kernel_initializer=init(seed), name="out")(x))


def test_add_task_refuses_other_residual_wiring():
    zipped, _ = mtz_tf.zip_models(
        {"a": _residual(1), "b": _residual(4)}, _calibration(), share=0.0, verbose=0
    )
    with pytest.raises(
        ValueError, match=r"at layer 'add': inputs \['h1', 'h2'\] vs \['h0', 'h2'\]"
    ):
        mtz_tf.add_task(zipped, "c", _residual(7, "h1"), _calibration(tasks="abc"), verbose=0)


def test_add_task_compares_the_order_of_weightless_layers():
    def model(seed, pools):
        init = keras.initializers.GlorotUniform(seed=seed)
        inputs = keras.Input((10, 10, 1))
        x = keras.layers.Conv2D(4, 3, activation="relu", kernel_initializer=init, name="c1")(inputs)
        for kind in pools:  # 8x8 -> 4x4 -> 2x2; max then average is not average then max
            x = getattr(keras.layers, kind)(2, name=f"pool{kind[0]}")(x)
        x = keras.layers.Flatten()(x)
        return keras.Model(inputs, keras.layers.Dense(3, kernel_initializer=init, name="out")(x))

    order = ("MaxPooling2D", "AveragePooling2D")
    zipped, _ = mtz_tf.zip_models(
        {"a": model(1, order), "b": model(2, order)}, _calibration(X_IMAGE), verbose=0
    )
    with pytest.raises(ValueError, match="at layer 'poolA': layer type 'AveragePooling2D' vs"):
        mtz_tf.add_task(zipped, "c", model(3, order[::-1]), _calibration(X_IMAGE, "abc"), verbose=0)


def _two_layer_conv(seed, batch_norm_fc):
    init = keras.initializers.GlorotUniform
    inputs = keras.Input((10, 10, 1))
    x = keras.layers.Conv2D(4, 3, kernel_initializer=init(seed), name="c1")(inputs)
    x = keras.layers.Activation("relu")(keras.layers.BatchNormalization(name="bn1")(x))
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(6, kernel_initializer=init(seed + 1), name="fc")(x)
    if batch_norm_fc:
        x = keras.layers.BatchNormalization(name="bn_fc")(x)
    x = keras.layers.Activation("relu")(x)
    return keras.Model(inputs, keras.layers.Dense(3, kernel_initializer=init(seed), name="out")(x))


def test_add_task_needs_batch_norm_on_the_same_layers_as_a_task_mode_zip():
    zipped, _ = mtz_tf.zip_models(
        {"a": _two_layer_conv(1, False), "b": _two_layer_conv(2, False)},
        _calibration(X_IMAGE),
        share=0.0,
        verbose=0,
    )
    with pytest.raises(
        ValueError, match=r"at layer 'fc': BatchNormalization after it True vs False.*'task'"
    ):
        mtz_tf.add_task(
            zipped, "c", _two_layer_conv(3, True), _calibration(X_IMAGE, "abc"), verbose=0
        )


def test_a_custom_object_scope_does_not_make_a_function_a_builtin():
    with keras.saving.custom_object_scope({"relu": relu}):
        assert activations.identify(relu) is None
        assert activations.identify(keras.activations.relu) == "relu"
        assert activations.resolve("relu") is keras.activations.relu
        with pytest.raises(ValueError, match="custom activation .*relu.*register"):
            mtz_tf.zip_models({"a": _mlp(1, relu), "b": _mlp(2, relu)}, _calibration())


_MIXING = {"softmax", "log_softmax", "glu", "sparsemax"}


def test_every_keras_builtin_is_identified_and_the_element_wise_ones_pass_the_probe():
    names = [n for n in dir(keras.activations) if not n.startswith("_")]
    names = [n for n in names if n not in ("get", "serialize", "deserialize", "threshold")]
    assert {"celu", "log_sigmoid", "hard_tanh", "squareplus", "glu", "tanh_shrink"} <= set(names)
    for name in names:
        fn = getattr(keras.activations, name)
        identified = activations.identify(fn)  # an alias (swish) gives its function's name
        assert identified is not None and activations.resolve(identified) is fn, name
        elementwise = activations.is_elementwise(identified)
        assert elementwise == (name not in _MIXING), name
        assert activations._probe(fn) == elementwise, name  # the set agrees with the probe


def test_new_builtins_zip_and_a_softmax_head_is_kept():
    pair = {"a": _mlp(1, "celu", head="softmax"), "b": _mlp(2, "celu", head="softmax")}
    zipped, _ = mtz_tf.zip_models(pair, _calibration(), share=0.0, verbose=0)
    for task, model in pair.items():
        assert_close(zipped(X)[task], model(X))
        assert np.allclose(np.sum(zipped(X)[task], axis=-1), 1.0, atol=1e-5)


def elementwise_but_unregistered(x):
    return keras.ops.tanh(x) * 2.0


def test_neuron_merging_and_ista_name_an_unregistered_function_not_a_mixing_one():
    expected = r"unregistered custom function .*elementwise_but_unregistered.*cannot be checked"
    with pytest.raises(ValueError, match=expected + ".*register_keras_serializable"):
        nm.compress(_mlp(1, elementwise_but_unregistered), 0.5, merge=False)

    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation(elementwise_but_unregistered, name="act")(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, name="conv2")(x))
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(x))
    group = bn_graph.read_bn_graph(model).groups[0]
    assert not group.prunable
    assert "non-element-wise" not in group.reason
    assert "register_keras_serializable" in group.reason
    with pytest.raises(ValueError, match=expected):
        ista.rescale_gamma(model, 0.5)

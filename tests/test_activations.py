"""Activations by identity, and zips refused when models compute different functions."""

import keras
import numpy as np
import pytest
from conftest import assert_close

import mtz_tf
from mtz_tf import activations, data, io_utils, models


def relu(x):  # a user's function that shares Keras's name but computes tanh
    return keras.ops.tanh(x)


@keras.saving.register_keras_serializable(package="mtz_test")
def shifted_tanh(x):
    return keras.ops.tanh(x) + 0.25


@keras.saving.register_keras_serializable(package="mtz_test")
def centered(x):  # not element-wise: every output depends on every unit
    return x - keras.ops.mean(x, axis=-1, keepdims=True)


def _mlp(seed, activation="relu", use_bias=True, width=12):
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
    return keras.Model(inputs, keras.layers.Dense(3, kernel_initializer=init, name="out")(x))


def _conv(seed, pool=2, strides=1, epsilon=1e-3):
    init = keras.initializers.GlorotUniform(seed=seed)
    inputs = keras.Input((10, 10, 1))
    x = keras.layers.Conv2D(4, 3, strides=strides, kernel_initializer=init, name="c1")(inputs)
    x = keras.layers.BatchNormalization(epsilon=epsilon, name="bn1")(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.MaxPooling2D(pool)(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(3, kernel_initializer=init, name="out")(x))


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
    assert_close(mtz_tf.stack.task_model(zipped, "b")(X), model_b(X))
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
    with pytest.raises(ValueError, match="weightless layers"):
        mtz_tf.add_task(zipped, "c", _conv(3, pool=3), _calibration(x, "abc"), verbose=0)
    with pytest.raises(ValueError, match="BatchNormalization epsilon"):
        mtz_tf.add_task(zipped, "c", _conv(3, epsilon=1e-5), _calibration(x, "abc"), verbose=0)
    joined, _ = mtz_tf.add_task(zipped, "c", _conv(3), _calibration(x, "abc"), verbose=0)
    assert set(joined.output) == {"a", "b", "c"}

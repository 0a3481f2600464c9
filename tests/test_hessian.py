"""Streaming Hessians against a direct NumPy computation."""

import logging

import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close

from mtz_tf import hessian


def test_streamed_hessian_equals_direct_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(103, 5)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(16)  # uneven last batch
    h, n = hessian.input_hessian(lambda b: 2.0 * b, dataset, append_bias=True)
    x_tilde = np.hstack([2.0 * x.astype(np.float64), np.ones((103, 1))])
    np.testing.assert_allclose(h.numpy(), x_tilde.T @ x_tilde / 103, rtol=1e-6)
    assert n == 103 and h.dtype == tf.float64


def test_hessian_without_bias_and_with_feature_maps():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 2, 3)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(7)
    h, _ = hessian.input_hessian(lambda b: b, dataset, append_bias=False)
    flat = x.reshape(20, 6).astype(np.float64)
    np.testing.assert_allclose(h.numpy(), flat.T @ flat / 20, rtol=1e-6)


def test_hessian_under_mirrored_strategy_matches_default():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(16)
    expected, _ = hessian.input_hessian(lambda b: b, dataset)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored, n = hessian.input_hessian(lambda b: b, dataset)
    assert n == 64
    np.testing.assert_allclose(mirrored.numpy(), expected.numpy(), rtol=1e-10)


def test_empty_dataset_is_an_error():
    dataset = tf.data.Dataset.from_tensor_slices(np.zeros((0, 3), np.float32)).batch(4)
    with pytest.raises(ValueError, match="task 'a'.* is empty"):
        hessian.input_hessian(lambda b: b, dataset, description="task 'a' data")


def test_one_trace_serves_every_dataset_and_batch_size():
    """The features are traced once for three datasets of one spec, each ending in a short
    batch, and the Hessians equal the direct means over each dataset."""
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(n, 3)).astype(np.float32) for n in (7, 10, 5)]
    datasets = [tf.data.Dataset.from_tensor_slices(a).batch(4) for a in arrays]
    traces = []

    def features(batch, index):
        traces.append(index)
        return [batch * tf.cast(index + 1, batch.dtype)]

    results = hessian.dataset_hessians(features, datasets, [False], ["a", "b", "c"])
    assert len(traces) == 1
    for i, (a, (hessians, count)) in enumerate(zip(arrays, results)):
        scaled = a.astype(np.float64) * (i + 1)
        assert count == len(a)
        assert_close(hessians[0].numpy(), scaled.T @ scaled / len(a))


def test_passes_of_one_batch_do_not_look_like_retracing():
    """A zip makes one pass per layer, each with a new model; with one calibration batch per
    task every pass traces on its first call, which TensorFlow must not report as frequent
    retracing of one function."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    tf.get_logger().addHandler(handler)
    try:
        x = np.ones((4, 3), np.float32)
        for _ in range(12):
            ds = tf.data.Dataset.from_tensor_slices(x).batch(4)
            hessian.dataset_hessians(lambda b, t: [2.0 * b], [ds, ds], [True], ["a", "b"])
    finally:
        tf.get_logger().removeHandler(handler)
    assert not [m for m in messages if "retracing" in m]


def test_per_channel_hessians_are_each_channels_own():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(30, 4, 3)).astype(np.float32)  # rows (n, d, C)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(8)
    h, n = hessian.input_hessian(lambda b: hessian.PerChannel(b), dataset, append_bias=True)
    assert h.shape == (3, 5, 5) and n == 30
    for c in range(3):
        x_tilde = np.hstack([x[:, :, c].astype(np.float64), np.ones((30, 1))])
        np.testing.assert_allclose(h[c].numpy(), x_tilde.T @ x_tilde / 30, rtol=1e-6)


@pytest.mark.parametrize("append_bias", [True, False])
def test_channel_mode_rows_match_a_float64_reference_to_rounding(append_bias):
    """A conv layer's per-pixel rows (the "channel" mode, a row per pixel) give Σ x̃ x̃ᵀ / N to
    float64 rounding: no float32 product or sum anywhere. The inputs have a non-zero mean,
    so the bias row and column (Σ x and N) are large, and the last batch is short."""
    rng = np.random.default_rng(5)
    x = (3.0 + rng.normal(size=(11, 4, 5, 7))).astype(np.float32)  # maps (N, H, W, C)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(4)  # batches of 4, 4, 3
    h, n = hessian.input_hessian(lambda b: tf.reshape(b, [-1, 7]), dataset, append_bias)
    rows = x.reshape(-1, 7).astype(np.float64)  # (N·H·W, C)
    if append_bias:
        rows = np.hstack([rows, np.ones((len(rows), 1))])
    assert n == 11 * 4 * 5 and h.dtype == tf.float64
    assert_close(h.numpy(), rows.T @ rows / len(rows), tol=1e-12)


def test_cross_and_per_channel_moments_match_a_float64_reference_to_rounding():
    """The bias-bordered :class:`hessian.Cross` and :class:`hessian.PerChannel` moments equal
    the products of explicitly augmented float64 rows to rounding."""
    rng = np.random.default_rng(6)
    x = (2.0 + rng.normal(size=(50, 6))).astype(np.float32)
    y = (-1.0 + rng.normal(size=(50, 3))).astype(np.float32)
    p = (1.0 + rng.normal(size=(50, 4, 3))).astype(np.float32)  # per-channel rows (n, d, C)

    def tilde(a):
        return np.concatenate([a.astype(np.float64), np.ones(a.shape[:1] + (1,) + a.shape[2:])], 1)

    cross, n = hessian.outer_sum(hessian.Cross(tf.constant(x), tf.constant(y)), True)
    assert_close(cross.numpy(), tilde(x).T @ tilde(y), tol=1e-12)
    per_channel, _ = hessian.outer_sum(hessian.PerChannel(tf.constant(p)), True)
    expected = np.einsum("npc,nqc->cpq", tilde(p), tilde(p))
    assert per_channel.shape == (3, 5, 5) and float(n) == 50
    assert_close(per_channel.numpy(), expected, tol=1e-12)


def test_rows_of_width_zero_leave_the_bias_entry_alone():
    dataset = tf.data.Dataset.from_tensor_slices(np.zeros((5, 0), np.float32)).batch(2)
    h, n = hessian.input_hessian(lambda b: b, dataset, append_bias=True)
    assert n == 5
    np.testing.assert_array_equal(h.numpy(), [[1.0]])
    cross, _ = hessian.outer_sum(hessian.Cross(tf.zeros([3, 0]), tf.ones([3, 2])), True)
    np.testing.assert_array_equal(cross.numpy(), [[3.0, 3.0, 3.0]])


def test_squares_rows_give_each_columns_sum_of_squares_and_sum():
    rng = np.random.default_rng(3)
    x = rng.normal(3.0, 2.0, size=(50, 4, 4, 6)).astype(np.float32)
    sums, n = hessian.outer_sum(hessian.Squares(tf.reshape(x, [-1, 6])), append_bias=True)
    rows = x.reshape(-1, 6).astype(np.float64)
    expected = np.stack([(rows**2).sum(0), rows.sum(0)])
    assert float(n) == len(rows)
    np.testing.assert_allclose(sums.numpy(), expected, rtol=1e-12)

"""Streaming layer-input Hessians from calibration batches.

For a layer whose input for one sample is x (d,), the layer-wise error of changing a
neuron's incoming weights w by δ is ½ δᵀ H δ with

    H = (1/N) Σ_n x̃_n x̃_nᵀ,   x̃ = [x; 1] when the bias is merged, else x,

over the N calibration samples (the same H for every neuron of the layer). Batches are
reduced to their (d, d) sum of outer products as they stream by, in float64, so memory is
O(d²) whatever N is. Accumulation runs under ``tf.distribute.get_strategy()``: under a
``MirroredStrategy`` each replica reduces its share of every batch and the sums are added.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class PerChannel:
    """Layer-input rows (n, d, C) that make C Hessians, one per channel c of rows[:, :, c]
    (:func:`outer_sum`): e.g. each channel's kh·kw patches for a depthwise convolution."""

    rows: tf.Tensor


@dataclasses.dataclass(frozen=True)
class Cross:
    """Two row sets of one batch, (n, d) and (n, e), whose cross moment Σ_n x̃_n ỹ_nᵀ
    (:func:`outer_sum`) is wanted: e.g. a layer's inputs in a zipped model and in the
    original one, for a least-squares refit (:mod:`mtz_tf.repair`)."""

    x: tf.Tensor
    y: tf.Tensor


@dataclasses.dataclass(frozen=True)
class Squares:
    """Rows (n, d) of which only each column's sums are wanted (:func:`outer_sum`): the
    diagonal of Σ_n x_n x_nᵀ and Σ_n x_n, e.g. for per-channel means and variances
    (BatchNorm statistics), at O(n·d) instead of the full moment's O(n·d²)."""

    rows: tf.Tensor


def _flat_rows(x) -> tf.Tensor:
    """Float64 rows (n, d) of a batch (n, ...). Rows already 2-D are not reshaped: every op
    adds to the trace that each Hessian pass makes anew."""
    if x.shape.rank != 2:
        x = tf.reshape(x, [tf.shape(x)[0], -1])  # (n, d)
    return tf.cast(x, tf.float64)


def _bordered(xy: tf.Tensor, x: tf.Tensor, y: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
    """Σ_n x̃_n ỹ_nᵀ of rows x (n, d) and y (n, e) augmented with a 1, x̃ = [x; 1] and
    ỹ = [y; 1], from their plain moment xy = Σ_n x_n y_nᵀ (d, e) and the row count n:

        Σ_n x̃_n ỹ_nᵀ = [[Σ x yᵀ, Σ x], [Σ yᵀ, n]],

    with the sums as products with a ones vector, xᵀ1 and 1ᵀy. The product of the augmented
    rows would first copy them to append the 1, which takes more time than the sums (rows
    of a conv layer in "channel" mode: d = 64, n = batch·H·W); a ones-vector product also
    runs about twice as fast as a reduction over the rows. Equal to that product up to the
    order of float64 rounding.
    """
    ones = tf.ones([tf.shape(x)[0], 1], x.dtype)  # (n, 1)
    sum_x = tf.matmul(x, ones, transpose_a=True)  # (d, 1)
    sum_y = tf.transpose(sum_x) if y is x else tf.matmul(ones, y, transpose_a=True)  # (1, e)
    corner = tf.reshape(n, [1, 1])
    return tf.concat([tf.concat([xy, sum_x], 1), tf.concat([sum_y, corner], 1)], 0)


def outer_sum(x, append_bias: bool) -> tuple[tf.Tensor, tf.Tensor]:
    """Σ_n x̃_n x̃_nᵀ (float64, (d, d) or (d+1, d+1)) and the row count n of a batch (n, d)
    (or (n, ...), flattened per row).

    :class:`PerChannel` rows (n, d, C) give C Hessians, one per channel: (C, d, d) (or
    (C, d+1, d+1)); :class:`Cross` rows give Σ_n x̃_n ỹ_nᵀ, (d(+1), e(+1)); :class:`Squares`
    rows give [Σ_n x_n²; Σ_n x_n] (2, d), whatever ``append_bias``. Plain and
    :class:`Cross` rows are cast to float64 once and bordered with the bias's row and column
    (:func:`_bordered`) rather than copied with a 1 appended.
    """
    if isinstance(x, Squares):
        x = _flat_rows(x.rows)
        ones = tf.ones([1, tf.shape(x)[0]], x.dtype)
        sums = tf.matmul(ones, tf.concat([tf.square(x), x], axis=1))  # (1, 2d)
        return tf.reshape(sums, [2, -1]), tf.cast(tf.shape(x)[0], tf.float64)
    if isinstance(x, PerChannel):
        x = tf.cast(x.rows, tf.float64)
        if append_bias:
            x = tf.concat([x, tf.ones_like(x[:, :1])], axis=1)
        return tf.einsum("npc,nqc->cpq", x, x), tf.cast(tf.shape(x)[0], tf.float64)
    left = _flat_rows(x.x if isinstance(x, Cross) else x)  # (n, d)
    right = _flat_rows(x.y) if isinstance(x, Cross) else left  # (n, e)
    n = tf.cast(tf.shape(left)[0], tf.float64)
    moment = tf.matmul(left, right, transpose_a=True)  # (d, e)
    return (_bordered(moment, left, right, n) if append_bias else moment), n


def input_hessian(
    features: Callable[[tf.Tensor], tf.Tensor],
    dataset: tf.data.Dataset,
    append_bias: bool = True,
    description: str = "calibration data",
) -> tuple[tf.Tensor, int]:
    """Layer-input Hessian H = (1/N) Σ x̃ x̃ᵀ over a dataset, streamed batch by batch.

    Args:
        features: callable mapping a batch of model inputs to the layer inputs (n, d) (or any
            shape (n, ...), flattened per sample). Called inside a ``tf.function``.
        dataset: batched ``tf.data.Dataset`` of model inputs (no labels).
        append_bias: bool, whether x is augmented with a constant 1.
        description: str, names the data in error messages (e.g. ``"task 'a'"``).

    Returns:
        ``(H, N)``: the float64 (d, d) Hessian and the number of samples.

    Raises:
        ValueError: if the dataset is empty, or its layer inputs hold NaN or inf.
    """
    hessians, count = input_hessians(
        lambda batch: [features(batch)], dataset, [append_bias], description
    )
    return hessians[0], count


def input_hessians(
    features: Callable[[tf.Tensor], list],
    dataset: tf.data.Dataset,
    append_bias: list[bool],
    description: str = "calibration data",
) -> tuple[list[tf.Tensor], int]:
    """Several layers' input Hessians in one pass over the data (see :func:`input_hessian`).

    ``features`` maps a batch to a list of layer inputs, one per Hessian, and
    ``append_bias`` says for each whether x is augmented with a constant 1. Each H is
    normalised by its own row count (samples, or samples × positions for conv rows).
    """
    (result,) = dataset_hessians(
        lambda batch, index: features(batch), [dataset], append_bias, [description]
    )
    return result


def dataset_hessians(
    features: Callable[[tf.Tensor, tf.Tensor], list],
    datasets: list[tf.data.Dataset],
    append_bias: list[bool],
    descriptions: list[str],
) -> list[tuple[list[tf.Tensor], int]]:
    """:func:`input_hessians` of several datasets with one traced step.

    ``features(batch, index)`` receives the dataset's position in ``datasets`` as a scalar
    int32 tensor (e.g. to pick task ``index``'s tensors), so the step is traced once for
    all datasets of one element spec, whatever their batch sizes (a short last batch does
    not retrace).

    Returns:
        Per dataset, ``(hessians, samples)`` as :func:`input_hessians`.

    Raises:
        ValueError: if a dataset is empty, or its layer inputs hold NaN or inf (the message
            names it by its entry of ``descriptions``).
    """
    strategy = tf.distribute.get_strategy()

    def replica_step(batch, index):
        return [outer_sum(x, bias) for x, bias in zip(features(batch, index), append_bias)]

    def step(batch, index):
        sums = strategy.run(replica_step, args=(batch, index))
        reduce = tf.distribute.ReduceOp.SUM
        return [
            (strategy.reduce(reduce, total, axis=None), strategy.reduce(reduce, n, axis=None))
            for total, n in sums
        ]

    traced = {}  # element spec -> one tf.function of `step` for all datasets of that spec

    def traced_step(spec):
        if all(isinstance(s, tf.TensorSpec) for s in tf.nest.flatten(spec)):
            # A batched dataset's spec leaves the batch size open: one trace serves every
            # batch, the last short one included.
            signature = [spec, tf.TensorSpec([], tf.int32)]
            key = tuple(tf.nest.flatten(spec))
        else:  # e.g. per-replica values of a multi-device strategy
            signature, key = None, None
        if key not in traced:
            # Every pass traces its own features (a new model per zipped layer), so it wraps
            # a partial of `step`: TF keys its retracing statistics by a function's code, and
            # would otherwise count the passes' first traces as retraces of one function.
            traced[key] = tf.function(
                functools.partial(step), input_signature=signature, reduce_retracing=True
            )
        return traced[key]

    results = []
    for position, (dataset, description) in enumerate(zip(datasets, descriptions)):
        index = tf.constant(position, tf.int32)
        distributed = strategy.experimental_distribute_dataset(dataset)
        step_function = traced_step(distributed.element_spec)
        totals, counts = summed(step_function(batch, index) for batch in distributed)
        results.append((normalised(totals, counts, description), int(counts[0])))
    return results


def eager_moments(
    features: Callable,
    batches: list,
    append_bias: list[bool],
    descriptions: list[str],
) -> list[list[tf.Tensor]]:
    """:func:`dataset_hessians`' moments computed eagerly, batch by batch, in one process:
    per entry of ``batches`` (an iterable of batches: a dataset, or kept activations), the
    normalised sums of :func:`outer_sum` of ``features(batch, index)`` (``index`` the
    entry's position as a scalar int32 tensor). No ``tf.function`` is traced, which pays
    for a few calibration batches through a model that changes between passes.

    Raises:
        ValueError: as :func:`dataset_hessians`.
    """
    results = []
    for position, (entry, description) in enumerate(zip(batches, descriptions)):
        index = tf.constant(position, tf.int32)
        totals, counts = summed(
            [outer_sum(x, bias) for x, bias in zip(features(batch, index), append_bias)]
            for batch in entry
        )
        results.append(normalised(totals, counts, description))
    return results


def summed(batch_sums) -> tuple[list | None, list | None]:
    """``(totals, counts)``: the element-wise sums over batches of per-batch lists of
    :func:`outer_sum` results ``[(Σ x̃x̃ᵀ, n), ...]``; ``(None, None)`` for no batch."""
    totals, counts = None, None
    for sums in batch_sums:
        if totals is None:
            totals, counts = [t for t, _ in sums], [float(n) for _, n in sums]
        else:
            totals = [a + t for a, (t, _) in zip(totals, sums)]
            counts = [c + float(n) for c, (_, n) in zip(counts, sums)]
    return totals, counts


def normalised(totals, counts, description: str) -> list[tf.Tensor]:
    """The moments ``totals[i] / counts[i]`` of one dataset's summed outer products.

    Raises:
        ValueError: if the dataset gave no rows (``totals`` None) or its sums hold NaN or
            inf (the message names it by ``description``).
    """
    if totals is None or not all(counts):
        raise ValueError(
            f"The {description} is empty: a Hessian needs at least one calibration sample."
        )
    # A NaN or inf anywhere in a layer input reaches its sum of outer products, so one
    # check of the (d, d) totals covers every sample; later it would surface only as a
    # NaN cost.
    if not all(bool(tf.reduce_all(tf.math.is_finite(t))) for t in totals):
        raise ValueError(
            f"The {description} yields NaN or infinite layer inputs: it holds NaN/inf "
            "values or values too large for float32. Give finite, normalised calibration "
            "inputs."
        )
    return [t / c for t, c in zip(totals, counts)]

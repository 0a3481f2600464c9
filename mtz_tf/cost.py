"""Merge costs and optimally merged weights (closed forms of Multi-Task Zipping).

Symbols (DESIGN.md, "The mathematics"). A layer's input for task t, augmented with a
constant 1 when the bias is merged, is x (d,); H_t = E[x xᵀ] (d, d) is the layer-input
Hessian of task t. A neuron is its incoming weight vector w (d,); a weight matrix holds one
neuron per column, shape (d, n), optionally with leading "position" axes (P..., d, n) whose
costs add up (a convolution kernel in "channel" mode: one (d, n) slice per kernel position,
all sharing the same H).

Tying neuron i of task A to neuron j of task B to one vector w̃ costs, at the optimum

    w̃     = (H_A + H_B)⁻¹ (H_A a_i + H_B b_j)
    ΔE_ij = ½ dᵀ H_A (H_A + H_B)⁻¹ H_B d,   d = a_i − b_j,

which equals the paper's ½ dᵀ (H_A⁻¹ + H_B⁻¹)⁻¹ d without inverting a singular H_t. With
S = H_A + H_B = L Lᵀ (Cholesky), M = H_A S⁻¹ H_B is symmetric and equals H_A − H_A S⁻¹ H_A
= H_B − H_B S⁻¹ H_B, so for all pairs at once

    C = ½ (diag(AᵀMA) 1ᵀ + 1 diag(BᵀMB)ᵀ − 2 UᵀV),  U = L⁻¹ H_A A,  V = L⁻¹ H_B B,
    diag(AᵀMA) = colsum(A ⊙ H_A A) − colsum(U ⊙ U),   likewise for B,

which costs one Cholesky (d³/3), two products with H (2d²n each), two triangular solves
(d²n each) and one cross product (2dn²). A T-way tie is w̃ = (Σ H_t)⁻¹ Σ H_t w_t with cost
½ Σ_t (w_t − w̃)ᵀ H_t (w_t − w̃).

Per-neuron Hessians. A depthwise convolution's channel c reads its own input channel only,
so each neuron has its own Hessian H_{t,c} (its kh·kw patch, plus bias): Hessians are then
given as (n, d, d), one per weight column, and every formula above holds pair by pair, with
H_A = H_{A,i} and H_B = H_{B,j} for the pair (i, j) (DESIGN.md, "Depthwise convolutions").

Damping: every H_t is replaced by H_t + δ I with δ = ``damping`` · mean_t(mean(diag H_t))
(δ = ``damping`` when all Hessians are zero). The results are then the exact optimum for the
damped Hessians: finite for singular H_t, and along input directions no task ever excites
(dead inputs) the merged weight is the plain average of the tied weights.

All computation is float64 TensorFlow (runs on a GPU when present); inputs may be NumPy.
Without a GPU, the Cholesky factorisation and the triangular solves go to LAPACK through
SciPy, about twice as fast as TensorFlow's CPU kernels for them (benchmarks/bench_cost.py);
the functions then run eagerly only, which is how the zipper calls them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg
import tensorflow as tf

DEFAULT_DAMPING = 1e-6
"""Relative damping δ / mean(diag H); small enough not to move well-conditioned results."""


def _use_lapack() -> bool:
    return not tf.config.list_logical_devices("GPU")


def _cholesky(s: tf.Tensor) -> tf.Tensor:
    """Lower Cholesky factor L of an SPD matrix, S = L Lᵀ."""
    if _use_lapack():
        return tf.constant(scipy.linalg.cholesky(s.numpy(), lower=True, check_finite=False))
    return tf.linalg.cholesky(s)


def _solve_lower(chol: tf.Tensor, rhs: tf.Tensor) -> tf.Tensor:
    """L⁻¹ rhs for a lower-triangular L."""
    if _use_lapack():
        return tf.constant(
            scipy.linalg.solve_triangular(chol.numpy(), rhs.numpy(), lower=True, check_finite=False)
        )
    return tf.linalg.triangular_solve(chol, rhs, lower=True)


def _cholesky_solve(chol: tf.Tensor, rhs: tf.Tensor) -> tf.Tensor:
    """S⁻¹ rhs given the Cholesky factor L of S."""
    if _use_lapack():
        return tf.constant(
            scipy.linalg.cho_solve((chol.numpy(), True), rhs.numpy(), check_finite=False)
        )
    return tf.linalg.cholesky_solve(chol, rhs)


def _as_f64(x) -> tf.Tensor:
    return tf.convert_to_tensor(x, dtype=tf.float64)


def damp_hessians(hessians: Sequence, damping: float = DEFAULT_DAMPING) -> list[tf.Tensor]:
    """Returns [H_t + δ I] with δ = damping · mean_t(mean(diag H_t)) (or damping if that is 0)."""
    if damping < 0:
        raise ValueError(f"`damping` must be non-negative. Received: damping={damping}")
    hessians = [_as_f64(h) for h in hessians]
    scale = tf.reduce_mean(tf.stack([tf.reduce_mean(tf.linalg.diag_part(h)) for h in hessians]))
    delta = damping * tf.where(scale > 0, scale, tf.ones_like(scale))
    eye = tf.eye(tf.shape(hessians[0])[-1], dtype=tf.float64)
    return [h + delta * eye for h in hessians]


def is_per_neuron(hessian) -> bool:
    """Whether a Hessian is given per neuron, (n, d, d), rather than per layer, (d, d)."""
    return len(np.shape(hessian)) == 3


def _check_per_neuron(weights: Sequence[tf.Tensor], hessians: Sequence[tf.Tensor]) -> None:
    for i, (w, h) in enumerate(zip(weights, hessians)):
        if w.shape.rank != 2 or h.shape != (w.shape[1], w.shape[0], w.shape[0]):
            raise ValueError(
                f"With per-neuron Hessians, weight matrix {i} must be (d, n) and Hessian {i} "
                f"(n, d, d). Received {w.shape} and {h.shape}."
            )


def _check_shapes(weights: Sequence[tf.Tensor], hessians: Sequence[tf.Tensor]) -> None:
    if is_per_neuron(hessians[0]):
        _check_per_neuron(weights, hessians)
        return
    d = hessians[0].shape[-1]
    for i, h in enumerate(hessians):
        if h.shape.rank != 2 or h.shape[0] != h.shape[1] or h.shape[0] != d:
            raise ValueError(
                f"Hessian {i} must be square (d, d) with d={d}. Received shape {h.shape}."
            )
    for i, w in enumerate(weights):
        if w.shape.rank < 2 or w.shape[-2] != d:
            raise ValueError(
                f"Weight matrix {i} must have shape (..., d, n) with d={d} matching the "
                f"Hessians. Received shape {w.shape}."
            )
        if w.shape[:-1] != weights[0].shape[:-1]:
            raise ValueError(
                f"Weight matrices must agree on all but their last axis. Received "
                f"{weights[0].shape} and {w.shape}."
            )


def _columns(w: tf.Tensor) -> tf.Tensor:
    """(P..., d, n) -> (d, P·n): positions side by side, so one solve handles them all."""
    d, n = w.shape[-2], w.shape[-1]
    w = tf.reshape(w, [int(np.prod(w.shape[:-2])), d, n])  # (P, d, n)
    return tf.reshape(tf.transpose(w, [1, 0, 2]), [d, -1])  # (d, P·n)


def merge_costs(w_a, w_b, h_a, h_b, damping: float = DEFAULT_DAMPING) -> tf.Tensor:
    """Merge cost ΔE_ij of tying neuron i of task A to neuron j of task B, for all pairs.

    Args:
        w_a: (P..., d, n_a) weights of task A, one neuron per column (bias as last row when
            merged); leading position axes, if any, have their costs summed.
        w_b: (P..., d, n_b) weights of task B, same leading axes and d.
        h_a: (d, d) layer-input Hessian of task A.
        h_b: (d, d) layer-input Hessian of task B.
        damping: float, relative damping (module docstring).

    Returns:
        float64 tensor (n_a, n_b) of costs ½ dᵀ H_A (H_A + H_B)⁻¹ H_B d, clipped at 0
        (round-off can push exact zeros slightly negative).
    """
    w_a, w_b, h_a, h_b = (_as_f64(v) for v in (w_a, w_b, h_a, h_b))
    _check_shapes([w_a, w_b], [h_a, h_b])
    h_a, h_b = damp_hessians([h_a, h_b], damping)
    if is_per_neuron(h_a):
        return _per_neuron_merge_costs(w_a, w_b, h_a, h_b)
    n_a, n_b = w_a.shape[-1], w_b.shape[-1]
    positions = int(np.prod(w_a.shape[:-2]))
    a, b = _columns(w_a), _columns(w_b)  # (d, P·n_a), (d, P·n_b)
    ha_a, hb_b = h_a @ a, h_b @ b
    chol = _cholesky(h_a + h_b)
    u = _solve_lower(chol, ha_a)  # L⁻¹ H_A A
    v = _solve_lower(chol, hb_b)  # L⁻¹ H_B B

    def per_neuron(x: tf.Tensor, n: int) -> tf.Tensor:
        # Sum over d and positions of a (d, P·n) tensor -> (n,).
        return tf.reduce_sum(tf.reshape(x, [x.shape[0], positions, n]), axis=[0, 1])

    diag_a = per_neuron(a * ha_a - u * u, n_a)  # diag(AᵀMA)
    diag_b = per_neuron(b * hb_b - v * v, n_b)  # diag(BᵀMB)
    d = a.shape[0]
    u3 = tf.reshape(u, [d, positions, n_a])  # (d, P, n_a)
    v3 = tf.reshape(v, [d, positions, n_b])  # (d, P, n_b)
    cross = tf.einsum("dpi,dpj->ij", u3, v3)  # AᵀMB summed over positions
    cost = 0.5 * (diag_a[:, None] + diag_b[None, :] - 2.0 * cross)
    return tf.maximum(cost, 0.0)


PAIR_BLOCK = 1 << 22
"""Elements of the (pairs, d, d) systems solved at once for per-neuron Hessians."""


def _per_neuron_merge_costs(w_a, w_b, h_a, h_b) -> tf.Tensor:
    """:func:`merge_costs` with damped per-neuron Hessians h_a (n_a, d, d), h_b (n_b, d, d):
    ΔE_ij = ½ (H_{A,i} d)ᵀ (H_{A,i} + H_{B,j})⁻¹ (H_{B,j} d), d = a_i − b_j, solved for blocks
    of rows of pairs at once."""
    a, b = w_a.numpy().T, w_b.numpy().T  # (n_a, d), (n_b, d)
    h_a, h_b = h_a.numpy(), h_b.numpy()
    d, n_b = a.shape[1], b.shape[0]
    if d == 0:  # neurons without weights (a standalone BatchNorm kept per task) tie freely
        return tf.zeros((a.shape[0], n_b), tf.float64)
    rows = max(1, PAIR_BLOCK // max(n_b * d * d, 1))
    blocks = []
    for start in range(0, a.shape[0], rows):
        h_i = h_a[start : start + rows, None]  # (r, 1, d, d)
        delta = a[start : start + rows, None, :] - b[None]  # (r, n_b, d)
        left = np.einsum("ixpq,ijq->ijp", h_i, delta)  # H_{A,i} d
        right = np.einsum("jpq,ijq->ijp", h_b, delta)  # H_{B,j} d
        solved = np.linalg.solve(h_i + h_b[None], right[..., None])[..., 0]
        blocks.append(0.5 * np.sum(left * solved, axis=-1))
    cost = np.concatenate(blocks) if blocks else np.zeros((0, n_b))
    return tf.constant(np.maximum(cost, 0.0))


def merged_weights(
    weights: Sequence, hessians: Sequence, damping: float = DEFAULT_DAMPING
) -> tf.Tensor:
    """T-way Hessian-weighted merge w̃ = (Σ H_t)⁻¹ Σ H_t w_t of T aligned weight matrices.

    Args:
        weights: T arrays (P..., d, n); column j of every array is tied together.
        hessians: T arrays (d, d).
        damping: float, relative damping (module docstring).

    Returns:
        float64 tensor (P..., d, n) of merged weights.
    """
    if len(weights) != len(hessians) or not weights:
        raise ValueError(
            f"Need as many weight matrices as Hessians, at least one. Received "
            f"{len(weights)} and {len(hessians)}."
        )
    weights = [_as_f64(w) for w in weights]
    hessians = [_as_f64(h) for h in hessians]
    _check_shapes(weights, hessians)
    hessians = damp_hessians(hessians, damping)
    if is_per_neuron(hessians[0]):  # w̃_c = (Σ_t H_{t,c})⁻¹ Σ_t H_{t,c} w_{t,c} for every c
        if weights[0].shape[0] == 0:
            return weights[0]
        rhs = tf.add_n([tf.einsum("cpq,qc->cp", h, w) for h, w in zip(hessians, weights)])
        return tf.transpose(tf.linalg.solve(tf.add_n(hessians), rhs[..., None])[..., 0])
    shape = tf.shape(weights[0])
    positions = int(np.prod(weights[0].shape[:-2]))
    rhs = tf.add_n([h @ _columns(w) for h, w in zip(hessians, weights)])  # (d, P·n)
    solved = _cholesky_solve(_cholesky(tf.add_n(hessians)), rhs)
    d, n = weights[0].shape[-2], weights[0].shape[-1]
    solved = tf.transpose(tf.reshape(solved, [d, positions, n]), [1, 0, 2])  # (P, d, n)
    return tf.reshape(solved, shape)


def deviation_costs(
    weights: Sequence, hessians: Sequence, merged, damping: float = DEFAULT_DAMPING
) -> tf.Tensor:
    """Per-neuron cost ½ Σ_t (w_t − w̃)ᵀ H_t (w_t − w̃) of replacing every w_t by ``merged``.

    Args:
        weights: T arrays (P..., d, n); hessians: T arrays (d, d); merged: (P..., d, n),
            any tied weights (the optimum of :func:`merged_weights`, a plain average, ...).
        damping: float, relative damping of the Hessians (module docstring).

    Returns:
        float64 (n,), summed over positions.
    """
    hessians = damp_hessians(hessians, damping)
    if is_per_neuron(hessians[0]):
        deltas = [_as_f64(w) - _as_f64(merged) for w in weights]  # (d, n)
        return 0.5 * tf.add_n(
            [tf.einsum("pc,cpq,qc->c", x, h, x) for x, h in zip(deltas, hessians)]
        )
    merged = _columns(_as_f64(merged))  # (d, P·n)
    w0 = _as_f64(weights[0])
    positions, n = int(np.prod(w0.shape[:-2])), w0.shape[-1]
    total = tf.zeros([n], tf.float64)
    for w, h in zip(weights, hessians):
        delta = _columns(_as_f64(w)) - merged  # (d, P·n)
        total += tf.reduce_sum(tf.reshape(delta * (h @ delta), [-1, positions, n]), [0, 1])
    return 0.5 * total


def tie_costs(weights: Sequence, hessians: Sequence, damping: float = DEFAULT_DAMPING) -> tf.Tensor:
    """Per-neuron cost of a T-way tie at its optimum w̃ (:func:`merged_weights`).

    Args and damping as :func:`merged_weights`. Returns float64 (n,), summed over positions.
    """
    merged = merged_weights(weights, hessians, damping)
    return deviation_costs(weights, hessians, merged, damping)

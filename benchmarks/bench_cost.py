"""Merge-cost throughput, as ratios measured within one run.

1. Channel mode at the size of the reference code's VGG-16 conv5 layers (d = 513 per kernel
   position, 9 positions, 512 x 512 neuron pairs): ``merge_costs`` plus ``merged_weights``
   of the 512 matched pairs, against the reference code's formulation: Python loops over
   pairs and kernel positions computing, for every pair and position, the cost
   ½ dᵀ Ĥ d with Ĥ = (H_A⁻¹ + H_B⁻¹)⁻¹ and the merged vector a − H_A⁻¹ Ĥ d (two
   matrix-vector products), with Ĥ and H_A⁻¹ Ĥ precomputed. The loop is timed on a slice of
   pairs and extrapolated. Target: >= 1,000x faster.
2. Full patch mode at VGG-16 size (d = 4,609, 512 x 512): ``merge_costs`` against the time
   this machine's float64 matmul needs for the FLOPs of the cheapest exact formulation
   (Cholesky d³/3, H_A A and H_B B 2d²n each, two triangular solves d²n each, the n x n
   cross product 2dn²). Target: within 2x.

    python benchmarks/bench_cost.py [--slice_pairs=300]
"""

import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from mtz_tf import cost

FLAGS = flags.FLAGS
flags.DEFINE_integer("slice_pairs", 300, "Pairs timed in the reference per-pair loop.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (the best is kept).")


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def spd(rng, d, rank):
    a = rng.normal(size=(d, rank))
    return np.eye(d) + a @ a.T / rank


def channel_mode(rng) -> float:
    d, positions, n = 513, 9, 512
    h_a, h_b = spd(rng, d, 64), spd(rng, d, 64)
    w_a = rng.normal(size=(positions, d, n))
    w_b = rng.normal(size=(positions, d, n))
    matched = np.arange(n)

    def ours_fn():
        cost.merge_costs(w_a, w_b, h_a, h_b).numpy()
        cost.merged_weights([w_a[..., matched], w_b[..., matched]], [h_a, h_b]).numpy()

    ours = best_time(ours_fn, FLAGS.repeats)

    h_hat = np.linalg.inv(np.linalg.inv(h_a) + np.linalg.inv(h_b))
    step_a = np.linalg.inv(h_a) @ h_hat
    pairs = [(i % n, (7 * i) % n) for i in range(FLAGS.slice_pairs)]

    def reference_loop():
        out = np.empty(len(pairs))
        merged = np.empty((positions, d))
        for index, (i, j) in enumerate(pairs):
            total = 0.0
            for p in range(positions):
                diff = w_a[p, :, i] - w_b[p, :, j]
                merged[p] = w_a[p, :, i] - step_a @ diff
                total += 0.5 * diff @ h_hat @ diff
            out[index] = total
        return out

    loop = best_time(reference_loop, 1) * (n * n) / len(pairs)
    # Same numbers from both, on the slice.
    ours_slice = cost.merge_costs(w_a, w_b, h_a, h_b, damping=0.0).numpy()
    expected = reference_loop()
    got = np.array([ours_slice[i, j] for i, j in pairs])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    print(
        f"[1] channel mode d=513 x 9 positions, 512x512 pairs: merge_costs {ours:.3f} s; "
        f"reference per-pair loop {loop:.1f} s (extrapolated from {len(pairs)} pairs); "
        f"speed-up {loop / ours:,.0f}x (target >= 1,000x)"
    )
    return loop / ours


def patch_mode(rng) -> float:
    d, n = 4609, 512
    h_a, h_b = spd(rng, d, 256), spd(rng, d, 256)
    w_a, w_b = rng.normal(size=(d, n)), rng.normal(size=(d, n))
    h_a_t, h_b_t = tf.constant(h_a), tf.constant(h_b)
    w_a_t, w_b_t = tf.constant(w_a), tf.constant(w_b)
    ours = best_time(lambda: cost.merge_costs(w_a_t, w_b_t, h_a_t, h_b_t).numpy(), FLAGS.repeats)
    flops = d**3 / 3 + 2 * (2 * d * d * n) + 2 * (d * d * n) + 2 * d * n * n
    big, rhs = tf.constant(h_a), tf.constant(w_a)
    # The floor uses the faster of TensorFlow's and NumPy's matmul on this machine.
    matmul = min(
        best_time(lambda: tf.matmul(big, rhs).numpy(), FLAGS.repeats),
        best_time(lambda: h_a @ w_a, FLAGS.repeats),
    )
    rate = 2 * d * d * n / matmul
    floor = flops / rate
    print(
        f"[2] patch mode d=4609, 512x512 pairs: merge_costs {ours:.3f} s; "
        f"{flops / 1e9:.1f} GFLOP at this machine's float64 matmul rate "
        f"({rate / 1e9:.1f} GFLOP/s) take {floor:.3f} s; ratio {ours / floor:.2f}x "
        "(target <= 2x)"
    )
    return ours / floor


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    speedup = channel_mode(rng)
    ratio = patch_mode(rng)
    print(
        f"SUMMARY channel-mode speed-up {speedup:,.0f}x; patch-mode time / matmul floor "
        f"{ratio:.2f}x"
    )


if __name__ == "__main__":
    app.run(main)

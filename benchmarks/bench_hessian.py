"""Conv-layer Hessian accumulation throughput, and where the time of a zip goes.

1. Streaming input Hessians of a conv layer with 64 input channels on 32x32 maps and a
   3x3 "same" kernel, in both modes: "channel" (per-pixel covariance, d = 65) and "patch"
   (im2col patches, d = 577). Reported as samples/s and as the fraction of this machine's
   float64 matmul throughput that the accumulation achieves on its FLOPs (2·rows·d² per
   batch): over a whole `hessian.input_hessian` call, and per batch in the steady state,
   i.e. the time of the later batches (a call over all batches less one over the first),
   without the fixed cost of a call (tracing and instantiating its step, which every call
   does anew), printed on its own. The matmul, the whole call and the first-batch call are
   timed in five interleaved rounds and the least time of each is kept, so that a load
   from other processes weighs on them alike.
2. End-to-end zip (no retraining) of two networks, split into Hessians, costs + matching +
   merge, and model rebuild, from the report's per-layer timings: LeNet-5, VGG-16 (width
   0.5, 32x32 inputs, BatchNorm) and ResNet-20 (32x32, BatchNorm, shortcuts; its residual
   streams add the provisional alignment on the input models).

    python benchmarks/bench_hessian.py [--batches=4]
"""

import functools
import time
import types

import numpy as np
import tensorflow as tf
from absl import app, flags

from mtz_tf import hessian, layer_zip, models, zip_models

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 32, "Samples per calibration batch.")
flags.DEFINE_integer("batches", 4, "Calibration batches per measurement.", lower_bound=2)


def least_seconds(functions: list, rounds: int = 5) -> list[float]:
    """Least wall time of each function over ``rounds`` rounds that call them in turn."""
    times = [[] for _ in functions]
    for _ in range(rounds):
        for function, spent in zip(functions, times):
            began = time.perf_counter()
            function()
            spent.append(time.perf_counter() - began)
    return [min(spent) for spent in times]


def hessian_throughput() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(FLAGS.batch_size * FLAGS.batches, 32, 32, 64)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(FLAGS.batch_size).cache()
    conv = types.SimpleNamespace(conv=((3, 3), (1, 1), "same"))
    modes = {
        "channel": (lambda b: tf.reshape(b, [-1, 64]), 65),
        "patch": (lambda b: layer_zip.patches(b, conv), 3 * 3 * 64 + 1),
    }
    a = tf.constant(rng.normal(size=(2048, 2048)))
    tf.matmul(a, a).numpy()
    for mode, (features, d) in modes.items():
        hessian.input_hessian(features, dataset)  # first trace of the process, fills the cache
        matmul, whole, first = least_seconds(
            [
                lambda: tf.matmul(a, a).numpy(),
                functools.partial(hessian.input_hessian, features, dataset),
                functools.partial(hessian.input_hessian, features, dataset.take(1)),
            ]
        )
        rate = 2 * 2048**3 / matmul
        batch = (whole - first) / (FLAGS.batches - 1)  # steady-state seconds per batch
        flops = 2.0 * FLAGS.batch_size * 32 * 32 * d * d  # per batch
        print(
            f"[1] {mode:7s} d={d:4d}: whole call {FLAGS.batch_size / whole * FLAGS.batches:8.1f} "
            f"samples/s, {flops * FLAGS.batches / whole / rate:5.1%}; steady state "
            f"{FLAGS.batch_size / batch:8.1f} samples/s, {flops / batch / 1e9:6.2f} GFLOP/s = "
            f"{flops / batch / rate:5.1%} of float64 matmul ({rate / 1e9:.1f} GFLOP/s); fixed "
            f"cost of a call {(first - batch) * 1e3:.0f} ms"
        )


def zip_phases() -> None:
    rng = np.random.default_rng(2)
    cases = {
        "LeNet-5 (28x28)": ((28, 28, 1), lambda s: models.lenet5(seed=s)),
        "VGG-16 x0.5 + BN (32x32)": (
            (32, 32, 3),
            lambda s: models.vgg16((32, 32, 3), 10, 0.5, seed=s),
        ),
        "ResNet-20 + BN (32x32)": ((32, 32, 3), lambda s: models.resnet20(seed=s)),
    }
    for name, (shape, build) in cases.items():
        pair = {"a": build(1), "b": build(2)}
        x = rng.normal(size=(512,) + shape).astype(np.float32)
        calib = tf.data.Dataset.from_tensor_slices(x).batch(128)
        began = time.perf_counter()
        _, report = zip_models(pair, {"a": calib, "b": calib}, share=1.0, verbose=0)
        total = time.perf_counter() - began
        phases = (
            {"provisional alignment": report.alignment_seconds} if report.coupled_groups else {}
        )
        for layer in report.layers:
            for phase, seconds in layer.timings.items():
                phases[phase] = phases.get(phase, 0.0) + seconds
        split = ", ".join(f"{p} {s:.2f}s ({s / total:.0%})" for p, s in phases.items())
        print(f"[2] {name}: zip of two, 512 calibration samples each, {total:.2f}s: {split}")


def main(argv):
    del argv
    hessian_throughput()
    zip_phases()


if __name__ == "__main__":
    app.run(main)

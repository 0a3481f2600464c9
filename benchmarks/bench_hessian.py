"""Conv-layer Hessian accumulation throughput, and where the time of a zip goes.

1. Streaming input Hessians of a conv layer with 64 input channels on 32x32 maps and a
   3x3 "same" kernel, in both modes: "channel" (per-pixel covariance, d = 65) and "patch"
   (im2col patches, d = 577). Reported as samples/s and as the fraction of this machine's
   float64 matmul throughput (measured in the same run) that the accumulation achieves on
   its FLOPs (2·rows·d² per batch).
2. End-to-end zip (no retraining) of two networks, split into Hessians, costs + matching +
   merge, and model rebuild, from the report's per-layer timings: LeNet-5, VGG-16 (width
   0.5, 32x32 inputs, BatchNorm) and ResNet-20 (32x32, BatchNorm, shortcuts; its residual
   streams add the provisional alignment on the input models).

    python benchmarks/bench_hessian.py [--batches=4]
"""

import time
import types

import numpy as np
import tensorflow as tf
from absl import app, flags

from mtz_tf import hessian, layer_zip, models, zip_models

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 32, "Samples per calibration batch.")
flags.DEFINE_integer("batches", 4, "Calibration batches per measurement.")


def matmul_rate() -> float:
    a = tf.constant(np.random.default_rng(0).normal(size=(2048, 2048)))
    tf.matmul(a, a).numpy()
    began = time.perf_counter()
    for _ in range(3):
        tf.matmul(a, a).numpy()
    return 3 * 2 * 2048**3 / (time.perf_counter() - began)


def hessian_throughput(rate: float) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(FLAGS.batch_size * FLAGS.batches, 32, 32, 64)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(FLAGS.batch_size).cache()
    conv = types.SimpleNamespace(conv=((3, 3), (1, 1), "same"))
    modes = {
        "channel": (lambda b: tf.reshape(b, [-1, 64]), 65),
        "patch": (lambda b: layer_zip.patches(b, conv), 3 * 3 * 64 + 1),
    }
    for mode, (features, d) in modes.items():
        hessian.input_hessian(features, dataset.take(1))  # trace and warm up
        began = time.perf_counter()
        hessian.input_hessian(features, dataset)
        seconds = time.perf_counter() - began
        samples = len(x)
        flops = 2.0 * samples * 32 * 32 * d * d
        print(
            f"[1] {mode:7s} d={d:4d}: {samples / seconds:8.1f} samples/s, "
            f"{flops / seconds / 1e9:6.2f} GFLOP/s = {flops / seconds / rate:5.1%} of "
            f"float64 matmul ({rate / 1e9:.1f} GFLOP/s)"
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
    rate = matmul_rate()
    hessian_throughput(rate)
    zip_phases()


if __name__ == "__main__":
    app.run(main)

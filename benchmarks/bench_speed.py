"""How fast a zip is, as ratios measured within one run (issue 14's yardsticks).

1. Zip time per calibration forward pass: two ResNet-20 (32x32 inputs, BatchNorm,
   shortcuts), ``--samples`` calibration samples each, zipped with the defaults and no
   retraining, against one forward pass of both input models over their calibration data
   (traced, warm). The zip's phases come from its report.
2. Retraining overhead: the same zip with ``--steps_per_layer`` joint retraining steps
   after every layer. The time retraining adds (zip with retraining minus zip without)
   against the compute of its steps: the same number of joint steps of the final zipped
   model through one warm traced step.
3. Kernels against this machine's float64 matmul: streaming conv Hessian accumulation in
   "channel" and "patch" mode (``bench_hessian``), and patch-mode ``merge_costs`` against
   its matmul floor (``bench_cost``).
4. With ``--resnet50``: a pair of ``keras.applications.ResNet50`` (weights=None, 32x32,
   10 classes) zipped with the defaults, against its calibration forward pass.

    python benchmarks/bench_speed.py [--samples=512] [--steps_per_layer=2] [--resnet50]
"""

import time

import bench_cost
import bench_hessian
import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

import mtz_tf
from mtz_tf import fitting, graph, models
from mtz_tf.retrain import _default_loss, _JointTrainer

FLAGS = flags.FLAGS
flags.DEFINE_integer("samples", 512, "Calibration samples per task.")
flags.DEFINE_integer("calibration_batch", 128, "Calibration batch size.")
flags.DEFINE_integer("steps_per_layer", 2, "Joint retraining steps after each layer.")
flags.DEFINE_integer("train_batch", 64, "Retraining batch size per task.")
flags.DEFINE_bool("resnet50", False, "Also zip two keras.applications ResNet50.")
flags.DEFINE_bool("kernels", True, "Measure the kernels against matmul ([3]).")


def forward_seconds(pair: dict, calibration: dict) -> float:
    """One forward pass of every input model over its calibration data (traced, warm)."""

    def one_pass():
        for task in pair:
            for batch in calibration[task]:
                traced[task](batch).numpy()

    traced = {t: tf.function(lambda x, m=m: m(x, training=False)) for t, m in pair.items()}
    one_pass()
    began = time.perf_counter()
    one_pass()
    return time.perf_counter() - began


def zip_seconds(pair: dict, calibration: dict, **options):
    began = time.perf_counter()
    zipped, report = mtz_tf.zip_models(pair, calibration, verbose=0, **options)
    return time.perf_counter() - began, zipped, report


def phases(report, total: float) -> str:
    split = {"provisional alignment": report.alignment_seconds} if report.coupled_groups else {}
    for layer in report.layers:
        for phase, seconds in layer.timings.items():
            split[phase] = split.get(phase, 0.0) + seconds
    return ", ".join(f"{p} {s:.2f}s ({s / total:.0%})" for p, s in split.items())


def step_compute_seconds(zipped, plan, train: dict, steps: int) -> float:
    """``steps`` joint steps of ``zipped`` through one warm traced step (no trace counted)."""
    tasks = list(zipped.output)
    trainer = _JointTrainer(zipped, plan, name="bench_trainer")
    trainer.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss={t: _default_loss(zipped, t) for t in tasks}
    )
    joint = tf.data.Dataset.zip({t: train[t].repeat() for t in tasks}).map(
        lambda b: ({t: b[t][0] for t in tasks}, {t: b[t][1] for t in tasks})
    )
    batches = list(joint.take(steps))
    fitting.build(trainer, joint)  # the loop's own set-up, outside the timing
    step = fitting.train_step_function(trainer)
    float(step(batches[0]))  # trace and warm up
    began = time.perf_counter()
    for batch in batches:
        float(step(batch))
    return time.perf_counter() - began


def zip_against_forward(pair: dict, rng):
    """``(x, calibration, forward seconds, zip seconds, report)`` of a default zip of
    ``pair`` (32x32x3 inputs) on ``--samples`` random calibration images per task."""
    x = rng.normal(size=(FLAGS.samples, 32, 32, 3)).astype(np.float32)
    calib = tf.data.Dataset.from_tensor_slices(x).batch(FLAGS.calibration_batch)
    calibration = {"a": calib, "b": calib}
    forward = forward_seconds(pair, calibration)
    seconds, _, report = zip_seconds(pair, calibration)
    return x, calibration, forward, seconds, report


def resnet20_ratios() -> None:
    rng = np.random.default_rng(0)
    pair = {"a": models.resnet20(seed=1), "b": models.resnet20(seed=2)}
    x, calibration, forward, plain, report = zip_against_forward(pair, rng)
    print(
        f"[1] ResNet-20 x2 (32x32, BN), {FLAGS.samples} calibration samples each: zip "
        f"{plain:.2f}s = {plain / forward:.1f}x one calibration forward pass of both input "
        f"models ({forward:.2f}s; target <= 6x). Phases: {phases(report, plain)}"
    )
    y = rng.integers(0, 10, size=FLAGS.samples)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(FLAGS.train_batch)
    retrain = mtz_tf.Retrain(
        {"a": train, "b": train}, steps_per_layer=FLAGS.steps_per_layer, verbose=0
    )
    retrained, zipped, _ = zip_seconds(pair, calibration, retrain=retrain)
    steps = FLAGS.steps_per_layer * len(report.layers)
    compute = step_compute_seconds(zipped, graph.read_plan(pair["a"]), retrain.train, steps)
    added = retrained - plain
    print(
        f"[2] the same zip with {FLAGS.steps_per_layer} joint retraining steps after each of "
        f"its {len(report.layers)} layers: {retrained:.2f}s; retraining adds {added:.2f}s = "
        f"{added / compute:.1f}x the compute of its {steps} steps ({compute:.2f}s in one warm "
        "traced step; target <= 3x)"
    )


def resnet50_ratio() -> None:
    rng = np.random.default_rng(1)
    pair = {}
    for task, seed in (("a", 1), ("b", 2)):
        keras.utils.set_random_seed(seed)
        pair[task] = keras.applications.ResNet50(
            weights=None, input_shape=(32, 32, 3), classes=10, name=f"resnet50_{task}"
        )
    _, _, forward, seconds, report = zip_against_forward(pair, rng)
    print(
        f"[4] keras.applications ResNet50 x2 (32x32), {FLAGS.samples} calibration samples "
        f"each, {len(report.layers)} layers: zip {seconds:.1f}s = {seconds / forward:.1f}x "
        f"one calibration forward pass ({forward:.2f}s). Phases: {phases(report, seconds)}"
    )


def main(argv):
    del argv
    resnet20_ratios()
    if FLAGS.kernels:
        print("[3] kernels against this machine's float64 matmul:")
        bench_hessian.hessian_throughput()
        bench_cost.patch_mode(np.random.default_rng(0))
    if FLAGS.resnet50:
        resnet50_ratio()


if __name__ == "__main__":
    app.run(main)

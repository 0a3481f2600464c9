"""Zips pre-trained models (one per task) into one multi-task model.

Example:
    python experiments/zip.py --models=artifacts/a.keras,artifacts/b.keras --tasks=a,b \
        --share=1.0 --retrain_steps=100 --output=artifacts/zipped.keras
"""

import quiet_startup  # noqa: F401 (first: quiets TensorFlow's native log)

import os

from absl import app, flags

import mtz_tf
from mtz_tf import cli, data, io_utils, zipper

FLAGS = flags.FLAGS
flags.DEFINE_list("models", None, "Comma-separated .keras models, one per task.", required=True)
flags.DEFINE_list(
    "tasks", None, "Task names, one per model (Python identifiers). Default: task0, task1, ..."
)
flags.DEFINE_enum("dataset", "fashion_mnist", ["fashion_mnist", "mnist"], "Dataset name.")
flags.DEFINE_string("data_dir", None, "Directory of MNIST-format IDX files.")
flags.DEFINE_multi_string(
    "classes",
    None,
    "Label subset of each task, in task order, e.g. "
    "--classes=0,1,2,3,4 --classes=5,6,7,8,9. Default: all classes.",
)
flags.DEFINE_integer(
    "calibration_size",
    2000,
    "Calibration samples per task (from the training split) for the layer Hessians.",
)
flags.DEFINE_string(
    "share",
    "1.0",
    "Fraction of every hidden layer to share (e.g. 1.0), or "
    "per-layer counts/fractions like 'fc1=200,fc2=0.5'.",
)
flags.DEFINE_enum("matching", "optimal", list(mtz_tf.matching.METHODS), "Neuron matching.")
flags.DEFINE_enum(
    "repair",
    mtz_tf.repair.DEFAULT_REPAIR,
    list(mtz_tf.repair.REPAIRS),
    "Repair after each zipped layer: BatchNorm re-estimation, or the next layer's "
    "least-squares refit (refit) / REPAIR statistics (statistics) without BatchNorm.",
)
flags.DEFINE_enum(
    "pairing", "hessian", list(zipper.PAIRINGS), "How neurons are paired (MTZ cost or a baseline)."
)
flags.DEFINE_enum("tie", "hessian", list(zipper.TIES), "The weights of a tied pair.")
flags.DEFINE_float(
    "damping",
    mtz_tf.cost.DEFAULT_DAMPING,
    "Relative Hessian damping (multiple of the mean Hessian diagonal).",
)
flags.DEFINE_integer(
    "retrain_steps",
    0,
    "Joint retraining iterations after each layer "
    "(one batch per task per iteration; 0: no retraining).",
)
flags.DEFINE_integer("retrain_batch_size", 32, "Samples per task per retraining iteration.")
flags.DEFINE_enum(
    "optimizer",
    "default",
    ["default", "adam", "sgd"],
    "Retraining optimizer. default: a fresh copy of the input models' compiled optimizer at "
    "a tenth of its compiled learning rate (light retraining), else Adam at 1e-4 (the report "
    "records which).",
)
flags.DEFINE_float("learning_rate", None, "Learning rate of --optimizer=adam|sgd (default 1e-3).")
flags.DEFINE_enum("eval_split", "test", ["validation", "test"], "Split for reported accuracy.")
flags.DEFINE_string("checkpoint_dir", None, "Save after every layer and resume from here.")
flags.DEFINE_integer("seed", 0, "Seed of calibration sampling, data order, random pairing.")
flags.DEFINE_string(
    "output",
    None,
    "Where to save the zipped model (.keras); the report goes next to it as .json and its "
    "figure as .png.",
    required=True,
)


def optimizer():
    """The --optimizer, or None for the library's default."""
    import keras

    if FLAGS.optimizer == "default":
        if FLAGS.learning_rate is not None:
            raise app.UsageError(
                "--learning_rate applies to --optimizer=adam or sgd; the default optimizer "
                "takes a tenth of the input models' compiled learning rate."
            )
        return None
    rate = 1e-3 if FLAGS.learning_rate is None else FLAGS.learning_rate
    cls = keras.optimizers.SGD if FLAGS.optimizer == "sgd" else keras.optimizers.Adam
    return cls(rate)


def main(argv):
    del argv
    tasks = FLAGS.tasks or [f"task{i}" for i in range(len(FLAGS.models))]
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        raise app.UsageError(
            f"--tasks repeats the name(s) {repeated}; give each task its own name."
        )
    if len(tasks) != len(FLAGS.models):
        raise app.UsageError(f"--tasks names {len(tasks)} tasks for {len(FLAGS.models)} models.")
    classes = FLAGS.classes or [None] * len(tasks)
    if len(classes) != len(tasks):
        raise app.UsageError("Give --classes once per task, or not at all.")
    models = {t: io_utils.load_model(path) for t, path in zip(tasks, FLAGS.models)}
    calibration, train, evaluation = {}, {}, {}
    for i, (task, task_classes) in enumerate(zip(tasks, classes)):
        labels = [int(c) for c in task_classes.split(",")] if task_classes else None
        splits = data.load_task(FLAGS.dataset, labels, FLAGS.data_dir, seed=FLAGS.seed)
        x, y = splits["train"]
        subset = data.calibration_subset(x, FLAGS.calibration_size, seed=FLAGS.seed + i)
        calibration[task] = data.to_dataset(subset, batch_size=500)
        train[task] = data.training_stream(x, y, FLAGS.retrain_batch_size, seed=FLAGS.seed + i)
        evaluation[task] = data.to_dataset(*splits[FLAGS.eval_split], batch_size=1000)
    retrain = None
    if FLAGS.retrain_steps:
        retrain = mtz_tf.Retrain(train, FLAGS.retrain_steps, optimizer=optimizer())
    cli.logger.info(
        "Zipping %s with share=%s, matching=%s, pairing=%s, tie=%s, repair=%s",
        tasks,
        FLAGS.share,
        FLAGS.matching,
        FLAGS.pairing,
        FLAGS.tie,
        FLAGS.repair,
    )
    zipped, report = mtz_tf.zip_models(
        models,
        calibration,
        share=zipper.parse_share(FLAGS.share),
        matching=FLAGS.matching,
        pairing=FLAGS.pairing,
        tie=FLAGS.tie,
        repair=FLAGS.repair,
        retrain=retrain,
        evaluation=evaluation,
        checkpoint_dir=FLAGS.checkpoint_dir,
        damping=FLAGS.damping,
        seed=FLAGS.seed,
    )
    io_utils.save_model(zipped, FLAGS.output)
    result = report.to_dict()
    result["flags"] = cli.own_flags()
    stem = os.path.splitext(FLAGS.output)[0]
    io_utils.write_json(stem + ".json", result)
    report.save_figure(stem + ".png")
    print(report.table())
    p = report.parameters
    cli.logger.info(
        "Saved %s (report %s.json, figure %s.png): %d parameters (%.1f%% of the %d of the "
        "input models)",
        FLAGS.output,
        stem,
        stem,
        p["total"],
        100 * p["ratio"],
        p["input_models"],
    )


if __name__ == "__main__":
    cli.run(main)

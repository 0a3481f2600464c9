"""One process of the multi-worker tests (tests/test_multi_worker.py): a zip through the
public API under ``--strategy`` (``default`` alone, or ``multi_worker`` with ``TF_CONFIG``).

    python tests/distributed_case.py --strategy=multi_worker --out_dir=DIR [--case=...]

Cases:

* ``api``: ``zip_models`` of two committed LeNet-300-100 with a ``ShareBudget``, REPAIR
  statistics, joint retraining and evaluation; ``add_task`` of a third; and a zip of two
  small BatchNorm CNNs (BatchNorm re-estimation, then retraining with the replicas'
  BatchNorms synchronised). Writes ``lenet.keras``, ``added.keras``,
  ``cnn.keras`` and ``reports.json`` to ``--out_dir`` through :mod:`mtz_tf.io_utils`.
* ``checkpoint``: ``zip_models`` of the LeNets with retraining and ``--checkpoint_dir``;
  writes ``resumed.keras``. With ``--crash_after_unit=N`` the non-chief worker exits
  (status 3) right after its save of unit N, as a worker that dies mid-zip.
"""

import os
import sys

from absl import flags

from mtz_tf import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", None, "Where the chief writes.", required=True)
flags.DEFINE_enum("case", "api", ["api", "checkpoint"], "What to run.")
flags.DEFINE_string("checkpoint_dir", None, "Checkpoint directory of the checkpoint case.")
flags.DEFINE_integer("crash_after_unit", 0, "Non-chief worker exits after this unit's save.")

PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pretrained")
CALIBRATION, EVALUATION, BATCH = 512, 1000, 128


def _data():
    from mtz_tf import data

    x, y = data.load("fashion_mnist", "train")
    x = data.normalize(x)
    calibration = data.to_dataset(data.calibration_subset(x, CALIBRATION, seed=0), batch_size=BATCH)
    streams = [data.training_stream(x, y, batch_size=32, seed=s) for s in range(3)]
    x_test, y_test = data.load("fashion_mnist", "test")
    evaluation = data.to_dataset(
        data.normalize(x_test)[:EVALUATION], y_test[:EVALUATION], batch_size=500
    )
    return calibration, streams, evaluation


def _lenets():
    from mtz_tf import io_utils

    return [
        io_utils.load_model(os.path.join(PRETRAINED, f"lenet300_seed{s}.keras")) for s in (1, 2, 3)
    ]


def _cnn(seed: int):
    import keras

    init = keras.initializers.GlorotUniform(seed)
    inputs = keras.Input((28, 28, 1))
    x = inputs
    for i, filters in enumerate((8, 12)):
        x = keras.layers.Conv2D(filters, 3, strides=2, kernel_initializer=init, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, kernel_initializer=init, name="head")(x))


def _api_case(calibration, streams, evaluation):
    import mtz_tf
    from mtz_tf import io_utils

    a, b, c = _lenets()
    retrain = mtz_tf.Retrain({"a": streams[0], "b": streams[1]}, steps_per_layer=3, verbose=0)
    zipped, report = mtz_tf.zip_models(
        {"a": a, "b": b},
        {"a": calibration, "b": calibration},
        share=mtz_tf.ShareBudget(parameters=0.5, steps=4),
        repair="statistics",
        retrain=retrain,
        evaluation={"a": evaluation, "b": evaluation},
        verbose=0,
    )
    added, added_report = mtz_tf.add_task(
        zipped,
        "c",
        c,
        {t: calibration for t in "abc"},
        retrain=mtz_tf.Retrain(dict(zip("abc", streams)), steps_per_layer=2, verbose=0),
        evaluation={t: evaluation for t in "abc"},
        verbose=0,
    )
    cnn, cnn_report = mtz_tf.zip_models(
        {"a": _cnn(1), "b": _cnn(2)},
        {"a": calibration, "b": calibration},
        retrain=mtz_tf.Retrain(
            {"a": streams[0], "b": streams[1]}, steps_per_layer=2, optimizer="sgd", verbose=0
        ),
        verbose=0,
    )
    io_utils.save_model(zipped, os.path.join(FLAGS.out_dir, "lenet.keras"))
    io_utils.save_model(added, os.path.join(FLAGS.out_dir, "added.keras"))
    io_utils.save_model(cnn, os.path.join(FLAGS.out_dir, "cnn.keras"))
    reports = {
        "lenet": report.to_dict(),
        "added": added_report.to_dict(),
        "cnn": cnn_report.to_dict(),
    }
    io_utils.write_json(os.path.join(FLAGS.out_dir, "reports.json"), reports)


def _checkpoint_case(calibration, streams):
    import mtz_tf
    from mtz_tf import checkpoint, distribution, io_utils

    if FLAGS.crash_after_unit:
        save = checkpoint.ZipCheckpoint.save

        def save_then_crash(self, model, completed, report):
            save(self, model, completed, report)
            if completed == FLAGS.crash_after_unit and not distribution.is_chief():
                print(f"crashing after unit {completed}", file=sys.stderr, flush=True)
                os._exit(3)

        checkpoint.ZipCheckpoint.save = save_then_crash
    a, b, _ = _lenets()
    zipped, _ = mtz_tf.zip_models(
        {"a": a, "b": b},
        {"a": calibration, "b": calibration},
        retrain=mtz_tf.Retrain({"a": streams[0], "b": streams[1]}, steps_per_layer=10, verbose=0),
        checkpoint_dir=FLAGS.checkpoint_dir,
        verbose=1,
    )
    io_utils.save_model(zipped, os.path.join(FLAGS.out_dir, "resumed.keras"))


def main(argv):
    del argv
    calibration, streams, evaluation = _data()
    if FLAGS.case == "api":
        _api_case(calibration, streams, evaluation)
    else:
        _checkpoint_case(calibration, streams)


if __name__ == "__main__":
    cli.run(main)

"""Trains one classifier on (a label split of) MNIST or Fashion-MNIST and saves it.

Example:
    python experiments/train.py --model=lenet300 --seed=1 --epochs=5 \
        --permute_hidden --output=artifacts/lenet_a.keras
"""

import quiet_startup  # noqa: F401 (first: quiets TensorFlow's native log)

import json
import os

from absl import flags

from mtz_tf import cli, data, io_utils, models, training

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "lenet300", sorted(models.BUILDERS), "Architecture to train.")
flags.DEFINE_enum("dataset", "fashion_mnist", ["fashion_mnist", "mnist"], "Dataset name.")
flags.DEFINE_string(
    "data_dir",
    None,
    "Directory of MNIST-format IDX files (default: Debian's Fashion-MNIST location, else TFDS).",
)
flags.DEFINE_list(
    "classes",
    None,
    "Label subset to train on (e.g. 0,1,2,3,4); labels are "
    "remapped to 0..n-1. Default: all ten classes.",
)
flags.DEFINE_integer("seed", 0, "Seed of weight initialisation and data order.")
flags.DEFINE_integer("epochs", 5, "Training epochs (full passes over the training split).")
flags.DEFINE_integer("batch_size", 128, "Samples per training step.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
flags.DEFINE_float("width_multiplier", 1.0, "Width multiplier (vgg16, resnet20 only).")
flags.DEFINE_integer("train_size", 0, "Use only the first N training samples (0: all).")
flags.DEFINE_boolean(
    "permute_hidden",
    False,
    "Randomly permute hidden units after training "
    "(function-preserving; as in the MTZ experiments).",
)
flags.DEFINE_string("output", None, "Where to save the model (.keras).", required=True)


def main(argv):
    del argv
    classes = [int(c) for c in FLAGS.classes] if FLAGS.classes else None
    splits = data.load_task(FLAGS.dataset, classes, FLAGS.data_dir, seed=FLAGS.seed)
    x, y = splits["train"]
    if FLAGS.train_size:
        x, y = x[: FLAGS.train_size], y[: FLAGS.train_size]
    num_classes = len(classes) if classes else 10
    model = models.build(FLAGS.model, x.shape[1:], num_classes, FLAGS.width_multiplier, FLAGS.seed)
    cli.logger.info(
        "Training %s on %d samples of %s (classes %s), seed %d, %d epochs",
        FLAGS.model,
        len(x),
        FLAGS.dataset,
        classes or "all",
        FLAGS.seed,
        FLAGS.epochs,
    )
    training.train_classifier(
        model,
        x,
        y,
        FLAGS.epochs,
        FLAGS.batch_size,
        FLAGS.learning_rate,
        validation=splits["validation"],
        seed=FLAGS.seed,
    )
    if FLAGS.permute_hidden:
        model = models.permute_hidden(model, seed=FLAGS.seed + 1000)
        training.compile_classifier(model, FLAGS.learning_rate)
    summary = {
        "flags": cli.own_flags(),
        "validation_accuracy": training.accuracy(model, *splits["validation"]),
        "test_accuracy": training.accuracy(model, *splits["test"]),
        "parameters": model.count_params(),
    }
    io_utils.save_model(model, FLAGS.output)
    io_utils.write_json(os.path.splitext(FLAGS.output)[0] + ".json", summary)
    cli.logger.info("Saved %s: %s", FLAGS.output, json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)

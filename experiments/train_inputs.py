"""Trains the experiments' input models to convergence and writes them to pretrained/.

    python experiments/train_inputs.py --sets=lenet300,lenet5,resnet20_split,resnet20_three

Sets (each model selected on its validation split by early stopping, Adam 1e-3):

* ``lenet300``, ``lenet5``: ``--pairs`` same-task pairs on all of Fashion-MNIST, seeds
  (2p+1, 2p+2) for pair p, saved as ``<name>_seed<seed>.keras``;
* ``lenet300_split``: ``--pairs`` pairs of LeNet-300-100, one per half of the labels (0-4,
  5-9), seeds (2p+1, 2p+2), saved as ``lenet300_<classes>_seed<seed>.keras`` (different
  tasks);
* ``resnet20_split``: ``--pairs`` pairs of ResNet-20 (width x1), one per half of the labels
  (0-4, 5-9), seeds (2p+1, 2p+2), saved as ``resnet20_w1_<classes>_seed<seed>.keras``;
* ``resnet20_three``: one ResNet-20 (width x1) per label group (0-2, 3-5, 6-9), seeds 1-3.

The ResNets use BatchNorm momentum 0.9, as the different-task experiments do.

Models already in ``--out_dir`` (with their record) are kept, so an interrupted run resumes.
Each file is saved compiled with a fresh Adam at the training learning rate (its optimizer
state is dropped, which keeps it small and tells a zip which optimizer to retrain with),
next to a JSON record of its training iterations, seconds, and validation and test
accuracy; ``index.md`` lists them all with the command. The test accuracy is recorded,
never used to select.
"""

import quiet_startup  # noqa: F401 (first: quiets TensorFlow's native log)

import functools
import os
import time

import residual_experiments as rx
from absl import app, flags

from mtz_tf import cli, data, io_utils, models, training

FLAGS = flags.FLAGS
SETS = ("lenet300", "lenet5", "lenet300_split", "resnet20_split", "resnet20_three")
flags.DEFINE_list("sets", list(SETS), f"Which model sets to train, from {SETS}.")
flags.DEFINE_integer("pairs", 3, "Seed pairs of the two-model sets.")
flags.DEFINE_string("out_dir", "pretrained", "Where the models, records and index go.")
flags.DEFINE_string("data_dir", None, "Directory of Fashion-MNIST IDX files.")
flags.DEFINE_integer("max_epochs", 40, "Epoch limit.")
flags.DEFINE_integer("patience", 3, "Early-stopping patience (epochs) on validation accuracy.")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")


def _specs(name: str):
    """(file stem, builder(seed), task classes or None, seed) of every model of a set."""
    if name in ("lenet300", "lenet5"):
        build = models.lenet_300_100 if name == "lenet300" else models.lenet5
        for seed in range(1, 2 * FLAGS.pairs + 1):
            yield f"{name}_seed{seed}", lambda s, b=build: b(seed=s), None, seed
        return
    if name in ("lenet300_split", "resnet20_split"):
        groups = [g for _ in range(FLAGS.pairs) for g in rx.SPLIT_GROUPS]
    else:
        groups = list(rx.THREE_GROUPS)
    for seed, classes in enumerate(groups, start=1):
        if name == "lenet300_split":
            stem = f"lenet300_{rx.group_name(classes)}_seed{seed}"
            build = functools.partial(_lenet300, len(classes))
        else:
            stem = f"resnet20_w1_{rx.group_name(classes)}_seed{seed}"
            build = functools.partial(_resnet20, len(classes))
        yield stem, build, classes, seed


def _lenet300(num_classes: int, seed: int):
    return models.lenet_300_100(num_classes=num_classes, seed=seed)


def _resnet20(num_classes: int, seed: int):
    return models.resnet20((28, 28, 1), num_classes, 1.0, seed=seed, bn_momentum=0.9)


def _train_one(stem: str, build, classes, seed: int) -> dict:
    """Trains (or reuses) one model; returns its record."""
    path = os.path.join(FLAGS.out_dir, stem + ".keras")
    record_path = os.path.join(FLAGS.out_dir, stem + ".json")
    if os.path.exists(path) and os.path.exists(record_path):
        cli.logger.info("Keeping %s (delete it to retrain)", path)
        return io_utils.read_json(record_path)
    splits = data.load_task("fashion_mnist", classes, data_dir=FLAGS.data_dir)
    model = build(seed)
    began = time.time()
    iterations = training.train_to_convergence(
        model,
        splits["train"],
        splits["validation"],
        FLAGS.max_epochs,
        FLAGS.patience,
        batch_size=FLAGS.batch_size,
        seed=seed,
        verbose=2,
    )
    seconds = time.time() - began
    record = {
        "model": stem,
        "classes": None if classes is None else list(classes),
        "seed": seed,
        "iterations": iterations,
        "train_samples": len(splits["train"][0]),
        "seconds": round(seconds, 1),
        "validation_accuracy": training.accuracy(model, *splits["validation"]),
        "test_accuracy": training.accuracy(model, *splits["test"]),
        "parameters": model.count_params(),
    }
    training.compile_classifier(model)  # a fresh optimizer: no state saved, small file
    io_utils.save_model(model, path)
    io_utils.write_json(record_path, record)
    cli.logger.info(
        "%s: validation %.2f %%, test %.2f %%",
        stem,
        100 * record["validation_accuracy"],
        100 * record["test_accuracy"],
    )
    return record


def _index(records: list, command: str) -> str:
    lines = [
        "# Converged input models",
        "",
        "Made by (early stopping on each model's validation split, Adam 1e-3, batch "
        f"{FLAGS.batch_size}, patience {FLAGS.patience}, at most {FLAGS.max_epochs} epochs):",
        "",
        "```",
        command,
        "```",
        "",
        "| model | classes | seed | iterations | seconds | validation acc | test acc | params |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        classes = "all" if r["classes"] is None else "".join(str(c) for c in r["classes"])
        lines.append(
            f"| {r['model']} | {classes} | {r['seed']} | {r['iterations']:,} | "
            f"{r['seconds']:.0f} | {100 * r['validation_accuracy']:.2f} | "
            f"{100 * r['test_accuracy']:.2f} | {r['parameters']:,} |"
        )
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.sets) - set(SETS))
    if unknown:
        raise app.UsageError(f"--sets: unknown {unknown}; choose from {SETS}.")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    command = "python experiments/train_inputs.py --sets=" + ",".join(SETS)
    for name in FLAGS.sets:
        for spec in _specs(name):
            _train_one(*spec)
    records = [
        io_utils.read_json(os.path.join(FLAGS.out_dir, f))
        for f in sorted(os.listdir(FLAGS.out_dir))
        if f.endswith(".json")
    ]
    io_utils.write_text(os.path.join(FLAGS.out_dir, "index.md"), _index(records, command))


if __name__ == "__main__":
    cli.run(main)

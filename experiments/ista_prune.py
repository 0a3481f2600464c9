"""ISTA channel pruning on BatchNorm scales vs l1-norm filter pruning, on Fashion-MNIST.

For one model (VGG-16 at a small width, or ResNet-20), this binary

1. trains it from scratch on a training subset (or reloads that pre-trained model from
   --output_dir), selecting nothing on the test set;
2. for each rho in --rhos runs :func:`mtz_tf.compress.ista.ista_prune` (gamma-W rescaling by
   alpha, ISTA training, physical removal of zero-gamma channels, undoing the rescaling,
   fine-tuning with rho = 0);
3. when ISTA removed channels, prunes the same pre-trained model with l1-norm filter pruning
   to the same parameter count (at most the ISTA model's) and fine-tunes it for as many
   steps as ISTA trained in total (ISTA steps + fine-tuning steps);
4. writes JSON and a Markdown table of parameters, FLOPs (multiply-accumulates) and
   validation/test accuracy to --output_dir.

Example:
    python experiments/ista_prune.py --model=resnet20 --width_multiplier=0.5
        --rhos=0.05,0.1,0.2 --output_dir=artifacts/ista/resnet20
"""

from __future__ import annotations

import quiet_startup  # noqa: F401 (first: quiets TensorFlow's native log)

import json
import os
import sys
import time

import keras
import numpy as np
from absl import flags

from mtz_tf import cli, data, io_utils, models, training
from mtz_tf.compress import flops, ista, l1_filter_pruning

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "vgg16", ["vgg16", "resnet20"], "Network to prune.")
flags.DEFINE_float(
    "width_multiplier", 0.25, "Width multiplier of the network's hidden widths (unitless)."
)
flags.DEFINE_list(
    "rhos",
    ["0.05", "0.1", "0.2"],
    "Global sparsity strengths rho (unitless, comma-separated). Rows of rhos already in "
    "--output_dir/results.json for the same configuration are reused.",
)
flags.DEFINE_float("alpha", 1.0, "gamma-W rescaling factor alpha (unitless, > 0).")
flags.DEFINE_float(
    "learning_rate", 0.01, "SGD learning rate mu_t of the ISTA phase (unitless step size)."
)
flags.DEFINE_float(
    "fine_tune_learning_rate",
    0.01,
    "SGD learning rate of fine-tuning, after ISTA and after l1 pruning (unitless step size).",
)
flags.DEFINE_float("momentum", 0.9, "SGD momentum of the non-gamma variables (unitless).")
flags.DEFINE_integer("steps", 600, "ISTA training steps (batches).")
flags.DEFINE_integer("fine_tune_steps", 300, "Fine-tuning steps after channel removal (batches).")
flags.DEFINE_integer(
    "pretrain_epochs",
    6,
    "Epochs (passes over --train_size examples) of from-scratch training, Adam lr 1e-3.",
)
flags.DEFINE_integer("batch_size", 128, "Batch size (examples).")
flags.DEFINE_integer("train_size", 20000, "Training examples used (a seeded subset).")
flags.DEFINE_integer("validation_size", 5000, "Validation examples split off the training set.")
flags.DEFINE_enum(
    "absorption",
    "interior",
    ["interior", "mean"],
    "How a removed channel's constant enters same-padded 3x3 readers: exact away from the "
    "zero-padded border, or zero mean error over positions (see remove_zero_channels).",
)
flags.DEFINE_integer(
    "recalibration_examples",
    2000,
    "Training examples of the BatchNorm-statistics reset done before every evaluation.",
)
flags.DEFINE_integer("seed", 0, "Seed of the data subset, initialisation and shuffling.")
flags.DEFINE_string(
    "output_dir",
    None,
    "Directory for results.json/results.md, the pre-trained and pruned .keras models (required).",
)
flags.DEFINE_string(
    "data_dir",
    None,
    "Directory of Fashion-MNIST IDX files (default: /usr/share/datasets/fashion-mnist).",
)
flags.mark_flag_as_required("output_dir")


def _build(input_shape):
    builder = {"vgg16": models.vgg16, "resnet20": models.resnet20}[FLAGS.model]
    return builder(input_shape, 10, width_multiplier=FLAGS.width_multiplier, seed=FLAGS.seed)


def _row(method, rho, model, val, test, seconds, extra=None):
    row = {
        "method": method,
        "rho": rho,
        "params": int(model.count_params()),
        "flops": flops.count_flops(model),
        "val_accuracy": training.accuracy(model, *val),
        "test_accuracy": training.accuracy(model, *test),
        "seconds": round(seconds, 1),
    }
    row.update(extra or {})
    cli.logger.info("%s", row)
    return row


def _previous_rows(config):
    """{rho: [ISTA row, l1 row if any]} from an earlier results.json of this configuration."""
    path = os.path.join(FLAGS.output_dir, "results.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        previous = json.load(f)
    ignored = ("rhos", "command")
    # A flag added after that run counts as having had its default value.
    same = all(
        previous["config"].get(k, FLAGS[k].default) == v
        for k, v in config.items()
        if k not in ignored
    )
    if not same:
        cli.logger.warning("%s holds another configuration; it will be overwritten", path)
        return {}
    done = {}
    for row in previous["rows"]:
        if row["rho"] is not None:
            done.setdefault(float(row["rho"]), []).append(row)
    return {rho: rows for rho, rows in done.items() if rows[0]["method"] == "ISTA"}


def _write_results(config, lambdas, rows):
    results = {"config": config, "lambdas": lambdas, "rows": rows}
    io_utils.write_json(os.path.join(FLAGS.output_dir, "results.json"), results)
    io_utils.write_text(os.path.join(FLAGS.output_dir, "results.md"), _markdown(config, rows))


def _markdown(config, rows):
    base = rows[0]
    lines = [
        f"Model: {config['model']} (width x{config['width_multiplier']}), Fashion-MNIST, "
        f"{config['train_size']} training / {config['validation_size']} validation examples, "
        f"full 10k test set. ISTA: alpha={config['alpha']}, lr={config['learning_rate']}, "
        f"{config['steps']} ISTA + {config['fine_tune_steps']} fine-tuning steps; l1: "
        f"{config['steps'] + config['fine_tune_steps']} fine-tuning steps.",
        "",
        "| method | rho | params | params % | MFLOPs | FLOPs % | val acc | test acc |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {'' if r['rho'] is None else r['rho']} | {r['params']:,} | "
            f"{100 * r['params'] / base['params']:.1f} | {r['flops'] / 1e6:.2f} | "
            f"{100 * r['flops'] / base['flops']:.1f} | {100 * r['val_accuracy']:.2f} | "
            f"{100 * r['test_accuracy']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    config = {name: FLAGS[name].value for name in FLAGS if name in _OWN_FLAGS}
    config["rhos"] = [float(r) for r in FLAGS.rhos]
    config["command"] = " ".join(["python"] + sys.argv)
    # Rows of rhos already in --output_dir/results.json with this configuration are reused,
    # so a run can be extended with more rhos without recomputing the others.
    cli.logger.info("Configuration: %s", config)

    images, labels = data.load("fashion_mnist", "train", data_dir=FLAGS.data_dir)
    x_all, y_all = data.normalize(images), labels
    (x_train, y_train), val = data.train_validation_split(
        x_all, y_all, FLAGS.validation_size, seed=FLAGS.seed
    )
    subset = np.random.default_rng(FLAGS.seed).permutation(len(x_train))[: FLAGS.train_size]
    x_train, y_train = x_train[subset], y_train[subset]
    test_images, test_labels = data.load("fashion_mnist", "test", data_dir=FLAGS.data_dir)
    test = (data.normalize(test_images), test_labels)

    # One shuffled training stream for ISTA, fine-tuning and BatchNorm recalibration; the
    # l1-norm baseline fine-tunes on an identically built one.
    def training_batches():
        return data.to_dataset(
            x_train, y_train, batch_size=FLAGS.batch_size, shuffle=True, seed=FLAGS.seed
        )

    validation = data.to_dataset(*val, batch_size=1000)

    pretrained_path = os.path.join(
        FLAGS.output_dir, f"pretrained_{FLAGS.model}_w{FLAGS.width_multiplier}.keras"
    )
    start = time.time()
    if os.path.exists(pretrained_path):
        cli.logger.info("Reloading the pre-trained model from %s", pretrained_path)
        pretrained = keras.models.load_model(pretrained_path, compile=False)
    else:
        pretrained = _build(x_train.shape[1:])
        training.train_classifier(
            pretrained,
            x_train,
            y_train,
            epochs=FLAGS.pretrain_epochs,
            batch_size=FLAGS.batch_size,
            seed=FLAGS.seed,
            verbose=2,
        )
        io_utils.save_model(pretrained, pretrained_path)
    # Every model is evaluated with BatchNorm statistics recomputed on training examples.
    ista.recalibrate_batchnorm(pretrained, training_batches(), FLAGS.recalibration_examples)
    rows = [_row("unpruned", None, pretrained, val, test, time.time() - start)]
    lambdas = ista.memory_lambdas(pretrained)
    penalised = {name for name, lam in lambdas.items() if lam > 0}
    done = _previous_rows(config)
    config["rhos"] = sorted(set(config["rhos"]) | set(done))

    for rho in config["rhos"]:
        if rho in done:
            cli.logger.info(
                "Reusing the rows of rho=%g from an earlier run with this configuration", rho
            )
            rows.extend(done[rho])
            continue
        start = time.time()
        pruned, report = ista.ista_prune(
            pretrained,
            training_batches(),
            rho=rho,
            steps=FLAGS.steps,
            fine_tune_steps=FLAGS.fine_tune_steps,
            alpha=FLAGS.alpha,
            learning_rate=FLAGS.learning_rate,
            fine_tune_learning_rate=FLAGS.fine_tune_learning_rate,
            momentum=FLAGS.momentum,
            seed=FLAGS.seed,
            absorption=FLAGS.absorption,
            recalibration_examples=FLAGS.recalibration_examples,
            validation=validation,
            verbose=2,
        )
        rows.append(_row("ISTA", rho, pruned, val, test, time.time() - start, report.to_dict()))
        io_utils.save_model(pruned, os.path.join(FLAGS.output_dir, f"ista_rho{rho}.keras"))

        if report.params_after == report.params_before:
            cli.logger.info("rho=%g removed no channel; no l1-norm baseline to match", rho)
            _write_results(config, lambdas, rows)
            continue
        start = time.time()
        baseline, fraction = l1_filter_pruning.l1_filter_prune_to_params(
            pretrained, report.params_after, bn_names=penalised
        )
        ista.fine_tune(
            baseline,
            training_batches(),
            steps=FLAGS.steps + FLAGS.fine_tune_steps,
            learning_rate=FLAGS.fine_tune_learning_rate,
            momentum=FLAGS.momentum,
            seed=FLAGS.seed + 1,
            verbose=2,
        )
        ista.recalibrate_batchnorm(baseline, training_batches(), FLAGS.recalibration_examples)
        rows.append(
            _row(
                "l1-norm",
                rho,
                baseline,
                val,
                test,
                time.time() - start,
                {"keep_fraction": fraction},
            )
        )
        _write_results(config, lambdas, rows)
    _write_results(config, lambdas, rows)  # also when the last rhos were reused
    cli.logger.info("Results in %s", FLAGS.output_dir)


_OWN_FLAGS = (
    "model",
    "width_multiplier",
    "alpha",
    "learning_rate",
    "fine_tune_learning_rate",
    "momentum",
    "steps",
    "fine_tune_steps",
    "pretrain_epochs",
    "batch_size",
    "train_size",
    "validation_size",
    "absorption",
    "recalibration_examples",
    "seed",
    "output_dir",
    "data_dir",
)

if __name__ == "__main__":
    cli.run(main)

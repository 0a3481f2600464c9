"""Measures which matching should be the default: greedy against optimal over seed pairs.

    python experiments/matching_default.py --pairs=3

For each of ``--pairs`` pairs of LeNet-300-100 trained on Fashion-MNIST to convergence with
seeds (2p+1, 2p+2) (selected on the validation split; cached in --model_dir under the
names ``experiments/reproduce.py --experiment=lenet300`` uses, so pair 0 is that table's),
the hidden units of each model are permuted and both hidden layers are fully zipped with
MTZ (Hessian pairing and tie) by greedy and by optimal matching, with no retraining. The
drop of a pair is the mean over its two tasks of (original accuracy − zipped accuracy),
in points; the table gives mean ± std over the pairs on the validation split (on which the
default is chosen) and on the test split (reported, never used to choose), and the zip's
seconds. Writes results/matching_default_lenet300.{json,md}.
"""

import quiet_startup  # noqa: F401 (first: quiets TensorFlow's native log)

import os
import time

import numpy as np
import residual_experiments as rx
from absl import flags

import mtz_tf
from mtz_tf import cli, data, io_utils, models, retrain, training

FLAGS = flags.FLAGS
flags.DEFINE_integer("pairs", 3, "Seed pairs of input models.")
flags.DEFINE_string("results_dir", "results", "Where the JSON and Markdown tables go.")
flags.DEFINE_string("data_dir", None, "Directory of Fashion-MNIST IDX files.")
flags.DEFINE_string("model_dir", "artifacts/reproduce", "Cache of the trained input models.")
flags.DEFINE_integer("max_epochs", 40, "Epoch limit when training the input models.")
flags.DEFINE_integer("patience", 3, "Early-stopping patience (epochs) on validation accuracy.")
flags.DEFINE_integer("calibration_size", 5000, "Calibration samples per task.")

METHODS = ("greedy", "optimal")
SPLITS = ("validation", "test")


def _pair_record(pair: int, splits: dict) -> dict:
    """Original and zipped accuracies and zip seconds of one seed pair."""
    tasks = ("model_a", "model_b")
    originals = {}
    for offset, task in enumerate(tasks, start=1):
        seed = 2 * pair + offset
        model, _ = rx.cached_classifier(
            os.path.join(FLAGS.model_dir, f"lenet300_seed{seed}.keras"),
            lambda seed: models.lenet_300_100(seed=seed),
            splits,
            FLAGS.max_epochs,
            FLAGS.patience,
            seed,
            batch_size=128,
        )
        originals[task] = models.permute_hidden(model, seed=100 + seed)
    x = splits["train"][0]
    calibration = {
        t: data.to_dataset(
            data.calibration_subset(x, FLAGS.calibration_size, seed=i), batch_size=500
        )
        for i, t in enumerate(tasks)
    }
    sets = {s: {t: data.to_dataset(*splits[s], batch_size=1000) for t in tasks} for s in SPLITS}
    record = {
        "original": {
            s: {t: training.dataset_accuracy(originals[t], sets[s][t]) for t in tasks}
            for s in SPLITS
        }
    }
    for method in METHODS:
        start = time.perf_counter()
        zipped, _ = mtz_tf.zip_models(originals, calibration, share=1.0, matching=method)
        seconds = time.perf_counter() - start
        record[method] = {s: retrain.task_accuracies(zipped, sets[s]) for s in SPLITS}
        record[method]["seconds"] = seconds
        drops = {s: _drop(record, method, s) for s in SPLITS}
        cli.logger.info("pair %d %s: drop %s, %.1f s", pair, method, drops, seconds)
    return record


def _drop(record: dict, method: str, split: str) -> float:
    """Mean over the tasks of (original − zipped) accuracy, in points."""
    original = record["original"][split]
    return float(np.mean([100 * (original[t] - record[method][split][t]) for t in original]))


def _table(records: list) -> str:
    command = f"python experiments/matching_default.py --pairs={FLAGS.pairs}"
    lines = [
        "# Default matching: greedy against optimal, LeNet-300-100 same-task pairs",
        "",
        "Regenerate with:",
        "",
        f"```\n{command}\n```",
        "",
        f"{len(records)} pairs of LeNet-300-100 trained on Fashion-MNIST (seeds 2p+1, 2p+2, "
        "selected on validation), hidden units permuted, both hidden layers fully zipped by "
        "MTZ, no retraining. Drop: mean over the pair's two tasks of original − zipped "
        "accuracy (points); mean ± std over pairs. The default is chosen on validation.",
        "",
        "| matching | validation drop (pp) | test drop (pp) | zip seconds |",
        "|---|---|---|---|",
    ]
    for method in METHODS:
        cells = []
        for split in SPLITS:
            drops = [_drop(r, method, split) for r in records]
            cells.append(f"{np.mean(drops):.2f} ± {np.std(drops, ddof=1):.2f}")
        seconds = [r[method]["seconds"] for r in records]
        cells.append(f"{np.mean(seconds):.2f} ± {np.std(seconds, ddof=1):.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    per_pair = [
        _drop(r, "greedy", "validation") - _drop(r, "optimal", "validation") for r in records
    ]
    lines += [
        "",
        "Validation drop of greedy minus optimal, per pair: "
        + ", ".join(f"{d:+.2f}" for d in per_pair)
        + " pp.",
    ]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if FLAGS.pairs < 2:
        raise ValueError("--pairs must be at least 2 for a standard deviation.")
    splits = data.load_task("fashion_mnist", data_dir=FLAGS.data_dir)
    records = [_pair_record(pair, splits) for pair in range(FLAGS.pairs)]
    stem = os.path.join(FLAGS.results_dir, "matching_default_lenet300")
    io_utils.write_json(stem + ".json", {"pairs": records})
    io_utils.write_text(stem + ".md", _table(records))
    print(_table(records))


if __name__ == "__main__":
    cli.run(main)

"""Same-task merging of LeNet-300-100 pairs: MTZ's options against permutation baselines.

    python experiments/same_task_merge.py --pairs=3

For each of ``--pairs`` pairs of LeNet-300-100 trained on Fashion-MNIST to convergence with
seeds (2p+1, 2p+2) (``experiments/train_inputs.py``, read from --model_dir), the hidden
units of each model are permuted, and the pair is merged at full share with no retraining:

* MTZ (Hessian pairing and tie, both hidden layers zipped) with each matching and repair;
* weight distance + plain average (MTZ's ``pairing="euclidean", tie="average"``);
* activation matching and Git Re-Basin weight matching (``merge_baselines``), averaging
  the hidden layers with each task keeping its own head, and fully averaged (one model,
  head included).

The drop of a pair is the mean over its two tasks of (original − merged accuracy), in
points; the table gives mean ± std over the pairs on the validation split (on which
defaults are chosen) and on the test split (reported, never used to choose), and the
merge's seconds. Writes results/same_task_merge_lenet300.{json,md}.
"""

import quiet_startup  # noqa: F401 (first: quiets TensorFlow's native log)

import os
import time

import merge_baselines
import numpy as np
import seed_pairs
from absl import flags

import mtz_tf
from mtz_tf import cli, data, retrain, training

FLAGS = flags.FLAGS
seed_pairs.define_flags()

TASKS = seed_pairs.TASKS
SPLITS = ("validation", "test")
MTZ_ROWS = (
    ("MTZ optimal + refit (defaults)", dict()),
    ("MTZ greedy + refit", dict(matching="greedy")),
    ("MTZ optimal + statistics (REPAIR)", dict(repair="statistics")),
    ("MTZ optimal, no repair", dict(repair="none")),
    ("MTZ greedy, no repair (the paper)", dict(matching="greedy", repair="none")),
    (
        "weight distance + average (reference code's fc shortcut)",
        dict(pairing="euclidean", tie="average", repair="none"),
    ),
)
BASELINE_ROWS = (
    ("activation matching + average, own heads", "activation", True),
    ("activation matching + average, all layers", "activation", False),
    ("Re-Basin weight matching + average, own heads", "weight", True),
    ("Re-Basin weight matching + average, all layers", "weight", False),
)


def _baseline(originals: dict, method: str, own_heads: bool, x: np.ndarray) -> dict:
    """{task: merged Keras model} of a permutation baseline."""
    a, b = (originals[t] for t in TASKS)
    if method == "activation":
        perms = merge_baselines.activation_matching(a, b, x)
    else:
        weights = [merge_baselines.dense_weights(m) for m in (a, b)]
        perms = merge_baselines.weight_matching(*weights)
    merged = merge_baselines.merged_models(a, b, perms, own_heads)
    return dict(zip(TASKS, merged if own_heads else merged * 2))


def _pair_record(pair: int, splits: dict) -> dict:
    """Original and merged accuracies and seconds of one seed pair, per row label."""
    originals, _ = seed_pairs.load_pair(FLAGS.model_dir, "lenet300", pair)
    x = splits["train"][0]
    subsets = [data.calibration_subset(x, FLAGS.calibration_size, seed=i) for i in range(2)]
    calibration = {t: data.to_dataset(s, batch_size=500) for t, s in zip(TASKS, subsets)}
    sets = {s: {t: data.to_dataset(*splits[s], batch_size=1000) for t in TASKS} for s in SPLITS}

    def accuracies(by_task: dict) -> dict:
        return {
            s: {t: training.dataset_accuracy(by_task[t], sets[s][t]) for t in TASKS} for s in SPLITS
        }

    record = {"original": accuracies(originals)}
    for label, options in MTZ_ROWS:
        start = time.perf_counter()
        zipped, _ = mtz_tf.zip_models(originals, calibration, share=1.0, verbose=0, **options)
        seconds = time.perf_counter() - start
        record[label] = {s: retrain.task_accuracies(zipped, sets[s]) for s in SPLITS}
        record[label]["seconds"] = seconds
    for label, method, own_heads in BASELINE_ROWS:
        start = time.perf_counter()
        merged = _baseline(originals, method, own_heads, subsets[0])
        record[label] = {**accuracies(merged), "seconds": time.perf_counter() - start}
    for label in record:
        if label != "original":
            cli.logger.info(
                "pair %d %s: validation drop %.2f", pair, label, _drop(record, label, "validation")
            )
    return record


def _drop(record: dict, label: str, split: str) -> float:
    """Mean over the tasks of (original − merged) accuracy, in points."""
    original = record["original"][split]
    return float(np.mean([100 * (original[t] - record[label][split][t]) for t in original]))


def _table(records: list) -> str:
    command = f"python experiments/same_task_merge.py --pairs={FLAGS.pairs}"
    originals = [100 * np.mean(list(r["original"]["test"].values())) for r in records]
    lines = [
        "# Same-task merging: MTZ's options against permutation baselines, LeNet-300-100",
        "",
        "Regenerate with:",
        "",
        f"```\n{command}\n```",
        "",
        f"{len(records)} pairs of LeNet-300-100 trained on Fashion-MNIST to convergence "
        "(`pretrained/`, seeds 2p+1, 2p+2, selected on validation; mean test accuracy "
        f"{np.mean(originals):.2f} %), hidden units permuted, merged at full share with no "
        "retraining. Drop: mean over the pair's two tasks of original − merged accuracy "
        "(points); mean ± std over the pairs. Defaults are chosen on validation.",
        "",
        "| method | validation drop (pp) | test drop (pp) | seconds |",
        "|---|---|---|---|",
    ]
    labels = [label for label, _ in MTZ_ROWS] + [label for label, _, _ in BASELINE_ROWS]
    for label in labels:
        cells = []
        for split in SPLITS:
            drops = [_drop(r, label, split) for r in records]
            cells.append(f"{np.mean(drops):.2f} ± {np.std(drops, ddof=1):.2f}")
        seconds = [r[label]["seconds"] for r in records]
        cells.append(f"{np.mean(seconds):.2f} ± {np.std(seconds, ddof=1):.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Validation drop per pair:", ""]
    for label in labels:
        per_pair = ", ".join(f"{_drop(r, label, 'validation'):.2f}" for r in records)
        lines.append(f"- {label}: {per_pair}")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    stem = os.path.join(FLAGS.results_dir, "same_task_merge_lenet300")
    seed_pairs.run(FLAGS.pairs, FLAGS.data_dir, _pair_record, stem, _table)


if __name__ == "__main__":
    cli.run(main)

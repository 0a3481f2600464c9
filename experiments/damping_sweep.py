"""How the merge's Hessian damping and the calibration size change a full same-task zip.

    python experiments/damping_sweep.py --set=lenet300 --pairs=3

For each of ``--pairs`` pairs of converged same-task models from ``--model_dir`` (seeds
2p+1, 2p+2, hidden units of each permuted, as ``same_task_merge.py``), each calibration
size of ``--calibration_sizes`` and each relative damping δ of ``--dampings``
(:func:`mtz_tf.cost.damp_hessians`: H + δ·mean(diag H)·I), the pair is zipped at full share
with the other defaults and no retraining. The drop of a pair is the mean over its two tasks
of (original − zipped validation accuracy), in points; the table gives mean ± std over the
pairs. Validation only: this chooses a default. Writes results/damping_<set>.{json,md}.
"""

import quiet_startup  # noqa: F401 (first: quiets TensorFlow's native log)

import numpy as np
import seed_pairs
from absl import flags

import mtz_tf
from mtz_tf import cli, data, retrain, training

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "set",
    "lenet300",
    ["lenet300", "lenet5", "lenet300_split", "resnet20_split"],
    "The converged input models (*_split: one per half of the labels, different tasks).",
)
flags.DEFINE_float("share", 1.0, "Fraction of every hidden layer's neurons shared.")
flags.DEFINE_list("calibration_sizes", ["500", "5000"], "Calibration samples per task.")
flags.DEFINE_list("dampings", ["1e-6", "1e-4", "1e-3", "1e-2", "1e-1", "1"], "Relative δ.")
seed_pairs.define_flags(calibration_size=False)

TASKS = seed_pairs.TASKS


def _pair_drops(pair: int, splits: dict) -> dict:
    """{calibration size: {damping: validation drop (points)}} of one seed pair."""
    originals, _ = seed_pairs.load_pair(FLAGS.model_dir, FLAGS.set, pair)
    own = seed_pairs.task_splits(FLAGS.set, splits, FLAGS.data_dir)
    validation = {t: data.to_dataset(*own[t]["validation"], batch_size=1000) for t in TASKS}
    original = {t: training.dataset_accuracy(originals[t], validation[t]) for t in TASKS}
    drops = {}
    for size in FLAGS.calibration_sizes:
        calibration = seed_pairs.calibration_sets(own, int(size))
        drops[size] = {}
        for damping in FLAGS.dampings:
            zipped, _ = mtz_tf.zip_models(
                originals, calibration, share=FLAGS.share, damping=float(damping), verbose=0
            )
            accuracy = retrain.task_accuracies(zipped, validation)
            drops[size][damping] = float(
                np.mean([100 * (original[t] - accuracy[t]) for t in TASKS])
            )
            cli.logger.info(
                "pair %d, %s calibration samples, damping %s: drop %.2f",
                pair,
                size,
                damping,
                drops[size][damping],
            )
    return drops


def _table(records: list) -> str:
    command = (
        f"python experiments/damping_sweep.py --set={FLAGS.set} --pairs={FLAGS.pairs} "
        f"--calibration_sizes={','.join(FLAGS.calibration_sizes)} "
        f"--dampings={','.join(FLAGS.dampings)}"
        + (f" --share={FLAGS.share}" if FLAGS.share != 1.0 else "")
    )
    kind = "different-task" if FLAGS.set in seed_pairs.SPLIT_SETS else "same-task"
    lines = [
        f"# Hessian damping and calibration size: {FLAGS.set} {kind} pairs, "
        f"{FLAGS.share:.0%} shared",
        "",
        "Regenerate with:",
        "",
        f"```\n{command}\n```",
        "",
        f"{len(records)} seed pairs of converged models (`pretrained/`), hidden units permuted, "
        f"every hidden layer sharing {FLAGS.share:.0%} of its neurons, zipped with the "
        "defaults but the damping, no retraining. Validation "
        "drop in points (mean over the two tasks of original − zipped accuracy), mean ± std "
        "over the pairs.",
        "",
        "| calibration samples | " + " | ".join(f"δ = {d}" for d in FLAGS.dampings) + " |",
        "|---|" + "---|" * len(FLAGS.dampings),
    ]
    for size in FLAGS.calibration_sizes:
        cells = [seed_pairs.mean_std([r[size][d] for r in records]) for d in FLAGS.dampings]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    seed_pairs.run_set("damping", _pair_drops, _table)


if __name__ == "__main__":
    cli.run(main)

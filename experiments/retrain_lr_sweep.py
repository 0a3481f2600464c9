"""Which learning rate light retraining should use, measured on validation.

    python experiments/retrain_lr_sweep.py --set=lenet300 --pairs=3

For each of ``--pairs`` pairs of converged same-task models from ``--model_dir`` (seeds
2p+1, 2p+2, hidden units of each permuted; trained with Adam at 1e-3) and each learning rate
of ``--learning_rates``, with a fresh Adam at that rate and ``--retrain_fraction`` of the
pair's fewest from-scratch iterations as the step budget:

* the control: each input model fine-tuned alone for the budget;
* the zip: every hidden layer sharing ``--share`` of its neurons with the other defaults,
  then the budget of joint steps after the whole zip.

A drop is the mean over the two tasks of (original − accuracy), in points, on the validation
split (this chooses a default: the test split is not read); the table gives mean ± std over
the pairs and the zip before retraining. Writes results/retrain_lr_<set>.{json,md}.
"""

import quiet_startup  # noqa: F401 (first: quiets TensorFlow's native log)

import keras
import numpy as np
import seed_pairs
from absl import flags

import mtz_tf
from mtz_tf import cli, data, retrain, training

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "set",
    "lenet300",
    ["lenet300", "lenet5", "lenet300_split"],
    "The converged input models (lenet300_split: one per half of the labels, different tasks).",
)
flags.DEFINE_list("learning_rates", ["1e-3", "3e-4", "1e-4", "3e-5"], "Adam learning rates.")
flags.DEFINE_float("share", 1.0, "Fraction of every hidden layer's neurons shared.")
flags.DEFINE_integer("steps", None, "Retraining steps (instead of --retrain_fraction).")
seed_pairs.define_flags(retraining=True)

TASKS = seed_pairs.TASKS


def _drop(original: dict, accuracy: dict) -> float:
    return float(np.mean([100 * (original[t] - accuracy[t]) for t in TASKS]))


def _pair_drops(pair: int, splits: dict) -> dict:
    """{"steps", "zip before", "control": {lr: drop}, "zip after": {lr: drop}, "zip after per
    task": {lr: {task: drop}}} of a pair."""
    originals, trained = seed_pairs.load_pair(FLAGS.model_dir, FLAGS.set, pair)
    steps = FLAGS.steps or max(
        1, int(FLAGS.retrain_fraction * min(r["iterations"] for r in trained))
    )
    own = seed_pairs.task_splits(FLAGS.set, splits, FLAGS.data_dir)
    calibration = seed_pairs.calibration_sets(own, FLAGS.calibration_size)
    validation = {t: data.to_dataset(*own[t]["validation"], batch_size=1000) for t in TASKS}
    train = seed_pairs.training_sets(own, FLAGS.batch_size)
    original = {t: training.dataset_accuracy(originals[t], validation[t]) for t in TASKS}
    zipped, _ = mtz_tf.zip_models(originals, calibration, share=FLAGS.share, verbose=0)
    record = {
        "steps": steps,
        "zip before": _drop(original, retrain.task_accuracies(zipped, validation)),
        "control": {},
        "zip after": {},
        "zip after per task": {},
    }
    hidden = len(mtz_tf.graph.read_plan(originals[TASKS[0]]).hidden_units)
    for rate in FLAGS.learning_rates:
        alone = {
            t: seed_pairs.fine_tuned_alone(
                originals[t], train[t], steps, keras.optimizers.Adam(float(rate))
            )
            for t in TASKS
        }
        accuracy = {t: training.dataset_accuracy(alone[t], validation[t]) for t in TASKS}
        record["control"][rate] = _drop(original, accuracy)
        light = mtz_tf.Retrain(
            train,
            steps_per_layer=[0] * (hidden - 1) + [steps],
            optimizer=keras.optimizers.Adam(float(rate)),
            verbose=0,
        )
        zipped, _ = mtz_tf.zip_models(
            originals, calibration, share=FLAGS.share, retrain=light, verbose=0
        )
        accuracy = retrain.task_accuracies(zipped, validation)
        record["zip after"][rate] = _drop(original, accuracy)
        record["zip after per task"][rate] = {t: 100 * (original[t] - accuracy[t]) for t in TASKS}
        cli.logger.info(
            "pair %d, learning rate %s: control drop %.2f, zip drop %.2f after %d steps",
            pair,
            rate,
            record["control"][rate],
            record["zip after"][rate],
            steps,
        )
    return record


def _steps(records: list) -> str:
    if FLAGS.steps:
        return f"{FLAGS.steps:,}"
    counts = "/".join(str(r["steps"]) for r in records)
    return f"{counts} (the pair's from-scratch iterations × {FLAGS.retrain_fraction})"


def _table(records: list) -> str:
    name = {
        "lenet300": "LeNet-300-100 same-task pairs",
        "lenet5": "LeNet-5 same-task pairs",
        "lenet300_split": "LeNet-300-100 different-task pairs (labels 0-4 and 5-9)",
    }[FLAGS.set]
    command = (
        f"python experiments/retrain_lr_sweep.py --set={FLAGS.set} --pairs={FLAGS.pairs} "
        f"--learning_rates={','.join(FLAGS.learning_rates)} --share={FLAGS.share} "
        f"--retrain_fraction={FLAGS.retrain_fraction}"
        + (f" --steps={FLAGS.steps}" if FLAGS.steps else "")
    )
    lines = [
        f"# Light retraining learning rate: {name}, Fashion-MNIST",
        "",
        "Regenerate with:",
        "",
        f"```\n{command}\n```",
        "",
        f"{len(records)} seed pairs of converged models (`pretrained/`, trained with Adam at "
        f"1e-3), hidden units permuted. Every hidden layer shares {FLAGS.share:.0%} of its "
        f"neurons (other options default); {_steps(records)} steps of a fresh Adam "
        "after the whole zip, and for the control on each model "
        "alone. Validation drop against the originals (points), mean ± std over the pairs. "
        "Before retraining the zip drops "
        f"{seed_pairs.mean_std([r['zip before'] for r in records])}.",
        "",
        "| Adam learning rate | control (fine-tuned alone) | zip after retraining | "
        "zip after, worst task of any pair |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {rate} | {seed_pairs.mean_std([r['control'][rate] for r in records])} | "
        f"{seed_pairs.mean_std([r['zip after'][rate] for r in records])} | "
        f"{max(max(r['zip after per task'][rate].values()) for r in records):.2f} |"
        for rate in FLAGS.learning_rates
    ]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    seed_pairs.run_set("retrain_lr", _pair_drops, _table)


if __name__ == "__main__":
    cli.run(main)

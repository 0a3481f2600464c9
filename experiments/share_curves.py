"""Accuracy against shared parameters, over seed pairs, with and without repair and light
retraining.

    python experiments/share_curves.py --set=lenet300 --pairs=3
    python experiments/share_curves.py --set=lenet5 --pairs=3

For each of ``--pairs`` pairs of converged models from ``--model_dir`` (same-task, or with
``--set=resnet20_split`` one ResNet-20 per half of the labels, each task on its own data)
(``experiments/train_inputs.py``; seeds 2p+1, 2p+2, hidden units of each permuted), every
hidden layer shares the fraction s of its neurons, for each s of ``--shares``, zipped with the
defaults and with ``repair="none"``:

* before retraining;
* after light joint retraining: ``--retrain_fraction`` of the fewest iterations an input model
  of the pair took from scratch (the default optimizer: the models' own at a tenth of its
  learning rate; run once after the whole zip).

The control is each input model fine-tuned alone for the same number of steps. A point's
drop is the mean over its two tasks of (original − zipped accuracy), in points, against the
original for "before retraining" and against the fine-tuned control for "after"; mean ± std
over the pairs. The headline is the largest fraction of shared parameters
(:func:`mtz_tf.shared_parameter_fraction`) whose mean validation drop after retraining, with
the defaults, is at most 0.5 points. Writes results/share_curves_<set>.{json,md,png}.
"""

import quiet_startup  # noqa: F401 (first: quiets TensorFlow's native log)

import os

import keras
import numpy as np
import seed_pairs
from absl import flags

import mtz_tf
from mtz_tf import cli, data, io_utils, retrain, training

FLAGS = flags.FLAGS
NAMES = {
    "lenet300": "LeNet-300-100 same-task pairs",
    "lenet5": "LeNet-5 same-task pairs",
    "resnet20_split": "ResNet-20 different-task pairs (labels 0-4 and 5-9)",
}
flags.DEFINE_enum("set", "lenet300", list(NAMES), "The converged input models.")
flags.DEFINE_list("shares", ["0", "0.25", "0.5", "0.75", "1"], "Fractions of every hidden layer.")
seed_pairs.define_flags(retraining=True)

TASKS = seed_pairs.TASKS
SPLITS = ("validation", "test")
REPAIRS = ("refit", "none")
STAGES = ("before", "after")
LOSS_LIMIT = 0.5


def _fine_tuned_alone(model: keras.Model, train, steps: int) -> keras.Model:
    """A copy of ``model`` trained alone for ``steps`` steps with the default retraining
    optimizer (:func:`mtz_tf.retrain.resolve_optimizer`), fresh."""
    optimizer = retrain.resolve_optimizer(mtz_tf.Retrain({}), {"the input model": model})[0]
    return seed_pairs.fine_tuned_alone(model, train, steps, optimizer.new_optimizer())


def _pair_record(pair: int, splits: dict) -> dict:
    originals, trained = seed_pairs.load_pair(FLAGS.model_dir, FLAGS.set, pair)
    steps = max(1, int(FLAGS.retrain_fraction * min(r["iterations"] for r in trained)))
    own = seed_pairs.task_splits(FLAGS.set, splits, FLAGS.data_dir)
    calibration = seed_pairs.calibration_sets(own, FLAGS.calibration_size)
    sets = {s: {t: data.to_dataset(*own[t][s], batch_size=1000) for t in TASKS} for s in SPLITS}
    train = seed_pairs.training_sets(own, FLAGS.batch_size)
    record = {
        "steps": steps,
        "original": {
            s: {t: training.dataset_accuracy(originals[t], sets[s][t]) for t in TASKS}
            for s in SPLITS
        },
    }
    alone = {t: _fine_tuned_alone(originals[t], train[t], steps) for t in TASKS}
    record["fine-tuned alone"] = {
        s: {t: training.dataset_accuracy(alone[t], sets[s][t]) for t in TASKS} for s in SPLITS
    }
    hidden = len(mtz_tf.graph.read_plan(originals[TASKS[0]]).hidden_units)
    light = mtz_tf.Retrain(train, steps_per_layer=[0] * (hidden - 1) + [steps], verbose=0)
    for share in FLAGS.shares:
        for repair in REPAIRS:
            for stage in STAGES:
                zipped, _ = mtz_tf.zip_models(
                    originals,
                    calibration,
                    share=float(share),
                    repair=repair,
                    retrain=light if stage == "after" else None,
                    verbose=0,
                )
                key = f"{share}/{repair}/{stage}"
                record[key] = {s: retrain.task_accuracies(zipped, sets[s]) for s in SPLITS}
                record[key]["shared_fraction"] = mtz_tf.shared_parameter_fraction(zipped)
                cli.logger.info(
                    "pair %d share %s repair %s %s retraining: validation drop %.2f",
                    pair,
                    share,
                    repair,
                    stage,
                    _drop(record, key, "validation"),
                )
    return record


def _drop(record: dict, key: str, split: str, against: str | None = None) -> float:
    """Mean over the tasks of (reference − zipped accuracy), in points: ``against`` (a
    record key), by default the original before retraining and the fine-tuned control
    after."""
    if against is None:
        against = "fine-tuned alone" if key.endswith("/after") else "original"
    reference = record[against][split]
    return float(np.mean([100 * (reference[t] - record[key][split][t]) for t in TASKS]))


def _points(records: list, repair: str, stage: str, split: str, against=None) -> list:
    """(mean shared fraction %, mean drop, std drop) per share."""
    rows = []
    for share in FLAGS.shares:
        key = f"{share}/{repair}/{stage}"
        drops = [_drop(r, key, split, against) for r in records]
        fraction = 100 * np.mean([r[key]["shared_fraction"] for r in records])
        rows.append((fraction, float(np.mean(drops)), float(np.std(drops, ddof=1))))
    return rows


def _headline(records: list, against=None) -> str:
    """The largest shared fraction whose mean validation drop after light retraining with
    the defaults is within :data:`LOSS_LIMIT` (against the control, or ``against``)."""
    points = _points(records, "refit", "after", "validation", against)
    meeting = [fraction for fraction, mean, _ in points if mean <= LOSS_LIMIT]
    if not meeting:
        return f"no tested share stays within {LOSS_LIMIT} points"
    return f"{max(meeting):.1f} % of the parameters shared"


def _command() -> str:
    return (
        f"python experiments/share_curves.py --set={FLAGS.set} --pairs={FLAGS.pairs} "
        f"--shares={','.join(FLAGS.shares)} --retrain_fraction={FLAGS.retrain_fraction}"
        + f" --calibration_size={FLAGS.calibration_size}"
    )


def _table(records: list) -> str:
    name = NAMES[FLAGS.set]
    alone = [
        float(np.mean([100 * (r["original"][s][t] - r["fine-tuned alone"][s][t]) for t in TASKS]))
        for r in records
        for s in ("validation",)
    ]
    lines = [
        f"# Accuracy against shared parameters: {name}, Fashion-MNIST",
        "",
        "Regenerate with:",
        "",
        f"```\n{_command()}\n```",
        "",
        f"{len(records)} {name} (converged, `pretrained/`), hidden units permuted; "
        "every hidden layer shares the same fraction of its neurons. Drop: mean over the two "
        "tasks of reference − zipped accuracy (points), mean ± std over the pairs; reference: "
        "the originals before retraining, each model fine-tuned alone for the same steps after "
        f"it. Light retraining: {records[0]['steps']} joint steps (of the pair's from-scratch "
        f"iterations × {FLAGS.retrain_fraction}) after the whole zip, the default optimizer "
        "(the models' own Adam at a tenth of its learning rate, 1e-4).",
        "",
        f"**Headline:** the largest share within {LOSS_LIMIT} points (mean validation drop) "
        f"after light retraining with the defaults: {_headline(records)} against the "
        f"fine-tuned-alone control; {_headline(records, 'original')} against the originals.",
        "",
        "Fine-tuned-alone control against the originals (validation, points): "
        f"{np.mean(alone):+.2f} ± {np.std(alone, ddof=1):.2f} drop.",
        "",
    ]
    for split in SPLITS:
        lines += [
            f"{split.capitalize()} drop (pp):",
            "",
            "| share | shared params (%) | defaults, before | none, before | defaults, after "
            "| none, after | defaults, after, against the originals |",
            "|---|---|---|---|---|---|---|",
        ]
        columns = [_points(records, r, s, split) for s in STAGES for r in REPAIRS]
        columns.append(_points(records, "refit", "after", split, "original"))
        for index, share in enumerate(FLAGS.shares):
            cells = [f"{c[index][1]:.2f} ± {c[index][2]:.2f}" for c in columns]
            lines.append(f"| {share} | {columns[0][index][0]:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _figure(records: list):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for stage in STAGES:
        for repair in REPAIRS:
            rows = _points(records, repair, stage, "validation")
            axis.errorbar(
                [r[0] for r in rows],
                [r[1] for r in rows],
                yerr=[r[2] for r in rows],
                marker="o",
                capsize=3,
                label=f"{'defaults' if repair == 'refit' else 'no repair'}, {stage} retraining",
            )
    axis.axhline(LOSS_LIMIT, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("shared parameters (%)")
    axis.set_ylabel("validation drop (points)")
    axis.set_title(f"{FLAGS.set}: {len(records)} seed pairs, mean ± std")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def main(argv):
    del argv
    stem = os.path.join(FLAGS.results_dir, f"share_curves_{FLAGS.set}")
    records = seed_pairs.run(
        FLAGS.pairs, FLAGS.data_dir, _pair_record, stem, _table, {"command": _command()}
    )
    io_utils.save_figure(_figure(records), stem + ".png")


if __name__ == "__main__":
    cli.run(main)

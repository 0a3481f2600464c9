"""What the seed-pair experiments share: their input models and their run.

Pair p of a set of converged same-task models (``experiments/train_inputs.py``, in
``pretrained/``) is the models of seeds 2p+1 and 2p+2, the hidden units of each permuted
(seed 100 + its own), so that no two models start aligned.
"""

import json
import os
import re

import keras
import numpy as np
import residual_experiments as rx
from absl import flags

from mtz_tf import data, fitting, io_utils, models

TASKS = ("model_a", "model_b")


def define_flags(calibration_size: bool = True, retraining: bool = False) -> None:
    """Defines the flags of every seed-pair binary: --pairs, --results_dir, --data_dir,
    --model_dir, with ``calibration_size`` --calibration_size, with ``retraining``
    --retrain_fraction and --batch_size."""
    flags.DEFINE_integer("pairs", 3, "Seed pairs of input models.")
    flags.DEFINE_string("results_dir", "results", "Where the tables (JSON, Markdown, PNG) go.")
    flags.DEFINE_string("data_dir", None, "Directory of Fashion-MNIST IDX files.")
    flags.DEFINE_string("model_dir", "pretrained", "The converged input models.")
    if calibration_size:
        flags.DEFINE_integer("calibration_size", 5000, "Calibration samples per task.")
    if retraining:
        flags.DEFINE_float(
            "retrain_fraction", 0.05, "Light retraining steps / from-scratch iterations."
        )
        flags.DEFINE_integer("batch_size", 128, "Retraining batch size per task.")


SPLIT_SETS = {"lenet300_split": "lenet300", "resnet20_split": "resnet20_w1"}
"""Different-task sets: {set: model stem}; task i of a pair learns label group i of
``residual_experiments.SPLIT_GROUPS`` (``train_inputs.py``)."""


def task_classes(set_name: str) -> dict:
    """{task: its label classes} of a pair of ``set_name`` (None: all ten)."""
    if set_name in SPLIT_SETS:
        return dict(zip(TASKS, rx.SPLIT_GROUPS))
    return dict.fromkeys(TASKS)


def task_splits(set_name: str, splits: dict, data_dir) -> dict:
    """{task: its Fashion-MNIST splits}: ``splits`` (all ten labels) for a same-task set,
    each task's label group (relabelled 0..C-1) for a different-task one."""
    return {
        task: splits if classes is None else data.load_task("fashion_mnist", classes, data_dir)
        for task, classes in task_classes(set_name).items()
    }


def calibration_sets(own: dict, size: int) -> dict:
    """{task: ``size`` calibration images drawn from its training split (seed: the task's
    position), in batches of 500}; ``own`` as :func:`task_splits`."""
    return {
        t: data.to_dataset(
            data.calibration_subset(own[t]["train"][0], size, seed=i), batch_size=500
        )
        for i, t in enumerate(TASKS)
    }


def training_sets(own: dict, batch_size: int) -> dict:
    """{task: its training split, shuffled (seed: the task's position), in batches}."""
    return {
        t: data.to_dataset(*own[t]["train"], batch_size=batch_size, shuffle=True, seed=i)
        for i, t in enumerate(TASKS)
    }


def load_pair(model_dir: str, set_name: str, pair: int) -> tuple[dict, list]:
    """``({task: permuted input model}, [each model's training record])`` of pair ``pair``."""
    originals, records = {}, []
    classes = task_classes(set_name)
    for offset, task in enumerate(TASKS, start=1):
        seed = 2 * pair + offset
        if set_name in SPLIT_SETS:
            name = f"{SPLIT_SETS[set_name]}_{rx.group_name(classes[task])}_seed{seed}"
        else:
            name = f"{set_name}_seed{seed}"
        stem = os.path.join(model_dir, name)
        originals[task] = models.permute_hidden(io_utils.load_model(stem + ".keras"), 100 + seed)
        with open(stem + ".json") as f:
            records.append(json.load(f))
    return originals, records


def _settings(record) -> str | None:
    """A run's ``"command"`` without its ``--pairs``: what makes two runs' pairs alike."""
    command = (record or {}).get("command")
    return None if command is None else re.sub(r" --pairs=\d+", "", command)


def _kept_records(stem: str, extra) -> list:
    """The pair records of an earlier run at ``stem``.json of the same command with other
    ``--pairs`` (pair p is the same computation in both); [] without one."""
    settings = _settings(extra)
    if settings is None or not os.path.exists(stem + ".json"):
        return []
    earlier = io_utils.read_json(stem + ".json")
    return list(earlier.get("pairs", [])) if _settings(earlier) == settings else []


def run(pairs: int, data_dir, pair_record, stem: str, table, extra=None) -> list:
    """Runs ``pair_record(pair, splits)`` for every pair on Fashion-MNIST's splits and writes
    ``stem``.json (the records, with ``extra`` entries) and ``stem``.md (``table(records)``),
    which it also prints; returns the records. With ``extra["command"]``, the pairs an
    earlier run of the same command (other ``--pairs``) wrote at ``stem``.json are reused,
    so adding a pair computes that pair alone.

    Raises:
        ValueError: for fewer than 2 pairs (no standard deviation).
    """
    if pairs < 2:
        raise ValueError("--pairs must be at least 2 for a standard deviation.")
    splits = data.load_task("fashion_mnist", data_dir=data_dir)
    records = _kept_records(stem, extra)[:pairs]
    if records:
        print(f"Reusing pairs 0-{len(records) - 1} of {stem}.json (the same command).")
    records += [pair_record(pair, splits) for pair in range(len(records), pairs)]
    io_utils.write_json(stem + ".json", {**(extra or {}), "pairs": records})
    io_utils.write_text(stem + ".md", table(records))
    print(table(records))
    return records


def run_set(prefix: str, pair_record, table) -> list:
    """:func:`run` for the binary's flags: ``--pairs`` pairs of ``--set``, the tables at
    ``<--results_dir>/<prefix>_<--set>``."""
    options = flags.FLAGS
    stem = os.path.join(options.results_dir, f"{prefix}_{options.set}")
    return run(options.pairs, options.data_dir, pair_record, stem, table)


def fine_tuned_alone(model: keras.Model, train, steps: int, optimizer) -> keras.Model:
    """A copy of ``model`` trained alone on ``train`` for ``steps`` steps with
    ``optimizer`` (the control of light retraining)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    copy.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=model.layers[-1].get_config().get("activation") != "softmax"
        ),
    )
    fitting.fit(copy, train.repeat().take(steps))
    return copy


def mean_std(values) -> str:
    """``values``' mean ± sample standard deviation, two decimals (a table cell)."""
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"

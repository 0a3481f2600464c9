"""What the seed-pair experiments share: their input models and their run.

Pair p of a set of converged same-task models (``experiments/train_inputs.py``, in
``pretrained/``) is the models of seeds 2p+1 and 2p+2, the hidden units of each permuted
(seed 100 + its own), so that no two models start aligned.
"""

import json
import os

import keras
import residual_experiments as rx

from mtz_tf import data, fitting, io_utils, models

TASKS = ("model_a", "model_b")


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


def run(pairs: int, data_dir, pair_record, stem: str, table, extra=None) -> list:
    """Runs ``pair_record(pair, splits)`` for every pair on Fashion-MNIST's splits and writes
    ``stem``.json (the records, with ``extra`` entries) and ``stem``.md (``table(records)``),
    which it also prints; returns the records.

    Raises:
        ValueError: for fewer than 2 pairs (no standard deviation).
    """
    if pairs < 2:
        raise ValueError("--pairs must be at least 2 for a standard deviation.")
    splits = data.load_task("fashion_mnist", data_dir=data_dir)
    records = [pair_record(pair, splits) for pair in range(pairs)]
    io_utils.write_json(stem + ".json", {**(extra or {}), "pairs": records})
    io_utils.write_text(stem + ".md", table(records))
    print(table(records))
    return records


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

"""Different-task zipping of residual networks: the ``resnet20_split`` and ``resnet20_three``
experiments of ``experiments/reproduce.py``.

Fashion-MNIST is split into disjoint label groups (labels remapped), one ResNet-20 is
trained per group (different seeds), and the models are zipped into one multi-task model
at several shared fractions, without and with light joint retraining.
"""

from __future__ import annotations

import os

import numpy as np
from absl import logging

from mtz_tf import data, io_utils, training


def cached_classifier(
    path: str,
    build,
    splits: dict,
    max_epochs: int,
    patience: int,
    seed: int,
    train_size: int | None = None,
    batch_size: int = 64,
):
    """Loads the model cached at ``path``, or trains it (selected on validation) and caches it.

    Returns ``(model, iterations)``: the optimizer steps training from scratch needed to
    its best validation epoch. ``train_size`` limits the training samples (seeded subset).
    """
    record = path[: -len(".keras")] + ".json"
    if os.path.exists(path) and os.path.exists(record):
        logging.info("Reusing %s (delete it to retrain)", path)
        return io_utils.load_model(path), io_utils.read_json(record)["iterations"]
    x, y = splits["train"]
    if train_size is not None and train_size < len(x):
        keep = np.sort(np.random.default_rng(seed).permutation(len(x))[:train_size])
        x, y = x[keep], y[keep]
    logging.info("Training %s on %d samples (seed %d)", path, len(x), seed)
    model = build(seed)
    iterations = training.train_to_convergence(
        model,
        (x, y),
        splits["validation"],
        max_epochs,
        patience,
        batch_size=batch_size,
        seed=seed,
        verbose=2,
    )
    io_utils.save_model(model, path)
    io_utils.write_json(record, {"iterations": iterations, "train_samples": len(x)})
    return model, iterations


SPLIT_GROUPS = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
THREE_GROUPS = ((0, 1, 2), (3, 4, 5), (6, 7, 8, 9))


def group_name(classes) -> str:
    return "classes" + "".join(str(c) for c in classes)


def task_splits(groups, data_dir=None) -> dict:
    """{task name: load_task splits} for each label group."""
    return {group_name(g): data.load_task("fashion_mnist", g, data_dir=data_dir) for g in groups}

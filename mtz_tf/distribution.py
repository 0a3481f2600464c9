"""Who writes under a multi-worker ``tf.distribute`` strategy, and the strategies the binaries
offer.

Every worker of a ``tf.distribute.MultiWorkerMirroredStrategy`` runs the same program and
reaches every save, so the Keras multi-worker convention applies: the chief (task
``chief``, or ``worker`` 0 where the cluster has no chief; the strategy's
``extended.should_checkpoint``) writes to the real path, every other worker writes the
same content to a private temporary directory that it removes at once. Saving on all
workers keeps them in step (a save may run collective ops), and only the chief's files
exist afterwards. :mod:`mtz_tf.io_utils` routes every write of the project through
:func:`is_chief`, so checkpoints, exported models, reports and result tables follow it.

Under the default strategy, ``MirroredStrategy`` and ``OneDeviceStrategy`` the one
process is the chief.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "one_device")
"""The names the binaries' ``--strategy`` flag takes (:func:`make_strategy`)."""


def is_chief() -> bool:
    """Whether this process writes outputs under the current ``tf.distribute`` strategy."""
    return bool(tf.distribute.get_strategy().extended.should_checkpoint)


def worker_name() -> str:
    """``"<task type> <task index>"`` of this process in its cluster (``TF_CONFIG``), or
    ``"chief"`` outside a cluster."""
    resolver = getattr(tf.distribute.get_strategy(), "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return "chief"
    return f"{resolver.task_type} {resolver.task_id}"


@contextlib.contextmanager
def worker_scratch() -> Iterator[str]:
    """A fresh private directory for a non-chief worker's copy of a write; removed on exit."""
    directory = tempfile.mkdtemp(prefix=f"mtz_tf-{worker_name().replace(' ', '')}-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def check_exportable(what: str = "Exporting") -> None:
    """Refuses SavedModel/TFLite work under a replicating strategy.

    The exporter checks every artifact by loading it back and running it, and a SavedModel
    loaded inside a replicating strategy's scope cannot run (its graph, traced in the
    cross-replica context, is executed in a replica context), so exporting is one-process
    work: run it after the zip, outside the strategy's scope, on the ``.keras`` file the
    chief saved.

    Raises:
        ValueError: a ``MirroredStrategy`` or ``MultiWorkerMirroredStrategy`` is current.
    """
    strategy = tf.distribute.get_strategy()
    replicating = (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)
    if isinstance(strategy, replicating):
        raise ValueError(
            f"{what} needs one process without a replicating strategy, but "
            f"{type(strategy).__name__} is current, inside whose scope a SavedModel cannot "
            "be loaded back and checked. Export after the zip, outside the strategy's scope "
            "(e.g. experiments/export.py --strategy=default on the .keras file the chief "
            "saved)."
        )


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy a binary's ``--strategy=name`` asks for.

    * ``default``: no distribution (one device, TensorFlow's placement);
    * ``mirrored``: ``MirroredStrategy`` over this machine's GPUs (or its CPU);
    * ``multi_worker``: ``MultiWorkerMirroredStrategy`` over the cluster that the
      ``TF_CONFIG`` environment variable describes (one process per worker);
    * ``one_device``: ``OneDeviceStrategy`` on the first GPU, else the CPU.

    Create it at program start, before any other TensorFlow work (a multi-worker strategy
    configures collective ops, which must come first).

    Raises:
        ValueError: an unknown name, or ``multi_worker`` without a usable ``TF_CONFIG``.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "multi_worker":
        _check_tf_config(os.environ.get("TF_CONFIG"))
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"Unknown strategy {name!r}; expected one of {list(STRATEGIES)}.")


def _check_tf_config(text: str | None) -> None:
    """A multi-worker strategy without a cluster would silently train alone: refuse it."""
    example = (
        'TF_CONFIG=\'{"cluster": {"worker": ["host1:port", "host2:port"]}, '
        '"task": {"type": "worker", "index": 0}}\''
    )
    if not text:
        raise ValueError(
            "The multi_worker strategy needs the cluster in the TF_CONFIG environment "
            f"variable, e.g. {example} (index 1 on the second worker)."
        )
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        members = cluster[task["type"]]
        int(task["index"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"TF_CONFIG is not a cluster description ({text[:80]!r}); give e.g. {example}."
        ) from None
    if not 0 <= int(task["index"]) < len(members):
        raise ValueError(
            f"TF_CONFIG's task index {task['index']} is outside its {len(members)} "
            f"{task['type']!r} address(es)."
        )

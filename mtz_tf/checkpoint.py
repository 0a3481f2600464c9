"""Checkpoints that let an interrupted zip resume after its last completed unit.

A checkpoint directory holds one complete snapshot per save, ``unit-NNNN/`` (the zipped
model ``zipped.keras`` and ``progress.json``), and a pointer file ``latest`` that names the
newest one. A save stages the snapshot inside the checkpoint directory, renames it to
``unit-NNNN``, then replaces ``latest`` (one atomic rename), then removes older snapshots:
at every moment ``latest`` names a complete snapshot, so a kill at any point loses at most
the unit being zipped. Everything is written inside the checkpoint directory itself, so it
works in a read-only parent once the directory exists.

Under a multi-worker strategy the chief alone writes the directory; every worker resumes
from it, so it must be on storage all workers read (:mod:`mtz_tf.distribution`).

``progress.json`` records a fingerprint of everything that determines the zip (the input
models' weights, the shared counts, the options, the calibration data and the retraining
settings), the size and SHA-256 of ``zipped.keras``, and the number of completed units.
A resume checks all of them and says exactly what is wrong instead of carrying on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zipfile

import keras
import numpy as np

from mtz_tf import distribution, io_utils
from mtz_tf import retrain as retrain_lib

_LOG = logging.getLogger(__name__)

MODEL_FILE = "zipped.keras"
PROGRESS_FILE = "progress.json"
LATEST_FILE = "latest"
FORMAT = 2
_SNAPSHOT_PREFIX = "unit-"


def _snapshot_name(completed: int) -> str:
    return f"{_SNAPSHOT_PREFIX}{completed:04d}"


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_digest(dataset) -> str:
    """An order-independent digest of a dataset of input batches.

    Each sample's bytes b (as uint64) are hashed as two dot products Σ_i b_i r_i mod 2^64
    with fixed pseudo-random weights r (vectorised over the batch); the sorted per-sample
    hashes, the sample shape and dtype are then hashed with SHA-256. Reordering or
    re-batching the same samples gives the same digest; changing any byte of any sample
    changes it (up to hash collisions).
    """
    hashes, meta = [], None
    weights = None
    for batch in dataset.as_numpy_iterator():
        batch = np.ascontiguousarray(batch)
        meta = meta or (batch.shape[1:], str(batch.dtype))
        raw = batch.reshape(len(batch), -1).view(np.uint8).astype(np.uint64)  # (n, bytes)
        if weights is None or weights.shape[0] != raw.shape[1]:
            rng = np.random.default_rng(0)
            weights = rng.integers(0, 2**63, size=(raw.shape[1], 2), dtype=np.uint64) * 2 + 1
        with np.errstate(over="ignore"):
            hashes.append(raw @ weights)  # (n, 2), wraps mod 2^64
    digest = hashlib.sha256(repr(meta).encode())
    if hashes:
        table = np.concatenate(hashes)
        order = np.lexsort((table[:, 1], table[:, 0]))
        digest.update(np.ascontiguousarray(table[order]).tobytes())
    return digest.hexdigest()


def retrain_settings(retrain) -> dict | None:
    """The parts of a :class:`mtz_tf.Retrain` that determine the zip, as JSON-able values.

    The training datasets are streams (often infinite) and are not read; their element
    specs are recorded.
    """
    if retrain is None:
        return None
    optimizer = retrain_lib.optimizer_record(retrain.new_optimizer(), source="")
    loss = retrain.loss
    return {
        "steps_per_layer": np.asarray(retrain.steps_per_layer).tolist(),
        "optimizer": [optimizer["class_name"], optimizer["config"]],
        "loss": None if loss is None else keras.saving.serialize_keras_object(loss),
        "train_specs": {t: repr(d.element_spec) for t, d in sorted(retrain.train.items())},
    }


def fingerprint(models, shares, options: dict, calibration: dict, retrain) -> str:
    """SHA-256 of everything that determines a zip (module docstring)."""
    digest = hashlib.sha256()
    settings = {
        "tasks": list(models),
        "shares": shares,
        "options": options,
        "calibration": {t: dataset_digest(d) for t, d in sorted(calibration.items())},
        "retrain": retrain_settings(retrain),
    }
    digest.update(json.dumps(settings, sort_keys=True, default=repr).encode())
    for model in models.values():
        for variable in model.weights:
            digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()


def read_progress(directory: str) -> dict:
    """The ``progress.json`` of the newest snapshot in checkpoint ``directory`` (what a
    resume would continue from: ``completed_layers``, ``report``, ``saved_at``, ...)."""
    name = ZipCheckpoint(directory, 0, [])._latest_name()
    if name is None:
        raise FileNotFoundError(f"{directory!r} holds no mtz_tf checkpoint.")
    return io_utils.read_json(os.path.join(directory, name, PROGRESS_FILE))


class ZipCheckpoint:
    """The checkpoint directory of one zip (module docstring).

    Args:
        directory: str, the checkpoint directory (created if missing).
        num_units: int, the number of hidden units the zip has.
        task_names: list of str, the zip's tasks in order.
        verbose: int, log the resume at INFO (else at DEBUG) on the ``mtz_tf`` logger.
    """

    def __init__(self, directory: str, num_units: int, task_names: list, verbose: int = 1):
        if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
            raise TypeError(
                f"`checkpoint_dir` must be a directory path (str). Received: {directory!r}"
            )
        self.directory = os.path.abspath(os.fspath(directory))
        self.num_units = num_units
        self.task_names = list(task_names)
        self.verbose = verbose
        self.fingerprint = None

    def prepare(self) -> None:
        """Checks (and creates) the directory before any work starts; removes what
        interrupted saves left behind. Nothing that is not ours is ever deleted. Only the
        chief of a multi-worker strategy does this; the other workers read its directory."""
        if not distribution.is_chief():
            return
        path = self.directory
        if os.path.lexists(path) and not os.path.isdir(path):
            raise FileExistsError(
                f"`checkpoint_dir` {path!r} exists and is not a directory; it was left "
                "untouched. Give a new or empty directory, or an earlier checkpoint directory."
            )
        if not os.path.exists(path):
            try:
                os.makedirs(path)
            except OSError as error:
                raise PermissionError(
                    f"Cannot create `checkpoint_dir` {path!r}: {error.strerror}. Give a "
                    "directory in a writable location."
                ) from None
            return
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(
                f"`checkpoint_dir` {path!r} is not writable; give a writable directory."
            )
        names = os.listdir(path)
        ours = [n for n in names if self._is_ours(n)]
        if len(ours) != len(names):
            if PROGRESS_FILE in names:
                raise ValueError(
                    f"`checkpoint_dir` {path!r} holds a checkpoint written by an older mtz_tf "
                    "version, which cannot be resumed; delete it or give a new directory."
                )
            raise ValueError(
                f"`checkpoint_dir` {path!r} exists and is not an mtz_tf checkpoint (it holds "
                f"{sorted(set(names) - set(ours))[:5]}); give a new or empty directory."
            )
        self._clean(keep=self._latest_name())

    def _is_ours(self, name: str) -> bool:
        return (
            name == LATEST_FILE
            or (name.startswith(_SNAPSHOT_PREFIX) and name[len(_SNAPSHOT_PREFIX) :].isdigit())
            or io_utils.STAGING_MARK in name
            or name.endswith(io_utils.PREVIOUS_MARK)
        )

    def _latest_name(self) -> str | None:
        path = os.path.join(self.directory, LATEST_FILE)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            name = f.read().strip()
        if not (name.startswith(_SNAPSHOT_PREFIX) and name[len(_SNAPSHOT_PREFIX) :].isdigit()):
            raise ValueError(
                f"Checkpoint pointer {path!r} is damaged (it reads {name[:40]!r}, expected "
                f"'{_SNAPSHOT_PREFIX}NNNN'); delete the checkpoint directory to start over."
            )
        return name

    def _clean(self, keep: str | None) -> None:
        """Removes snapshots other than ``keep`` and staging entries of dead processes."""
        for name in os.listdir(self.directory):
            if name.startswith(_SNAPSHOT_PREFIX) and name != keep:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        io_utils.clean_stale(self.directory)

    def restore(self, fingerprint: str):
        """The saved ``(model, progress)``, or None for a new directory.

        Raises:
            ValueError: the checkpoint belongs to other models, data or settings, or one of
                its files is damaged (the message names the file and what is wrong).
        """
        self.fingerprint = fingerprint
        name = self._latest_name()
        if name is None:
            return None
        snapshot = os.path.join(self.directory, name)
        progress_path = os.path.join(snapshot, PROGRESS_FILE)
        model_path = os.path.join(snapshot, MODEL_FILE)
        advice = "delete the checkpoint directory to start over"
        for path in (progress_path, model_path):
            if not os.path.isfile(path):
                raise ValueError(f"Checkpoint file {path!r} is missing; {advice}.")
        try:
            progress = io_utils.read_json(progress_path)
        except ValueError as error:
            raise ValueError(f"Checkpoint progress is damaged: {error} Please {advice}.") from None
        if not isinstance(progress, dict) or progress.get("format") != FORMAT:
            raise ValueError(
                f"Checkpoint progress {progress_path!r} is not an mtz_tf checkpoint of format "
                f"{FORMAT}; {advice}."
            )
        if progress.get("fingerprint") != fingerprint:
            raise ValueError(
                f"`checkpoint_dir` {self.directory!r} holds a zip of other models, shares, "
                "options, calibration data or retraining settings than this call; use a new "
                "directory, or delete it to start over."
            )
        completed = progress.get("completed_layers")
        if (
            isinstance(completed, bool)
            or not isinstance(completed, int)
            or not 1 <= completed <= self.num_units
        ):
            raise ValueError(
                f"Checkpoint progress {progress_path!r} says {completed!r} units are complete; "
                f"expected an integer from 1 to {self.num_units}. The file was edited or is "
                f"damaged; {advice}."
            )
        if progress.get("tasks") != self.task_names:
            raise ValueError(
                f"Checkpoint progress {progress_path!r} lists tasks {progress.get('tasks')}, "
                f"but this zip has {self.task_names}; {advice}."
            )
        size = os.path.getsize(model_path)
        if size != progress.get("model_bytes") or _file_digest(model_path) != progress.get(
            "model_sha256"
        ):
            raise ValueError(
                f"Checkpoint model {model_path!r} is damaged: {size} bytes, its checksum "
                f"does not match the {progress.get('model_bytes')} bytes recorded when it "
                f"was saved (truncated or overwritten); {advice}."
            )
        try:
            model = keras.saving.load_model(model_path, compile=False)
        except (OSError, ValueError, TypeError, zipfile.BadZipFile) as error:
            raise ValueError(
                f"Checkpoint model {model_path!r} cannot be loaded ({error}); {advice}."
            ) from None
        message = (
            f"Resuming from checkpoint {snapshot!r}: {completed} of {self.num_units} units "
            f"zipped, saved {progress.get('saved_at', 'at an unknown time')}."
        )
        _LOG.log(logging.INFO if self.verbose else logging.DEBUG, message)
        return model, progress

    def save(self, model: keras.Model, completed: int, report: dict) -> None:
        """Saves a snapshot after ``completed`` units (module docstring); a non-chief worker
        of a multi-worker strategy saves the model to scratch only (:mod:`mtz_tf.distribution`)."""
        if not distribution.is_chief():
            with distribution.worker_scratch() as scratch:
                model.save(os.path.join(scratch, MODEL_FILE))
            return
        name = _snapshot_name(completed)
        snapshot = os.path.join(self.directory, name)
        if os.path.lexists(snapshot) and name != self._latest_name():
            shutil.rmtree(snapshot)  # an unreferenced leftover of an interrupted save
        with io_utils.staged_directory(snapshot) as staging:
            model_path = os.path.join(staging, MODEL_FILE)
            model.save(model_path)
            progress = {
                "format": FORMAT,
                "fingerprint": self.fingerprint,
                "tasks": self.task_names,
                "completed_layers": completed,
                "model_bytes": os.path.getsize(model_path),
                "model_sha256": _file_digest(model_path),
                "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                "report": report,
            }
            with open(os.path.join(staging, PROGRESS_FILE), "w") as f:
                json.dump(progress, f)
        io_utils.write_text(os.path.join(self.directory, LATEST_FILE), name + "\n")
        self._clean(keep=name)

"""Zip checkpoints: refused paths, interrupted saves, validation on resume, divergence."""

import os
import shutil
import subprocess

import keras
import numpy as np
import pytest
from conftest import killed_on_call

import mtz_tf
from mtz_tf import checkpoint, data, io_utils


def _mlp(seed, hidden=(24, 16)):
    init = keras.initializers.GlorotUniform(seed=seed)
    inputs = keras.Input((12,))
    x = inputs
    for i, width in enumerate(hidden):
        x = keras.layers.Dense(width, activation="relu", kernel_initializer=init, name=f"h{i}")(x)
    outputs = keras.layers.Dense(5, kernel_initializer=init, name="out")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def pair():
    return {"a": _mlp(1), "b": _mlp(2)}


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(0)
    return rng.standard_normal((96, 12)).astype("float32"), rng.integers(0, 5, 96)


def _calibration(samples, batch_size=32):
    return {t: data.to_dataset(samples[0], batch_size=batch_size) for t in ("a", "b")}


def _retrain(samples, steps=2, optimizer=None, callbacks=()):
    x, y = samples
    streams = {t: data.training_stream(x, y, 16, seed=i) for i, t in enumerate(("a", "b"))}
    return mtz_tf.Retrain(
        streams, steps_per_layer=steps, optimizer=optimizer, callbacks=list(callbacks), verbose=0
    )


def _weights(model):
    return [v.numpy().copy() for v in model.weights]


def _zip(pair, samples, directory, **kwargs):
    kwargs.setdefault("calibration", _calibration(samples))
    return mtz_tf.zip_models(pair, share=0.5, checkpoint_dir=str(directory), verbose=0, **kwargs)


def _snapshot(directory):
    with open(os.path.join(directory, checkpoint.LATEST_FILE)) as f:
        return os.path.join(directory, f.read().strip())


def test_a_regular_file_as_checkpoint_dir_is_refused_and_kept(pair, samples, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("my notes")
    before = [_weights(m) for m in pair.values()]
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        _zip(pair, samples, path)
    assert path.read_text() == "my notes"
    for model, weights in zip(pair.values(), before):
        for a, b in zip(_weights(model), weights):
            np.testing.assert_array_equal(a, b)


def test_a_foreign_directory_is_refused_and_kept(pair, samples, tmp_path):
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(ValueError, match="is not an mtz_tf checkpoint"):
        _zip(pair, samples, tmp_path)
    assert os.listdir(tmp_path) == ["data.csv"]


def test_saves_write_only_inside_the_checkpoint_dir(pair, samples, tmp_path):
    directory = tmp_path / "ckpt"
    _zip(pair, samples, directory)
    # Nothing is staged in the parent, so a read-only parent does not matter once the
    # directory exists; one complete snapshot and the pointer remain.
    assert os.listdir(tmp_path) == ["ckpt"]
    assert sorted(os.listdir(directory)) == ["latest", "unit-0002"]
    assert checkpoint.read_progress(str(directory))["completed_layers"] == 2


def test_interrupted_save_keeps_the_previous_snapshot(pair, samples, tmp_path, monkeypatch):
    """A kill between writing snapshot 2 and switching the pointer resumes from snapshot 1;
    a kill after the switch, before the old snapshot is removed, resumes from 2."""
    directory = tmp_path / "ckpt"
    real_write = io_utils.write_text
    dies = killed_on_call(real_write, 2, "killed before the pointer switch")
    monkeypatch.setattr(io_utils, "write_text", dies)
    with pytest.raises(KeyboardInterrupt):
        _zip(pair, samples, directory)
    monkeypatch.setattr(io_utils, "write_text", real_write)
    assert checkpoint.read_progress(str(directory))["completed_layers"] == 1
    full, _ = mtz_tf.zip_models(pair, _calibration(samples), share=0.5, verbose=0)
    resumed, _ = _zip(pair, samples, directory)
    for a, b in zip(_weights(full), _weights(resumed)):
        np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(directory)) == ["latest", "unit-0002"]

    # Killed after the switch: the stale snapshot is cleaned up on the next run.
    shutil.copytree(directory / "unit-0002", directory / "unit-0001")
    _zip(pair, samples, directory)
    assert sorted(os.listdir(directory)) == ["latest", "unit-0002"]


def test_resume_says_what_it_resumed_from(pair, samples, tmp_path, progress_lines):
    directory = tmp_path / "ckpt"
    _zip(pair, samples, directory)
    mtz_tf.zip_models(
        pair, _calibration(samples), share=0.5, checkpoint_dir=str(directory), verbose=1
    )
    out = progress_lines.getvalue()
    assert "Resuming from checkpoint" in out and "unit-0002" in out and "2 of 2 units" in out


def test_stale_staging_entries_are_removed(pair, samples, tmp_path):
    directory = tmp_path / "ckpt"
    _zip(pair, samples, directory)
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    stale = directory / f".unit-0003{io_utils.STAGING_MARK}{dead}-abcd"
    stale.mkdir()
    (stale / "zipped.keras").write_bytes(b"half")
    _zip(pair, samples, directory)
    assert not stale.exists()


def test_resume_with_other_calibration_data_is_refused(pair, samples, tmp_path):
    directory = tmp_path / "ckpt"
    _zip(pair, samples, directory)
    other = (samples[0] * 1.5, samples[1])
    with pytest.raises(ValueError, match="calibration data or retraining settings"):
        _zip(pair, samples, directory, calibration=_calibration(other))
    # The same samples re-batched and reordered are the same data.
    x = samples[0][::-1]
    _zip(pair, samples, directory, calibration=_calibration((x, None), batch_size=17))


def test_resume_with_other_retrain_settings_is_refused(pair, samples, tmp_path):
    directory = tmp_path / "ckpt"
    _zip(pair, samples, directory, retrain=_retrain(samples, steps=2))
    with pytest.raises(ValueError, match="retraining settings"):
        _zip(pair, samples, directory, retrain=_retrain(samples, steps=3))
    with pytest.raises(ValueError, match="retraining settings"):
        _zip(pair, samples, directory, retrain=_retrain(samples, 2, keras.optimizers.SGD(0.01)))


def test_dataset_digest_ignores_order_and_batching_only():
    x = np.random.default_rng(1).standard_normal((50, 3, 4)).astype("float32")
    digest = checkpoint.dataset_digest(data.to_dataset(x, batch_size=8))
    assert digest == checkpoint.dataset_digest(data.to_dataset(x[::-1], batch_size=50))
    y = x.copy()
    y[17, 2, 3] = np.nextafter(y[17, 2, 3], np.inf)  # one ulp in one sample
    assert digest != checkpoint.dataset_digest(data.to_dataset(y, batch_size=8))
    assert digest != checkpoint.dataset_digest(data.to_dataset(x[:49], batch_size=8))


@pytest.mark.parametrize("completed", [0, 3, 99, -1, "1", 1.5, None])
def test_edited_completed_layers_is_refused(pair, samples, tmp_path, completed):
    directory = tmp_path / "ckpt"
    _zip(pair, samples, directory)
    path = os.path.join(_snapshot(directory), checkpoint.PROGRESS_FILE)
    progress = io_utils.read_json(path)
    progress["completed_layers"] = completed
    io_utils.write_json(path, progress)
    with pytest.raises(ValueError, match="expected an integer from 1 to 2"):
        _zip(pair, samples, directory)


@pytest.mark.parametrize(
    ("file", "keep", "pattern"),
    [
        (checkpoint.MODEL_FILE, 0.5, "zipped.keras' is damaged.*truncated"),
        (checkpoint.PROGRESS_FILE, 40, "progress.json' is not valid JSON"),
    ],
)
def test_a_truncated_file_is_reported_as_damaged(pair, samples, tmp_path, file, keep, pattern):
    directory = tmp_path / "ckpt"
    _zip(pair, samples, directory)
    path = os.path.join(_snapshot(directory), file)
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep) if isinstance(keep, float) else keep)
    with pytest.raises(ValueError, match=pattern):
        _zip(pair, samples, directory)


def test_damaged_pointer_is_reported(pair, samples, tmp_path):
    directory = tmp_path / "ckpt"
    _zip(pair, samples, directory)
    (directory / checkpoint.LATEST_FILE).write_text("unit-00")
    with pytest.raises(ValueError, match="pointer .* is damaged|missing"):
        _zip(pair, samples, directory)


def _diverging(samples, steps):
    return _retrain(samples, steps, keras.optimizers.SGD(learning_rate=1e30))


def test_diverging_retraining_with_one_hidden_layer_is_caught(samples):
    pair = {"a": _mlp(1, hidden=(16,)), "b": _mlp(2, hidden=(16,))}
    with pytest.raises(mtz_tf.RetrainingDivergedError, match="after layer 'h0' diverged") as info:
        mtz_tf.zip_models(pair, _calibration(samples), retrain=_diverging(samples, 5), verbose=0)
    assert info.value.layer == "h0" and 0 <= info.value.step < 5


def test_diverging_retraining_keeps_the_last_good_checkpoint(pair, samples, tmp_path):
    directory = tmp_path / "ckpt"
    with pytest.raises(mtz_tf.RetrainingDivergedError, match="'h1'.*retraining step") as info:
        _zip(pair, samples, directory, retrain=_diverging(samples, [0, 4]))
    assert info.value.layer == "h1"
    progress = checkpoint.read_progress(str(directory))
    assert progress["completed_layers"] == 1
    assert np.isfinite(progress["report"]["layers"][0]["merge_cost"])


@pytest.fixture
def read_only_parent(tmp_path):
    """A parent directory in which nothing can be created or renamed (immutable, so that
    it holds for root too), holding a writable ``ckpt`` directory."""
    parent = tmp_path / "ro"
    (parent / "ckpt").mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here (needs root on ext2/3/4, xfs or btrfs)")
    yield parent
    subprocess.run(["chattr", "-i", str(parent)], check=True)


def test_a_writable_checkpoint_dir_in_a_read_only_parent_works(pair, samples, read_only_parent):
    directory = read_only_parent / "ckpt"
    with pytest.raises(OSError):
        (read_only_parent / "probe").mkdir()  # the parent really is read-only
    full, _ = _zip(pair, samples, directory)
    assert sorted(os.listdir(directory)) == ["latest", "unit-0002"]
    resumed, _ = _zip(pair, samples, directory)
    for a, b in zip(_weights(full), _weights(resumed)):
        np.testing.assert_array_equal(a, b)
    assert os.listdir(read_only_parent) == ["ckpt"]

"""The project's one atomic writer: modes under the umask, swaps, failures, stale entries."""

import os
import stat

import keras
import numpy as np
import pytest
from conftest import killed_on_call

import mtz_tf
from mtz_tf import io_utils


@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _tiny_model():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(hidden))


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_files_and_directories_honour_the_umask(tmp_path, umask, mask):
    umask(mask)
    io_utils.write_text(str(tmp_path / "a.txt"), "x")
    io_utils.save_model(_tiny_model(), str(tmp_path / "m.keras"))
    with io_utils.staged_directory(str(tmp_path / "d")) as staging:
        os.mkdir(os.path.join(staging, "sub"))
        io_utils.write_text(os.path.join(staging, "sub", "f.json"), "{}")
    assert _mode(tmp_path / "a.txt") == 0o666 & ~mask
    assert _mode(tmp_path / "m.keras") == 0o666 & ~mask
    assert _mode(tmp_path / "d") == 0o777 & ~mask
    assert _mode(tmp_path / "d" / "sub") == 0o777 & ~mask
    assert _mode(tmp_path / "d" / "sub" / "f.json") == 0o666 & ~mask


def test_export_is_readable_by_other_accounts(tmp_path, umask):
    umask(0o022)
    out = tmp_path / "deploy"
    mtz_tf.export(_tiny_model(), str(out), formats=("keras",))
    assert _mode(out) == 0o755
    assert _mode(out / "model.keras") == 0o644
    assert _mode(out / "export.json") == 0o644


def test_staged_directory_replaces_an_existing_one_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with io_utils.staged_directory(str(target)) as staging:
        assert (target / "old.txt").read_text() == "old"  # untouched while staging
        with open(os.path.join(staging, "new.txt"), "w") as f:
            f.write("new")
    assert os.listdir(target) == ["new.txt"]
    assert os.listdir(tmp_path) == ["out"]  # nothing staged is left behind


def test_a_failure_leaves_the_previous_version(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), io_utils.staged_directory(str(target)) as staging:
        with open(os.path.join(staging, "half.txt"), "w") as f:
            f.write("half")
        raise RuntimeError("killed")
    assert os.listdir(target) == ["old.txt"]
    file = tmp_path / "f.json"
    io_utils.write_json(str(file), {"v": 1})
    with pytest.raises(TypeError):
        io_utils.write_json(str(file), {"v": object()})
    assert io_utils.read_json(str(file)) == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["f.json", "out"]


def test_without_an_atomic_exchange_the_parked_version_is_restored(tmp_path, monkeypatch):
    """Where renameat2 cannot exchange, the old directory is parked first; a kill between
    the two renames leaves it parked, and the next write to the target restores it."""
    monkeypatch.setattr(io_utils, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    target.mkdir()
    (target / "v1.txt").write_text("1")
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", killed_on_call(real_rename, 2, "killed between renames"))
    with pytest.raises(KeyboardInterrupt), io_utils.staged_directory(str(target)) as staging:
        open(os.path.join(staging, "v2.txt"), "w").close()
    monkeypatch.setattr(os, "rename", real_rename)
    assert not target.exists()
    parked = tmp_path / f".out{io_utils.PREVIOUS_MARK}"
    assert os.listdir(parked) == ["v1.txt"]
    with pytest.raises(RuntimeError), io_utils.staged_directory(str(target)):
        raise RuntimeError("the next write fails too")
    assert os.listdir(target) == ["v1.txt"]
    with io_utils.staged_directory(str(target)) as staging:
        open(os.path.join(staging, "v3.txt"), "w").close()
    assert os.listdir(target) == ["v3.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_stale_staging_entries_of_dead_processes_are_removed(tmp_path):
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    stale = tmp_path / f".m.keras{io_utils.STAGING_MARK}{dead}-0000.keras"
    stale.write_bytes(b"partial")
    live = tmp_path / f".m.keras{io_utils.STAGING_MARK}{os.getpid()}-0000.keras"
    live.write_bytes(b"another writer of this process")
    io_utils.save_model(_tiny_model(), str(tmp_path / "m.keras"))
    assert not stale.exists() and live.exists()


def test_a_file_is_never_replaced_by_a_directory(tmp_path):
    target = tmp_path / "report"
    target.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a directory"):
        with io_utils.staged_directory(str(target)):
            pass
    assert target.read_text() == "keep me"


def test_model_round_trip_and_clear_errors(tmp_path):
    model = _tiny_model()
    path = str(tmp_path / "sub" / "m.keras")
    io_utils.save_model(model, path)
    x = np.ones((2, 4), "float32")
    np.testing.assert_array_equal(io_utils.load_model(path)(x), model(x))
    with pytest.raises(ValueError, match="must end in '.keras'"):
        io_utils.save_model(model, str(tmp_path / "m.h5"))
    with pytest.raises(FileNotFoundError, match="No model file"):
        io_utils.load_model(str(tmp_path / "missing.keras"))
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        io_utils.read_json(str(tmp_path / "bad.json"))

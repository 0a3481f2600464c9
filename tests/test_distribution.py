"""mtz_tf.distribution: the binaries' strategies, TF_CONFIG checks, and chief-only writes
(the two-process run itself is tests/test_multi_worker.py)."""

import json
import os
import subprocess
import sys

import pytest

from mtz_tf import checkpoint, distribution, io_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_process_is_the_chief():
    assert distribution.is_chief()
    assert distribution.worker_name() == "chief"
    assert distribution.make_strategy("default").num_replicas_in_sync == 1


@pytest.mark.parametrize(
    "tf_config, pattern",
    [
        (None, "needs the cluster in the TF_CONFIG"),
        ("{not json", "is not a cluster description"),
        (json.dumps({"cluster": {"worker": ["localhost:1"]}}), "is not a cluster description"),
        (
            json.dumps(
                {"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 2}}
            ),
            "task index 2 is outside its 1 'worker' address",
        ),
    ],
)
def test_multi_worker_without_a_usable_cluster_is_refused(monkeypatch, tf_config, pattern):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ValueError, match=pattern):
        distribution.make_strategy("multi_worker")


def test_an_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="expected one of"):
        distribution.make_strategy("tpu")


def test_a_non_chief_writes_only_to_scratch_and_removes_it(tmp_path, monkeypatch, lenet_a):
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch_root))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    monkeypatch.setattr(distribution, "is_chief", lambda: False)
    out = tmp_path / "out"
    out.mkdir()
    io_utils.write_json(str(out / "report.json"), {"a": 1})
    io_utils.save_model(lenet_a, str(out / "model.keras"))
    with io_utils.staged_directory(str(out / "export")) as staging:
        assert os.path.isdir(staging) and not staging.startswith(str(out))
    store = checkpoint.ZipCheckpoint(str(tmp_path / "ckpt"), 2, ["a", "b"], verbose=0)
    store.prepare()
    store.fingerprint = "f"
    store.save(lenet_a, 1, {})
    assert os.listdir(out) == []
    assert not (tmp_path / "ckpt").exists()
    assert os.listdir(scratch_root) == []


def test_a_binary_refuses_multi_worker_without_tf_config(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "experiments", "zip.py"),
            "--strategy=multi_worker",
            "--models=a.keras,b.keras",
            f"--output={tmp_path / 'z.keras'}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("zip.py: error:") and "TF_CONFIG" in last
    assert os.listdir(tmp_path) == []


def test_export_under_a_replicating_strategy_is_refused_before_writing(tmp_path, lenet_a):
    import tensorflow as tf

    import mtz_tf

    with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
        with pytest.raises(ValueError, match="outside the strategy's scope"):
            mtz_tf.export(lenet_a, str(tmp_path / "deploy"))
    assert os.listdir(tmp_path) == []

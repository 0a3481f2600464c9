"""The absl binaries end to end: train two models, zip them, read the results back."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *flags, check=True, relative=False):
    """Runs a binary by its absolute path, or (``relative``) as ``experiments/<script>``
    from the checkout, the way the README types it."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    path = (
        os.path.join("experiments", script)
        if relative
        else os.path.join(ROOT, "experiments", script)
    )
    result = subprocess.run(
        [sys.executable, path, *flags],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_train_then_zip_binaries(tmp_path):
    paths = []
    for seed in (1, 2):
        path = str(tmp_path / f"m{seed}.keras")
        run(
            "train.py",
            f"--seed={seed}",
            "--epochs=1",
            "--train_size=3000",
            "--permute_hidden",
            f"--output={path}",
            relative=seed == 2,
        )
        paths.append(path)
        summary = json.load(open(path.replace(".keras", ".json")))
        assert 0.5 < summary["test_accuracy"] <= 1.0 and summary["flags"]["seed"] == seed
    zipped_path = str(tmp_path / "zipped.keras")
    result = run(
        "zip.py",
        f"--models={','.join(paths)}",
        "--tasks=a,b",
        "--share=fc1=200,fc2=0.5",
        "--calibration_size=500",
        "--retrain_steps=5",
        f"--output={zipped_path}",
    )
    report = json.load(open(zipped_path.replace(".keras", ".json")))
    assert [layer["shared"] for layer in report["layers"]] == [200, 50]
    assert report["retrain_steps"] == 10 and report["flags"]["share"] == "fc1=200,fc2=0.5"
    # Output: the report table on stdout, progress as plain lines on stderr, no framework
    # INFO lines (absl's "I1202 12:00:00.000 ..." format, TensorFlow's "INFO:tensorflow:").
    rows = [line for line in result.stdout.splitlines() if line.startswith("| fc")]
    assert [row.split(" | ")[2] for row in rows] == ["200 / 300", "50 / 100"]
    assert "[zip 1/2] fc1: shared 200/300" in result.stderr
    assert "Saved " in result.stderr
    noise = [
        line
        for line in result.stderr.splitlines()
        if line.startswith(("INFO:", "I1", "I0", "W1", "W0")) or "retracing" in line
    ]
    assert not noise, noise
    with open(zipped_path.replace(".keras", ".png"), "rb") as figure:
        assert figure.read(8) == b"\x89PNG\r\n\x1a\n"
    zipped = keras.saving.load_model(zipped_path)
    outputs = zipped(np.zeros((2, 28, 28, 1), np.float32))
    assert set(outputs) == {"a", "b"}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp_")]  # atomic writes


def test_help_documents_flags():
    result = run("zip.py", "--helpshort", check=False)  # absl exits 1 after help
    text = result.stdout + result.stderr
    for flag in ("--calibration_size", "--share", "--matching", "--retrain_steps", "--output"):
        assert flag in text

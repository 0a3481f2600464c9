"""Two MultiWorkerMirroredStrategy workers on localhost zip as one process does, only the
chief writes, and a restarted cluster resumes from the chief's checkpoint.

Each worker is a process of tests/distributed_case.py with its own ``TF_CONFIG`` (ports
chosen free at run time), ``TMPDIR`` and ``--out_dir``; every run is bounded in time and
its processes are killed on the way out.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import pytest
from conftest import assert_close

import mtz_tf  # noqa: F401 (registers the zipped layers for loading)

CASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_case.py")
RUN_TIMEOUT_S = 420
RETRAINED_TOLERANCE = 3e-4
"""Weights after a few Adam steps: the all-reduce sums gradients in another order than one
process does, and Adam's normalisation magnifies those ulps to ~4e-5 of the weights'
scale; a wrong sharding or a doubled gradient moves them by 1e-2 or more."""


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _environment(tmp_dir, tf_config=None) -> dict:
    env = dict(os.environ, TMPDIR=str(tmp_dir), TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    os.makedirs(tmp_dir, exist_ok=True)
    return env


def _start(args, env, log_path):
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, CASE, *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    return process


def _kill(processes) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait(processes, logs, deadline) -> list[int]:
    codes = []
    for process, log in zip(processes, logs):
        try:
            codes.append(process.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            _kill(processes)
            pytest.fail(f"Worker timed out after {RUN_TIMEOUT_S} s; log:\n{_tail(log)}")
    return codes


def _tail(path, lines: int = 30) -> str:
    with open(path) as f:
        return "".join(f.readlines()[-lines:])


class Cluster:
    """Launches a two-worker cluster of tests/distributed_case.py under ``root``."""

    def __init__(self, root, name: str, out_dirs, args):
        ports = _free_ports(2)
        cluster = {"worker": [f"localhost:{p}" for p in ports]}
        self.logs = [root / f"{name}_worker{i}.log" for i in range(2)]
        self.tmp_dirs = [root / f"{name}_tmp{i}" for i in range(2)]
        self.processes = []
        try:
            for i in range(2):
                config = {"cluster": cluster, "task": {"type": "worker", "index": i}}
                env = _environment(self.tmp_dirs[i], config)
                worker_args = ["--strategy=multi_worker", f"--out_dir={out_dirs[i]}", *args]
                self.processes.append(_start(worker_args, env, self.logs[i]))
        except BaseException:
            _kill(self.processes)
            raise

    def scratch_left(self) -> list[str]:
        """mtz_tf scratch entries the workers left in their TMPDIRs."""
        return [n for d in self.tmp_dirs for n in os.listdir(d) if n.startswith("mtz_tf-")]


def _run_alone(root, name: str, out_dir, args) -> None:
    log = root / f"{name}.log"
    process = _start([f"--out_dir={out_dir}", *args], _environment(root / f"{name}_tmp"), log)
    try:
        (code,) = _wait([process], [log], time.time() + RUN_TIMEOUT_S)
    finally:
        _kill([process])
    assert code == 0, _tail(log)


def _run_cluster(root, name: str, out_dirs, args) -> Cluster:
    cluster = Cluster(root, name, out_dirs, args)
    try:
        codes = _wait(cluster.processes, cluster.logs, time.time() + RUN_TIMEOUT_S)
    finally:
        _kill(cluster.processes)
    for code, log in zip(codes, cluster.logs):
        assert code == 0, _tail(log)
    return cluster


def _assert_same_model(path_a, path_b, tol) -> None:
    a, b = keras.saving.load_model(path_a), keras.saving.load_model(path_b)
    assert [w.path for w in a.weights] == [w.path for w in b.weights]
    for wa, wb in zip(a.weights, b.weights):
        assert_close(wb.numpy(), wa.numpy(), tol, wa.path)


@pytest.mark.slow
def test_two_workers_zip_as_one_process_and_only_the_chief_writes(tmp_path):
    alone, chief, other = tmp_path / "alone", tmp_path / "chief", tmp_path / "other"
    for directory in (alone, chief, other):
        directory.mkdir()
    _run_alone(tmp_path, "alone", alone, ["--case=api"])
    cluster = _run_cluster(tmp_path, "api", [chief, other], ["--case=api"])

    outputs = {"lenet.keras", "added.keras", "cnn.keras", "reports.json"}
    assert set(os.listdir(chief)) == outputs
    assert os.listdir(other) == [], "a non-chief worker wrote to its output directory"
    assert cluster.scratch_left() == [], "a worker left its scratch copies behind"
    # ShareBudget + REPAIR statistics + retraining, add_task with retraining, and a
    # BatchNorm CNN whose statistics are re-estimated, then retrained with its BatchNorms
    # synchronised over the replicas: the same weights and statistics as one process.
    for name in ("lenet", "added", "cnn"):
        _assert_same_model(alone / f"{name}.keras", chief / f"{name}.keras", RETRAINED_TOLERANCE)
    with open(alone / "reports.json") as f:
        expected = json.load(f)
    with open(chief / "reports.json") as f:
        got = json.load(f)
    for name, report in expected.items():
        for want, have in zip(report["layers"], got[name]["layers"]):
            # Hessians summed over the workers' shards equal the whole data's: so do costs.
            assert have["shared"] == want["shared"]
            assert have["merge_cost"] == pytest.approx(want["merge_cost"], rel=1e-6)
            if want["accuracy_before_retraining"] is not None:
                assert have["accuracy_before_retraining"] == pytest.approx(
                    want["accuracy_before_retraining"], abs=2e-3
                )


@pytest.mark.slow
def test_a_restarted_cluster_resumes_from_the_chief_checkpoint(tmp_path):
    alone, chief, other = tmp_path / "alone", tmp_path / "chief", tmp_path / "other"
    for directory in (alone, chief, other):
        directory.mkdir()
    checkpoint = tmp_path / "checkpoint"
    args = ["--case=checkpoint", f"--checkpoint_dir={checkpoint}"]
    _run_alone(tmp_path, "alone", alone, ["--case=checkpoint", f"--checkpoint_dir={alone}/ck"])

    # Worker 1 dies after its save of unit 1; the chief, waiting for it in the next
    # collective, is killed once its checkpoint names unit 1.
    crashed = Cluster(tmp_path, "crashed", [chief, other], [*args, "--crash_after_unit=1"])
    try:
        deadline = time.time() + RUN_TIMEOUT_S
        assert _wait(crashed.processes[1:], crashed.logs[1:], deadline) == [3]
        latest = checkpoint / "latest"
        while not (latest.exists() and latest.read_text().strip() == "unit-0001"):
            assert time.time() < deadline, _tail(crashed.logs[0])
            time.sleep(0.2)
    finally:
        _kill(crashed.processes)
    assert not (chief / "resumed.keras").exists()

    restarted = _run_cluster(tmp_path, "restarted", [chief, other], args)
    for log in restarted.logs:
        assert "Resuming from checkpoint" in _tail(log, 200) and "unit-0001" in _tail(log, 200)
    assert os.listdir(other) == []
    assert sorted(os.listdir(checkpoint)) == ["latest", "unit-0002"]
    _assert_same_model(alone / "resumed.keras", chief / "resumed.keras", RETRAINED_TOLERANCE)

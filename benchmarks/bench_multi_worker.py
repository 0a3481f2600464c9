"""Hessian-pass and retraining throughput with 1 and 2 MultiWorkerMirroredStrategy workers.

    python benchmarks/bench_multi_worker.py [--output=results/multi_worker_scaling.md]

Launches the cluster itself: for W in (1, 2) it starts W processes of this file on
localhost (free ports, ``TF_CONFIG``), each limited to one TensorFlow thread, and each
measures on LeNet-5 (Fashion-MNIST shaped random inputs; throughput does not depend on the
values):

* a Hessian pass: the streamed input Hessians of fc1 (d = 801) and fc2 (d = 501) over
  ``--samples`` calibration samples (:func:`mtz_tf.hessian.dataset_hessians`, the pass a
  zip makes per unit), in samples per second;
* retraining: ``--steps`` steps of :func:`mtz_tf.fitting.fit` (the loop joint retraining
  uses) with a global batch of ``--batch_size``, in samples per second.

Each is timed after one untimed warm-up and reported by the chief (worker 0). Both workers
share this machine's cores, so the table says what the collective communication costs
against the work it splits, not how a cluster of separate machines scales.
"""

import json
import os
import socket
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("samples", 4096, "Calibration samples per Hessian pass.")
flags.DEFINE_integer("batch_size", 256, "Global batch size (Hessian pass and retraining).")
flags.DEFINE_integer("steps", 40, "Retraining steps per measurement.")
flags.DEFINE_list("workers", ["1", "2"], "Cluster sizes to measure.")
flags.DEFINE_string("output", None, "Markdown file for the table (default: print only).")
flags.DEFINE_bool("worker", False, "Internal: run as one worker of a launched cluster.")


def _measure() -> dict:
    """One worker's measurements (module docstring), under the TF_CONFIG cluster."""
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras
    import numpy as np

    from mtz_tf import fitting, hessian, models, training

    rng = np.random.default_rng(0)
    x = rng.random((FLAGS.samples, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, FLAGS.samples)
    with strategy.scope():
        model = models.lenet5(seed=0)
        training.compile_classifier(model)
    inputs = keras.Model(model.input, [model.get_layer(n).input for n in ("fc1", "fc2")])
    calibration = tf.data.Dataset.from_tensor_slices(x).batch(FLAGS.batch_size)

    def hessian_pass():
        hessian.dataset_hessians(
            lambda batch, index: inputs(batch), [calibration], [True, True], ["calibration"]
        )

    stream = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(FLAGS.batch_size)

    def retraining():
        fitting.fit(model, stream.take(FLAGS.steps))

    result = {"replicas": strategy.num_replicas_in_sync}
    for name, work, samples in (
        ("hessian", hessian_pass, FLAGS.samples),
        ("retraining", retraining, FLAGS.steps * FLAGS.batch_size),
    ):
        work()  # warm-up: traces and first collectives
        began = time.perf_counter()
        work()
        result[name] = samples / (time.perf_counter() - began)
    return result


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _run_cluster(workers: int) -> dict:
    """Starts ``workers`` processes of this file and returns the chief's measurements."""
    cluster = {"worker": [f"localhost:{p}" for p in _free_ports(workers)]}
    flag_args = [f"--samples={FLAGS.samples}", f"--batch_size={FLAGS.batch_size}"]
    flag_args += [f"--steps={FLAGS.steps}", "--worker"]
    processes = []
    for index in range(workers):
        config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CONFIG=json.dumps(config), TF_CPP_MIN_LOG_LEVEL="2")
        processes.append(
            subprocess.Popen(
                [sys.executable, __file__, *flag_args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=1200) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        if process.returncode:
            raise RuntimeError(f"A worker failed ({process.returncode}):\n{err[-3000:]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def main(argv):
    del argv
    if FLAGS.worker:
        print(json.dumps(_measure()), flush=True)
        return
    from mtz_tf import io_utils

    rows = {int(w): _run_cluster(int(w)) for w in FLAGS.workers}
    base = rows[min(rows)]
    command = "python benchmarks/bench_multi_worker.py " + " ".join(sys.argv[1:])
    lines = [
        "# Multi-worker throughput on one 2-core machine",
        "",
        f"`{command.strip()}` — LeNet-5, one TensorFlow thread per worker, global batch "
        f"{FLAGS.batch_size}; a Hessian pass is fc1's and fc2's input Hessians over "
        f"{FLAGS.samples} samples, retraining is {FLAGS.steps} `fitting.fit` steps. Workers "
        "share the machine: the table measures what the collectives cost against the work "
        "they split, not a cluster.",
        "",
        "| workers | Hessian pass (samples/s) | vs 1 worker | retraining (samples/s) "
        "| vs 1 worker |",
        "|---|---|---|---|---|",
    ]
    for workers, row in rows.items():
        lines.append(
            f"| {workers} | {row['hessian']:.0f} | {row['hessian'] / base['hessian']:.2f}× "
            f"| {row['retraining']:.0f} | {row['retraining'] / base['retraining']:.2f}× |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if FLAGS.output:
        io_utils.write_text(FLAGS.output, table)


if __name__ == "__main__":
    app.run(main)

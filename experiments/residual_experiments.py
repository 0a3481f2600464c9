"""Different-task zipping of residual networks: the ``resnet20_split`` and ``resnet20_three``
experiments of ``experiments/reproduce.py``.

Fashion-MNIST is split into disjoint label groups (labels remapped), one ResNet-20 is
trained per group (different seeds), and the models are zipped into one multi-task model
at several shared fractions, without and with light joint retraining.
"""

from __future__ import annotations

import os
import time

import keras
import numpy as np

import mtz_tf
from mtz_tf import cli, data, deploy_report, fitting, io_utils, models, training, zipped_network
from mtz_tf.compress import flops


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
        cli.logger.info("Reusing %s (delete it to retrain)", path)
        return io_utils.load_model(path), io_utils.read_json(record)["iterations"]
    x, y = splits["train"]
    if train_size is not None and train_size < len(x):
        keep = np.sort(np.random.default_rng(seed).permutation(len(x))[:train_size])
        x, y = x[keep], y[keep]
    cli.logger.info("Training %s on %d samples (seed %d)", path, len(x), seed)
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


ARCHITECTURES = {
    "resnet20": "ResNet-20 (width x{width:g}, BatchNorm, projection shortcuts)",
    "mobilenet_v2": (
        "keras.applications.MobileNetV2 (alpha {width:g}, weights=None, BatchNorm momentum "
        "0.9, on the images bilinearly upsampled to 32×32×3)"
    ),
}
"""The architectures of the different-task experiments, as the tables describe them."""


def _builder(architecture: str, num_classes: int, width: float, bn_momentum: float):
    """A seeded builder of one classifier (logits) of ``architecture``."""
    if architecture == "resnet20":
        return lambda s: models.resnet20(
            (28, 28, 1), num_classes, width, seed=s, bn_momentum=bn_momentum
        )

    def mobilenet_v2(s):
        keras.utils.set_random_seed(s)
        model = keras.applications.MobileNetV2(
            input_shape=(32, 32, 3),
            alpha=width,
            weights=None,
            classes=num_classes,
            classifier_activation=None,
        )
        for layer in model.layers:  # Keras' 0.999 lags far behind a short training
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
        return model

    return mobilenet_v2


def _inputs_for(architecture: str, splits: dict) -> dict:
    """The splits in the architecture's input format (MobileNet: 32×32×3)."""
    if architecture == "resnet20":
        return splits
    return {
        task: {name: (data.upsampled_rgb(x), y) for name, (x, y) in task_splits.items()}
        for task, task_splits in splits.items()
    }


def different_task_experiment(
    groups,
    width: float,
    parameter_targets,
    model_dir: str,
    data_dir,
    train_size: int,
    max_epochs: int,
    calibration_size: int,
    retrain_steps: int,
    retrain_every: int,
    retrain_batch_size: int,
    learning_rate: float,
    hessian: str,
    bn_momentum: float = 0.9,
    budget_steps: int | None = None,
    architecture: str = "resnet20",
    deploy_dir: str | None = None,
) -> dict:
    """Zips one ResNet-20 per label group at each target shared-parameter fraction; returns
    the JSON record.

    A conv layer's weights are shared only between a shared input channel and a shared
    output channel, so sharing the fraction s of every layer's neurons shares about s² of
    the parameters: for a target fraction p every hidden layer shares round(√p · width)
    neurons (MTZ greedy, per-task BatchNorm), and the table reports the fraction measured
    on the zipped model. Each target is zipped once without retraining and once with
    ``retrain_steps`` joint Adam steps after every ``retrain_every`` zipped layers and after
    the last (each retraining builds and compiles a joint trainer, the dominant cost on a
    CPU). As a control with the same budget, each separate model is also fine-tuned alone
    for the same number of steps on the same batches of its task, so that gains which only
    come from more training of under-trained input models are visible. Accuracy is measured
    on each group's test split; the models were selected on the validation splits; nothing
    here looks at the test splits except the final measurement.

    With ``budget_steps`` the counts come from ``mtz_tf.ShareBudget(parameters=p)``
    instead (cheapest pairs per saved parameter across streams, that many bisection steps),
    allocated once without retraining and reused for the retrained zip.

    ``architecture`` is a key of :data:`ARCHITECTURES` (``width`` its width multiplier or
    alpha). With ``deploy_dir`` every retrained zip is also exported (``.keras``,
    SavedModel, TFLite, parity checked on test images) and measured against the separate
    models (:func:`mtz_tf.deploy_report.size_speed_report`).
    """
    splits = _inputs_for(architecture, task_splits(groups, data_dir))
    tasks = list(splits)
    originals, iterations = {}, {}
    for seed, (task, classes) in enumerate(zip(tasks, groups), start=1):
        path = os.path.join(model_dir, f"{architecture}_w{width:g}_{task}_seed{seed}.keras")
        build = _builder(architecture, len(classes), width, bn_momentum)
        model, iterations[task] = cached_classifier(
            path, build, splits[task], max_epochs, 1, seed, train_size
        )
        originals[task] = models.permute_hidden(model, seed=100 + seed)
    calibration = {
        t: data.to_dataset(
            data.calibration_subset(splits[t]["train"][0], calibration_size, seed=i),
            batch_size=256,
        )
        for i, t in enumerate(tasks)
    }
    test_sets = {t: data.to_dataset(*splits[t]["test"], batch_size=500) for t in tasks}
    hidden = len(mtz_tf.graph.read_plan(originals[tasks[0]]).hidden_units)
    schedule = [
        retrain_steps if (i + 1) % retrain_every == 0 or i == hidden - 1 else 0
        for i in range(hidden)
    ]

    def streams():
        return {
            t: data.training_stream(*splits[t]["train"], retrain_batch_size, seed=i)
            for i, t in enumerate(tasks)
        }

    separate = {t: training.accuracy(m, *splits[t]["test"]) for t, m in originals.items()}
    separate_params = sum(m.count_params() for m in originals.values())
    separate_macs = sum(flops.count_flops(m) for m in originals.values())
    began = time.time()
    tuned = fine_tuned_separately(originals, streams(), sum(schedule), learning_rate)
    rows = [
        {
            "target_parameter_fraction": 0.0,
            "share": 0.0,
            "retrained": retrained,
            "test_accuracy": accuracy,
            "parameters": separate_params,
            "shared_parameter_fraction": 0.0,
            "macs": separate_macs,
            "retrain_iterations": sum(schedule) if retrained else 0,
            "seconds": time.time() - began if retrained else 0.0,
        }
        for retrained, accuracy in (
            (False, separate),
            (True, {t: training.accuracy(m, *splits[t]["test"]) for t, m in tuned.items()}),
        )
    ]
    widths = [unit.units for unit in mtz_tf.graph.read_plan(originals[tasks[0]]).hidden_units]
    for target in parameter_targets:
        share = float(np.sqrt(target))
        if budget_steps is not None:
            share = mtz_tf.ShareBudget(parameters=target, steps=budget_steps)
        for retrained in (False, True):
            began = time.time()
            retrain = None
            if retrained:
                retrain = mtz_tf.Retrain(
                    streams(),
                    steps_per_layer=schedule,
                    optimizer=keras.optimizers.Adam(learning_rate),
                    verbose=0,
                )
            zipped, report = mtz_tf.zip_models(
                originals,
                calibration,
                share=share,
                matching="greedy",  # the settings the committed tables were made with
                repair="none",
                hessian=hessian,
                retrain=retrain,
                verbose=1,
            )
            counts = [layer.shared for layer in report.layers[: len(widths)]]
            share = counts  # the allocation, if any, is reused for the retrained zip
            rows.append(
                {
                    "target_parameter_fraction": target,
                    "share": sum(counts) / sum(widths) if budget_steps else float(np.sqrt(target)),
                    "counts": counts,
                    "retrained": retrained,
                    "test_accuracy": mtz_tf.retrain.task_accuracies(zipped, test_sets),
                    "parameters": report.parameters["total"],
                    "shared_parameter_fraction": mtz_tf.shared_parameter_fraction(zipped),
                    "macs": zipped_network.multiply_accumulates(zipped),
                    "retrain_iterations": report.retrain_steps,
                    "merge_cost": sum(layer.merge_cost for layer in report.layers),
                    "alignment_seconds": report.alignment_seconds,
                    "seconds": time.time() - began,
                }
            )
            if retrained and deploy_dir is not None:
                rows[-1]["deployment"] = _deployment(
                    zipped, originals, os.path.join(deploy_dir, f"target{target:g}"), splits
                )
            cli.logger.info("target %.2f retrained=%s: %s", target, retrained, rows[-1])
    return {
        "architecture": ARCHITECTURES[architecture].format(width=width),
        "groups": [list(g) for g in groups],
        "tasks": tasks,
        "width_multiplier": width,
        "scratch_iterations": iterations,
        "separate_test_accuracy": separate,
        "hessian": hessian,
        "retrain_schedule": schedule,
        "allocation": "uniform" if budget_steps is None else f"budget ({budget_steps} steps)",
        "rows": rows,
    }


def _deployment(zipped, originals: dict, out_dir: str, splits: dict) -> dict:
    """Exports ``zipped`` and the separate models, checks parity on 256 test images of the
    first task and measures sizes and batch-1 latency; returns the report's dict."""
    x = next(iter(splits.values()))["test"][0][:256]
    report = deploy_report.size_speed_report(
        zipped, originals, out_dir, sample_inputs=x, overwrite=True, runs=100, warmup=10
    )
    return report.to_dict()


def fine_tuned_separately(originals: dict, streams: dict, steps: int, learning_rate: float):
    """{task: a copy of its model fine-tuned alone for ``steps`` Adam steps on ``streams[task]``}.

    The control for joint retraining: the same optimizer, learning rate, batches and step
    count, without zipping. The originals are not modified.
    """
    tuned = {}
    for task, model in originals.items():
        copy = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
        if steps:
            copy.compile(
                optimizer=keras.optimizers.Adam(learning_rate),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
            fitting.fit(copy, streams[task].take(steps))
        tuned[task] = copy
    return tuned


def markdown(record: dict, title: str, command: str) -> str:
    tasks = record["tasks"]
    sep = record["separate_test_accuracy"]
    lines = [
        f"# {title}",
        "",
        "Regenerate with:",
        "",
        "```",
        command,
        "```",
        "",
        f"Label groups {record['groups']} of Fashion-MNIST (labels remapped), one "
        f"{_architecture(record)} per group, "
        f"trained from scratch for {record['scratch_iterations']} iterations (best "
        "validation epoch), hidden units permuted. Each row targets a fraction p of the "
        + (
            "parameters to share by sharing √p of every hidden layer's neurons "
            if record.get("allocation", "uniform") == "uniform"
            else "parameters to share with `ShareBudget(parameters=p)` (per-stream counts, "
            "cheapest pairs per saved parameter first; 'neurons shared' is their total) "
        )
        + "(MTZ greedy, one "
        f"matching per residual stream, {record['hessian']} Hessians, per-task BatchNorm); "
        "retraining: joint Adam steps after the zipped hidden layers in the schedule "
        f"{record['retrain_schedule']} (steps after each hidden layer). The separate models' "
        "retrained row is the control: each model fine-tuned alone for the same steps on "
        "the same batches. Test accuracy (%) per task, Δ against the separate models without "
        "retraining and, in brackets, against the equally fine-tuned ones; 'shared params' "
        "is the measured fraction of the zipped model's parameter uses that go to shared "
        "weights; MACs for one input, all tasks.",
        "",
        "| target shared | neurons shared | retraining | "
        + " | ".join(f"{t} acc (Δ) [Δ tuned]" for t in tasks)
        + " | parameters | shared params | MACs | iterations |",
        "|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|",
    ]
    tuned = next(
        (r["test_accuracy"] for r in record["rows"] if r["share"] == 0 and r["retrained"]), sep
    )
    for row in record["rows"]:
        acc = " | ".join(
            f"{100 * row['test_accuracy'][t]:.2f} ({100 * (row['test_accuracy'][t] - sep[t]):+.2f})"
            f" [{100 * (row['test_accuracy'][t] - tuned[t]):+.2f}]"
            for t in tasks
        )
        separate = row["share"] == 0
        target = f"{100 * row['target_parameter_fraction']:.0f} %"
        if separate:
            target = "separate models"
        retraining = "no"
        if row["retrained"]:
            retraining = "alone (control)" if separate else "joint"
        lines.append(
            f"| {target} | {100 * row['share']:.1f} % | {retraining} | {acc} | "
            f"{row['parameters']:,} | {100 * row['shared_parameter_fraction']:.1f} % | "
            f"{row['macs'] / 1e6:.1f} M | {row['retrain_iterations']} |"
        )
    for row in record["rows"]:
        if "deployment" in row:
            lines += ["", *_deployment_markdown(row)]
    return "\n".join(lines) + "\n"


def _architecture(record: dict) -> str:
    """The record's architecture description (records before MobileNet: ResNet-20)."""
    default = ARCHITECTURES["resnet20"].format(width=record["width_multiplier"])
    return record.get("architecture", default)


def _deployment_markdown(row: dict) -> list[str]:
    """The size/latency table of one exported zip, with its TFLite parity."""
    report = deploy_report.DeploymentReport(**row["deployment"])
    title = (
        f"Deployment of the retrained zip at target {100 * row['target_parameter_fraction']:.0f} %"
    )
    parity = report.exports["zipped"]["parity"]
    worst = {fmt: max(per_task.values()) for fmt, per_task in parity.items()}
    return [
        report.to_markdown(title=title).rstrip("\n"),
        "",
        "Parity of the zipped exports with the Keras model on 256 test images (max |Δ| of "
        "the logits over tasks): "
        + ", ".join(f"{fmt} {value:.2g}" for fmt, value in sorted(worst.items()))
        + ".",
    ]


def plot(record: dict, path: str) -> None:
    """Accuracy against the shared parameter fraction, per task, with and without
    retraining; written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for t in record["tasks"]:
        for retrained, style in ((False, "--o"), (True, "-s")):
            rows = [r for r in record["rows"] if r["retrained"] == retrained]
            axis.plot(
                [100 * r["shared_parameter_fraction"] for r in rows],
                [100 * r["test_accuracy"][t] for r in rows],
                style,
                label=f"{t}, {'retrained' if retrained else 'no retraining'}",
            )
    axis.set_xlabel("parameters shared (%)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(f"Zipped {_architecture(record).split(' (')[0]}s on Fashion-MNIST label groups")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    io_utils.save_figure(figure, path, dpi=120)
    plt.close(figure)

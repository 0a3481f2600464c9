"""Regenerates the results tables in results/.

    python experiments/reproduce.py --experiment=lenet300

lenet300 (and lenet5, the same for LeNet-5, adding MTZ with the exact "patch" conv
Hessian next to the default "channel" one): the MTZ same-task experiment on
Fashion-MNIST. Two LeNet-300-100 trained to convergence with different seeds, hidden units
permuted, then both hidden layers fully zipped by (a) random pairing + plain average,
(b) weight-distance matching + plain average (the reference code's fc shortcut),
(c) MTZ greedy, (d) MTZ optimal; each without and with light joint retraining whose total
budget is 1/20 of the iterations training one model from scratch needed. Writes
results/<experiment>_fashion_mnist.{json,md}.

Every experiment here zips with ``repair="none"`` (and the residual ones with greedy
matching), the settings its committed table was made with, before repair and optimal
matching became the defaults; ``experiments/same_task_merge.py`` measures the defaults.
"""

import quiet_startup  # noqa: F401 (first: quiets TensorFlow's native log)

import os
import sys
import time

import keras
import residual_experiments as rx
from absl import flags

import mtz_tf
from mtz_tf import cli, data, distribution, io_utils, models, training

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "experiment",
    "lenet300",
    ["lenet300", "lenet5", "zip_merge", "resnet20_split", "resnet20_three", "mobilenet_v2_split"],
    "Which table to regenerate.",
)
# The residual_* flags below apply to the different-task experiments (resnet20_split,
# resnet20_three, mobilenet_v2_split); their help says "residual:".
flags.DEFINE_string("results_dir", "results", "Where the JSON and Markdown tables go.")
flags.DEFINE_string("data_dir", None, "Directory of Fashion-MNIST IDX files.")
flags.DEFINE_string(
    "model_dir",
    "artifacts/reproduce",
    "Trained input models are cached here and reused by later runs (delete them to retrain).",
)
flags.DEFINE_integer("max_epochs", 40, "Epoch limit when training the input models.")
flags.DEFINE_integer("patience", 3, "Early-stopping patience (epochs) on validation accuracy.")
flags.DEFINE_integer("calibration_size", 5000, "Calibration samples per task.")
flags.DEFINE_float(
    "budget_fraction",
    0.05,
    "Total retraining iterations as a fraction of the "
    "from-scratch training iterations (the paper's target: 1/20).",
)
flags.DEFINE_integer("retrain_batch_size", 128, "Samples per task per retraining iteration.")
flags.DEFINE_float(
    "retrain_learning_rate",
    None,
    "Adam learning rate of the retraining. Default: the library's (the input models' own "
    "Adam at a tenth of its compiled 1e-3, mtz_tf.retrain.LIGHT_RETRAINING_SCALE).",
)
flags.DEFINE_integer(
    "residual_train_size",
    8000,
    "residual: training samples per task (seeded subset).",
)
flags.DEFINE_integer("residual_max_epochs", 2, "residual: epoch limit when training.")
flags.DEFINE_integer(
    "residual_calibration_size",
    256,
    "residual: calibration samples per task.",
)
flags.DEFINE_integer(
    "residual_retrain_steps",
    14,
    "residual: joint retraining iterations per retraining.",
)
flags.DEFINE_integer(
    "residual_retrain_every",
    7,
    "residual: retrain after every this many zipped hidden layers (and after the last).",
)
flags.DEFINE_integer(
    "residual_batch_size",
    64,
    "residual: retraining samples per task per step.",
)
flags.DEFINE_list(
    "residual_parameter_targets",
    None,
    "residual: target fractions of the parameters to share; each hidden layer shares the "
    "square root of the target of its neurons (default: 0.25,0.5,0.75,1.0 for resnet20_split, "
    "1.0 for resnet20_three).",
)
flags.DEFINE_integer(
    "residual_budget_steps",
    None,
    "residual: allocate the shared counts with ShareBudget(parameters=target) and this many "
    "bisection steps instead of √target of every layer (results get a _budget suffix).",
)
flags.DEFINE_enum(
    "residual_hessian",
    "channel",
    ["channel", "patch"],
    "residual: conv Hessian.",
)

VARIANTS = (
    ("(a) random pairing + average", dict(pairing="random", tie="average", repair="none")),
    ("(b) weight distance + average", dict(pairing="euclidean", tie="average", repair="none")),
    ("(c) MTZ greedy", dict(pairing="hessian", tie="hessian", matching="greedy", repair="none")),
    ("(d) MTZ optimal", dict(pairing="hessian", tie="hessian", matching="optimal", repair="none")),
)
CONV_VARIANTS = (
    ("(c') MTZ greedy, patch Hessian", dict(matching="greedy", hessian="patch", repair="none")),
    ("(d') MTZ optimal, patch Hessian", dict(matching="optimal", hessian="patch", repair="none")),
)
"""For conv nets, MTZ with the exact im2col Hessian next to the default channel mode."""


def _retrain_optimizer():
    """--retrain_learning_rate's Adam, or None for the library's default optimizer."""
    if FLAGS.retrain_learning_rate is None:
        return None
    return keras.optimizers.Adam(FLAGS.retrain_learning_rate)


def same_task_experiment(build, name: str, variants=VARIANTS) -> dict:
    """Runs the same-task zipping table for one architecture; returns the JSON record."""
    splits = data.load_task("fashion_mnist", data_dir=FLAGS.data_dir)
    tasks = ("model_a", "model_b")
    originals, scratch_iterations = {}, []
    for seed, task in enumerate(tasks, start=1):
        model, iterations = rx.cached_classifier(
            os.path.join(FLAGS.model_dir, f"{name}_seed{seed}.keras"),
            build,
            splits,
            FLAGS.max_epochs,
            FLAGS.patience,
            seed,
            batch_size=128,
        )
        scratch_iterations.append(iterations)
        originals[task] = models.permute_hidden(model, seed=100 + seed)
    x, y = splits["train"]
    calibration = {
        t: data.to_dataset(
            data.calibration_subset(x, FLAGS.calibration_size, seed=i), batch_size=500
        )
        for i, t in enumerate(tasks)
    }
    split_sets = {
        split: {t: data.to_dataset(*splits[split], batch_size=1000) for t in tasks}
        for split in ("validation", "test")
    }
    hidden_layers = len(mtz_tf.graph.read_plan(originals[tasks[0]]).hidden_units)
    budget = int(FLAGS.budget_fraction * min(scratch_iterations))
    steps_per_layer = budget // hidden_layers

    def retrain():
        return mtz_tf.Retrain(
            {
                t: data.training_stream(x, y, FLAGS.retrain_batch_size, seed=10 + i)
                for i, t in enumerate(tasks)
            },
            steps_per_layer=steps_per_layer,
            optimizer=_retrain_optimizer(),
            verbose=0,
        )

    rows = []
    for label, options in variants:
        for retrained in (False, True):
            began = time.time()
            zipped, report = mtz_tf.zip_models(
                originals,
                calibration,
                share=1.0,
                retrain=retrain() if retrained else None,
                evaluation=split_sets["validation"],
                seed=0,
                verbose=1,
                **options,
            )
            test = mtz_tf.retrain.task_accuracies(zipped, split_sets["test"])
            rows.append(
                {
                    "variant": label,
                    "retrained": retrained,
                    "options": options,
                    "validation_error": {
                        t: 1 - a
                        for t, a in (
                            report.layers[-1].accuracy_after_retraining
                            or report.layers[-1].accuracy_before_retraining
                        ).items()
                    },
                    "test_error": {t: 1 - a for t, a in test.items()},
                    "merge_cost": [layer.merge_cost for layer in report.layers],
                    "retrain_iterations": report.retrain_steps,
                    "parameters": report.parameters,
                    "seconds": time.time() - began,
                }
            )
            cli.logger.info(
                "%s retrained=%s: test error %s", label, retrained, rows[-1]["test_error"]
            )
    original_test = {t: 1 - training.accuracy(originals[t], *splits["test"]) for t in tasks}
    return {
        "experiment": name,
        "command": "python experiments/reproduce.py " + " ".join(sys.argv[1:]),
        "scratch_iterations": scratch_iterations,
        "retrain_budget": budget,
        "steps_per_layer": steps_per_layer,
        "original_test_error": original_test,
        "rows": rows,
    }


def zip_merge_experiment() -> str:
    """Zipping combined with Neuron Merging on the lenet300 experiment's two models.

    The two converged, permuted LeNet-300-100 (cached by --experiment=lenet300) are fully
    zipped (MTZ optimal, light retraining with the lenet300 budget), the zipped model is
    rebuilt as an ordinary multi-head model, and Neuron Merging (l1-norm, threshold 0.45,
    no fine-tuning) shrinks its shared hidden layers; next to it, Neuron Merging of each
    separate model at the same ratios. Returns the Markdown table.
    """
    from mtz_tf.compress import merge_neurons

    splits = data.load_task("fashion_mnist", data_dir=FLAGS.data_dir)
    tasks = ("model_a", "model_b")
    originals, iterations = {}, []
    for seed, task in enumerate(tasks, start=1):
        path = os.path.join(FLAGS.model_dir, f"lenet300_seed{seed}.keras")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: run --experiment=lenet300 first.")
        originals[task] = models.permute_hidden(io_utils.load_model(path), seed=100 + seed)
        iterations.append(io_utils.read_json(path[: -len(".keras")] + ".json")["iterations"])
    x, y = splits["train"]
    calibration = {
        t: data.to_dataset(
            data.calibration_subset(x, FLAGS.calibration_size, seed=i), batch_size=500
        )
        for i, t in enumerate(tasks)
    }
    steps = int(FLAGS.budget_fraction * min(iterations)) // 2
    retrain = mtz_tf.Retrain(
        {
            t: data.training_stream(x, y, FLAGS.retrain_batch_size, seed=10 + i)
            for i, t in enumerate(tasks)
        },
        steps_per_layer=steps,
        optimizer=_retrain_optimizer(),
        verbose=0,
    )
    zipped, _ = mtz_tf.zip_models(
        originals, calibration, matching="optimal", repair="none", retrain=retrain, verbose=0
    )
    trunk = mtz_tf.zipped_network.multi_head_model(zipped)
    x_test, y_test = splits["test"]

    def accuracies(model_by_task):
        return {t: training.accuracy(m, x_test, y_test) for t, m in model_by_task.items()}

    rows = []
    for ratio in (0.0, 0.3, 0.5, 0.7):
        for merge in (False, True):
            if ratio == 0.0 and merge:
                continue
            small = merge_neurons(trunk, ratio, merge=merge)[0] if ratio else trunk
            outputs = small.predict(x_test, batch_size=1000, verbose=0)
            zipped_acc = {t: float((outputs[t].argmax(-1) == y_test).mean()) for t in tasks}
            separate = {
                t: merge_neurons(m, ratio, merge=merge)[0] if ratio else m
                for t, m in originals.items()
            }
            rows.append(
                (
                    ratio,
                    merge,
                    small.count_params(),
                    zipped_acc,
                    sum(m.count_params() for m in separate.values()),
                    accuracies(separate),
                )
            )
    lines = [
        "# Zipping + Neuron Merging: two LeNet-300-100 on Fashion-MNIST",
        "",
        "Regenerate with:",
        "",
        "```",
        "python experiments/reproduce.py --experiment=lenet300  # trains and caches the models",
        "python experiments/reproduce.py --experiment=zip_merge",
        "```",
        "",
        "The lenet300 experiment's two models, fully zipped (MTZ optimal, "
        f"{2 * steps} joint retraining iterations), then Neuron Merging (l1-norm, threshold "
        "0.45, no fine-tuning) of the zipped model's shared hidden layers at each ratio; "
        "beside it, the same Neuron Merging applied to each separate model. Test accuracy "
        "(%) per task; parameters in total for both tasks.",
        "",
        "| ratio | method | zipped: parameters | zipped: acc a / b | separate: parameters "
        "| separate: acc a / b |",
        "|---|---|---|---|---|---|",
    ]
    for ratio, merge, params, acc, sep_params, sep_acc in rows:
        method = "none" if ratio == 0 else ("merge" if merge else "prune")
        lines.append(
            f"| {ratio:.1f} | {method} | {params:,} | {100 * acc['model_a']:.2f} / "
            f"{100 * acc['model_b']:.2f} | {sep_params:,} | {100 * sep_acc['model_a']:.2f} / "
            f"{100 * sep_acc['model_b']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def markdown(record: dict, title: str) -> str:
    tasks = list(record["original_test_error"])
    orig = record["original_test_error"]
    lines = [
        f"# {title}",
        "",
        "Regenerate with:",
        "",
        "```",
        record["command"],
        "```",
        "",
        "Test error (%) per task; Δ is the increase over that task's original model. "
        "Parameters are the zipped model's, against the two input models together.",
        "",
        f"Original models: {', '.join(f'{t} {100 * orig[t]:.2f} %' for t in tasks)}; "
        f"training from scratch took {record['scratch_iterations']} iterations (to the "
        f"best validation epoch); retraining budget {record['retrain_budget']} iterations "
        f"({record['steps_per_layer']} per layer, "
        f"1/{round(min(record['scratch_iterations']) / max(record['retrain_budget'], 1))} "
        "of from-scratch).",
        "",
        "| method | retraining | "
        + " | ".join(f"{t} error (Δ)" for t in tasks)
        + " | merge cost (per layer) | parameters | iterations |",
        "|---|---|" + "---|" * len(tasks) + "---|---|---|",
    ]
    for row in record["rows"]:
        errors = " | ".join(
            f"{100 * row['test_error'][t]:.2f} ({100 * (row['test_error'][t] - orig[t]):+.2f})"
            for t in tasks
        )
        p = row["parameters"]
        lines.append(
            f"| {row['variant']} | {'yes' if row['retrained'] else 'no'} | {errors} | "
            f"{', '.join(f'{c:.3g}' for c in row['merge_cost'])} | "
            f"{p['total']:,} / {p['input_models']:,} ({100 * p['ratio']:.1f} %) | "
            f"{row['retrain_iterations']} |"
        )
    return "\n".join(lines) + "\n"


def residual_experiment() -> None:
    """resnet20_split (two label halves, width x2, five shared fractions), resnet20_three
    (three label groups, width x1, full sharing) or mobilenet_v2_split (two label halves,
    MobileNetV2 alpha 0.35 at 32×32×3, exported and measured); writes JSON, Markdown, PNG."""
    split = FLAGS.experiment != "resnet20_three"
    mobile = FLAGS.experiment == "mobilenet_v2_split"
    groups = rx.SPLIT_GROUPS if split else rx.THREE_GROUPS
    default_targets = (0.25, 0.5, 1.0) if mobile else (0.25, 0.5, 0.75, 1.0) if split else (1.0,)
    record = rx.different_task_experiment(
        groups,
        width=0.35 if mobile else 2.0 if split else 1.0,
        architecture="mobilenet_v2" if mobile else "resnet20",
        deploy_dir=os.path.join(FLAGS.model_dir, "mobilenet_v2_deploy") if mobile else None,
        parameter_targets=[float(f) for f in FLAGS.residual_parameter_targets]
        if FLAGS.residual_parameter_targets
        else default_targets,
        model_dir=FLAGS.model_dir,
        data_dir=FLAGS.data_dir,
        train_size=FLAGS.residual_train_size,
        max_epochs=FLAGS.residual_max_epochs,
        calibration_size=FLAGS.residual_calibration_size,
        retrain_steps=FLAGS.residual_retrain_steps,
        retrain_every=FLAGS.residual_retrain_every,
        retrain_batch_size=FLAGS.residual_batch_size,
        # Its models are trained with Adam at 1e-3, so the default is the library's 1e-4.
        learning_rate=FLAGS.retrain_learning_rate or mtz_tf.retrain.DEFAULT_LEARNING_RATE,
        hessian=FLAGS.residual_hessian,
        budget_steps=FLAGS.residual_budget_steps,
    )
    command = "python experiments/reproduce.py " + " ".join(sys.argv[1:])
    record["command"] = command
    suffix = "_budget" if FLAGS.residual_budget_steps is not None else ""
    stem = os.path.join(FLAGS.results_dir, f"{FLAGS.experiment}{suffix}_fashion_mnist")
    title = (
        "MTZ different tasks: two MobileNetV2 (alpha 0.35) on the two halves of Fashion-MNIST's "
        "labels, exported to TFLite"
        if mobile
        else "MTZ different tasks: two ResNet-20 on the two halves of Fashion-MNIST's labels"
        if split
        else "MTZ different tasks: three ResNet-20 on three label groups, zipped into one"
    )
    text = rx.markdown(record, title, command)
    io_utils.write_json(stem + ".json", record)
    io_utils.write_text(stem + ".md", text)
    rx.plot(record, stem + ".png")
    print(text)


def main(argv):
    del argv
    if FLAGS.experiment.startswith(("resnet20", "mobilenet_v2")):
        distribution.check_exportable(f"--experiment={FLAGS.experiment} (its deployment rows)")
        residual_experiment()
        return
    if FLAGS.experiment == "zip_merge":
        text = zip_merge_experiment()
        io_utils.write_text(os.path.join(FLAGS.results_dir, "zip_then_merge_lenet300.md"), text)
        print(text)
        return
    if FLAGS.experiment == "lenet300":
        record = same_task_experiment(lambda seed: models.lenet_300_100(seed=seed), "lenet300")
        stem = os.path.join(FLAGS.results_dir, "lenet300_fashion_mnist")
        title = "MTZ same-task: two LeNet-300-100 on Fashion-MNIST, both hidden layers zipped"
    else:
        record = same_task_experiment(
            lambda seed: models.lenet5(seed=seed), "lenet5", VARIANTS + CONV_VARIANTS
        )
        stem = os.path.join(FLAGS.results_dir, "lenet5_fashion_mnist")
        title = (
            "MTZ same-task: two LeNet-5 on Fashion-MNIST, all hidden layers (conv1, conv2, fc1) "
            "zipped; conv Hessian in channel mode (reference) and patch mode (exact)"
        )
    io_utils.write_json(stem + ".json", record)
    io_utils.write_text(stem + ".md", markdown(record, title))
    print(markdown(record, title))


if __name__ == "__main__":
    cli.run(main)

"""Writes the Neuron Merging result tables (Markdown + JSON) under --output_dir.

--experiment=lenet300: the published LeNet-300-100 Fashion-MNIST table (Kim et al., NeurIPS
2020) from the authors' pretrained weights (PyTorch layout .npz): criteria l1-norm, l2-norm,
l2-GM x ratios 0.5-0.8 x prune/merge, threshold 0.45, no fine-tuning, with the published
l1-norm cells beside ours.

--experiment=conv: LeNet-5 and VGG-16 with BatchNorm (width --vgg_width) trained here on
Fashion-MNIST (5,000 training images held out for validation; cached in --model_dir), then
pruned vs merged at several ratios without fine-tuning. The merge threshold is chosen per ratio
on the validation split; the test set is only reported.
"""

from __future__ import annotations

import quiet_startup  # noqa: F401 (first: quiets TensorFlow's native log)

import json
import os
import sys
import time

import keras
from absl import flags

from mtz_tf import cli, data, io_utils, models, torch_weights, training
from mtz_tf.compress import neuron_merging

FLAGS = flags.FLAGS
flags.DEFINE_enum("experiment", "lenet300", ["lenet300", "conv"], "Which table to write.")
flags.DEFINE_string("output_dir", "results", "Directory for the .md and .json tables.")
flags.DEFINE_string(
    "torch_npz",
    "../shared/data/lenet300100_fashion_mnist_torch.npz",
    "lenet300: the authors' LeNet-300-100 weights in PyTorch layout.",
)
flags.DEFINE_string("data_dir", None, "Directory of Fashion-MNIST IDX files (default: Debian's).")
flags.DEFINE_string("model_dir", "artifacts/neuron_merging", "conv: where trained models live.")
flags.DEFINE_boolean("retrain", False, "conv: train again even if a cached model exists.")
flags.DEFINE_integer("lenet5_epochs", 4, "conv: LeNet-5 training epochs.")
flags.DEFINE_integer("vgg_epochs", 4, "conv: VGG-16 training epochs.")
flags.DEFINE_float("vgg_width", 0.25, "conv: VGG-16 width multiplier.")
flags.DEFINE_integer("seed", 0, "Seed for the validation split, initialisation and training.")
flags.DEFINE_list(
    "thresholds",
    ["0", "0.1", "0.3", "0.45"],
    "conv: merge thresholds (cosine similarity) tried on the validation split.",
)

PUBLISHED_L1 = {0.5: (88.40, 88.69), 0.6: (85.17, 86.92), 0.7: (71.26, 82.75), 0.8: (66.76, 80.02)}
"""Published LeNet-300-100 Fashion-MNIST l1-norm cells, (prune, merge) in %, baseline 89.80."""

LENET300_RATIOS = (0.5, 0.6, 0.7, 0.8)
LENET300_CRITERIA = ("l1-norm", "l2-norm", "l2-GM")


def _command() -> str:
    return "python " + " ".join(sys.argv)


def _write(stem: str, markdown: str, payload: dict) -> None:
    for suffix, text in ((".md", markdown), (".json", json.dumps(payload, indent=2) + "\n")):
        path = os.path.join(FLAGS.output_dir, stem + suffix)
        io_utils.write_text(path, text)
        cli.logger.info("Wrote %s", path)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def run_lenet300() -> None:
    model = torch_weights.lenet_300_100_from_torch_npz(FLAGS.torch_npz)
    images, labels = data.load("fashion_mnist", split="test", data_dir=FLAGS.data_dir)
    x = data.normalize(images, "symmetric")
    baseline = training.accuracy(model, x, labels)
    rows = []
    for criterion in LENET300_CRITERIA:
        for ratio in LENET300_RATIOS:
            row = {"criterion": criterion, "ratio": ratio}
            for mode in ("prune", "merge"):
                compressed, report = neuron_merging.compress(
                    model,
                    ratio,
                    criterion=criterion,
                    merge=mode == "merge",
                    threshold=0.45,
                )
                row[mode] = training.accuracy(compressed, x, labels)
                row["params"] = int(compressed.count_params())
                if mode == "merge":
                    row["merged"] = {r.name: r.merged for r in report.layers}
                    row["kept"] = {r.name: r.kept for r in report.layers}
            cli.logger.info(
                "%s %.1f: prune %.4f merge %.4f", criterion, ratio, row["prune"], row["merge"]
            )
            rows.append(row)
    lines = [
        "# Neuron Merging: LeNet-300-100 on Fashion-MNIST (published table reproduced)",
        "",
        "The authors' pretrained LeNet-300-100 (`lenet300100_fashion_mnist_torch.npz`, PyTorch",
        "layout, inputs (x/255 - 0.5)/0.5), both hidden layers pruned at the ratio, no",
        "fine-tuning, merge threshold 0.45, Fashion-MNIST test set (10,000 images).",
        f"Baseline: {_pct(baseline)} % ({int(model.count_params()):,} parameters; "
        "published 89.80 %).",
        "",
        "Regenerate (from the repository root):",
        "",
        "```",
        _command(),
        "```",
        "",
        "| criterion | pruned | kept (fc1, fc2) | parameters | prune only % | merged % |"
        " published prune % | published merged % | Δ prune / Δ merged (pp) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        published = PUBLISHED_L1.get(row["ratio"]) if row["criterion"] == "l1-norm" else None
        kept = ", ".join(str(v) for v in row["kept"].values())
        cells = [
            row["criterion"],
            f"{int(round(100 * row['ratio']))} %",
            kept,
            f"{row['params']:,}",
            _pct(row["prune"]),
            _pct(row["merge"]),
        ]
        if published:
            # round(...) + 0.0 turns a -0.00 into 0.00.
            dp = round(100 * row["prune"] - published[0], 2) + 0.0
            dm = round(100 * row["merge"] - published[1], 2) + 0.0
            cells += [f"{published[0]:.2f}", f"{published[1]:.2f}", f"{dp:+.2f} / {dm:+.2f}"]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Published numbers exist for l1-norm only (Kim et al., NeurIPS 2020, Fashion-MNIST",
        "table); they must match to ±0.05 pp. Merged neurons per layer are in the JSON file.",
        "",
    ]
    payload = {
        "command": _command(),
        "baseline": baseline,
        "params_baseline": int(model.count_params()),
        "published_l1": {str(k): v for k, v in PUBLISHED_L1.items()},
        "threshold": 0.45,
        "rows": rows,
    }
    _write("neuron_merging_lenet300", "\n".join(lines), payload)


# --------------------------------------------------------------------------------------------


def _train_or_load(name, build, epochs, train, val):
    path = os.path.join(FLAGS.model_dir, f"{name}.keras")
    if os.path.exists(path) and not FLAGS.retrain:
        cli.logger.info("Loading cached %s", path)
        return keras.models.load_model(path), None
    model = build()
    start = time.time()
    training.train_classifier(
        model, *train, epochs=epochs, validation=val, seed=FLAGS.seed, verbose=2
    )
    seconds = time.time() - start
    io_utils.save_model(model, path)
    return model, seconds


def _settings(name: str) -> list[tuple[str, float | dict[str, float]]]:
    """The pruning settings of one model: (label, ratio for compress)."""
    if name == "lenet5":
        uniform = [(f"all layers {r:.0%}", r) for r in (0.2, 0.4, 0.6)]
        return uniform + [(f"fc1 {r:.0%}", {"fc1": r}) for r in (0.5, 0.7, 0.9)]
    late = ("conv11", "conv12", "conv13", "fc1")  # The parameter-heavy end of VGG-16.
    uniform = [(f"all layers {r:.0%}", r) for r in (0.05, 0.1, 0.2)]
    return uniform + [
        (f"conv11-13, fc1 {r:.0%}", dict.fromkeys(late, r)) for r in (0.25, 0.5, 0.75)
    ]


def _sweep(model, val, test, settings, thresholds, criterion="l1-norm"):
    """Prune vs merge (reference and exact scale) per setting; threshold chosen on validation."""
    rows = []
    for label, ratio in settings:
        pruned, _ = neuron_merging.compress(model, ratio, criterion=criterion, merge=False)
        row = {
            "setting": label,
            "criterion": criterion,
            "ratio": ratio,
            "params": int(pruned.count_params()),
            "prune_val": training.accuracy(pruned, *val),
            "prune_test": training.accuracy(pruned, *test),
        }
        for scale in neuron_merging.SCALES:
            best = None
            row[f"merge_{scale}_val_by_threshold"] = {}
            for threshold in thresholds:
                merged, report = neuron_merging.compress(
                    model,
                    ratio,
                    criterion=criterion,
                    threshold=threshold,
                    scale=scale,
                )
                val_acc = training.accuracy(merged, *val)
                row[f"merge_{scale}_val_by_threshold"][str(threshold)] = val_acc
                if best is None or val_acc > best[0]:
                    best = (val_acc, threshold, merged, report)
            val_acc, threshold, merged, report = best
            row[f"merge_{scale}_val"] = val_acc
            row[f"merge_{scale}_threshold"] = threshold
            row[f"merge_{scale}_test"] = training.accuracy(merged, *test)
            row[f"merge_{scale}_merged"] = {r.name: [r.kept, r.merged] for r in report.layers}
        cli.logger.info("%s: %s", label, row)
        rows.append(row)
    return rows


def run_conv() -> None:
    images, labels = data.load("fashion_mnist", split="train", data_dir=FLAGS.data_dir)
    x_all = data.normalize(images, "symmetric")
    train, val = data.train_validation_split(x_all, labels, 5000, seed=FLAGS.seed)
    test_images, test_labels = data.load("fashion_mnist", split="test", data_dir=FLAGS.data_dir)
    test = (data.normalize(test_images, "symmetric"), test_labels)
    thresholds = [float(t) for t in FLAGS.thresholds]
    specs = [
        ("lenet5", lambda: models.lenet5(seed=FLAGS.seed), FLAGS.lenet5_epochs),
        (
            "vgg16",
            lambda: models.vgg16(
                input_shape=(28, 28, 1), width_multiplier=FLAGS.vgg_width, seed=FLAGS.seed
            ),
            FLAGS.vgg_epochs,
        ),
    ]
    results = {}
    for name, build, epochs in specs:
        model, seconds = _train_or_load(name, build, epochs, train, val)
        entry = {
            "epochs": epochs,
            "train_seconds": seconds,
            "params": int(model.count_params()),
            "prunable": neuron_merging.prunable_layers(model),
            "val": training.accuracy(model, *val),
            "test": training.accuracy(model, *test),
        }
        entry["rows"] = _sweep(model, val, test, _settings(name), thresholds)
        if name == "vgg16":  # The paper's VGG-16 table compares the criteria too.
            late = [row for row in _settings(name) if row[0].startswith("conv11")][:2]
            for criterion in ("l2-norm", "l2-GM"):
                entry["rows"] += _sweep(model, val, test, late, thresholds, criterion)
        results[name] = entry
    lines = [
        "# Neuron Merging on our own Fashion-MNIST models (no fine-tuning)",
        "",
        f"LeNet-5 (Caffe variant) and CIFAR-style VGG-16 with BatchNorm at width "
        f"{FLAGS.vgg_width} (16-128 channels), trained here with Adam (lr 1e-3, batch 128, "
        f"no weight decay; LeNet-5 {FLAGS.lenet5_epochs} epochs, VGG-16 {FLAGS.vgg_epochs} "
        "epochs) on 55,000 Fashion-MNIST training images, inputs (x/255 - 0.5)/0.5. The "
        "other 5,000 training images are the validation split: the merge threshold of each "
        f"cell is chosen there from {thresholds} (0 merges every pruned neuron; λ = 0.85 for "
        "BatchNorm layers). Test accuracy (10,000 images) is only reported. Neurons are "
        "chosen by l1-norm unless the criterion column says otherwise; `all layers` prunes "
        "every prunable layer (LeNet-5: conv1, conv2, "
        "fc1; VGG-16: conv1-13 and fc1; output layers never). `merge (reference)` uses the "
        "reference code's BatchNorm scale, `merge (exact)` the exact slope "
        "s·(γ_i/γ_j)·(σ_j/σ_i); they coincide for LeNet-5, which has no BatchNorm.",
        "",
        "Regenerate (from the repository root; trains the models once, then reuses them from "
        f"`{FLAGS.model_dir}`):",
        "",
        "```",
        _command(),
        "```",
        "",
    ]
    for name, entry in results.items():
        lines += [
            f"## {name}: baseline {_pct(entry['test'])} % test ({_pct(entry['val'])} % "
            f"validation), {entry['params']:,} parameters",
            "",
            "| pruned | criterion | parameters | % of baseline | prune only % | "
            "merge (reference) % "
            "[t] | merge (exact) % [t] |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in entry["rows"]:
            lines.append(
                f"| {row['setting']} | {row['criterion']} | {row['params']:,} | "
                f"{100 * row['params'] / entry['params']:.1f} | {_pct(row['prune_test'])} | "
                f"{_pct(row['merge_reference_test'])} [{row['merge_reference_threshold']}] | "
                f"{_pct(row['merge_exact_test'])} [{row['merge_exact_threshold']}] |"
            )
        lines.append("")
    lines += [
        "Test accuracy in %; [t] the merge threshold chosen on the validation split. "
        "Validation accuracies for every threshold and the merged-neuron counts per layer are "
        "in the JSON file.",
        "",
    ]
    payload = {"command": _command(), "thresholds": thresholds, "models": results}
    _write("neuron_merging_conv", "\n".join(lines), payload)


def main(argv):
    del argv
    cli.logger.info(
        "Configuration: %s",
        json.dumps({f.name: f.value for f in FLAGS.get_flags_for_module(sys.modules[__name__])}),
    )
    keras.utils.set_random_seed(FLAGS.seed)
    if FLAGS.experiment == "lenet300":
        run_lenet300()
    else:
        run_conv()


if __name__ == "__main__":
    cli.run(main)

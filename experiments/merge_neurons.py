"""Prunes (and merges) the neurons of one classifier, data-free, and reports accuracy and size.

Neuron Merging (Kim et al., NeurIPS 2020): every prunable hidden Dense/Conv2D layer loses
``--prune_fraction`` of its neurons by ``--criterion``; with ``--mode=merge`` each pruned neuron is
folded into its most similar kept neuron, so no fine-tuning is needed. The model comes from a
``.keras`` file or, as published by the paper, a LeNet-300-100 in PyTorch layout (``.npz``).

Examples:

  python experiments/merge_neurons.py \\
      --torch_npz=../shared/data/lenet300100_fashion_mnist_torch.npz \\
      --criterion=l1-norm --prune_fraction=0.7 --mode=merge --threshold=0.45

  python experiments/merge_neurons.py --model=artifacts/neuron_merging/vgg16.keras \\
      --prune_fraction=0.5 --threshold=0.1 --lamda=0.85 --output=/tmp/vgg16_merged.keras
"""

from __future__ import annotations

import quiet_startup  # noqa: F401 (first: quiets TensorFlow's native log)

import json
import sys

import keras
from absl import app, flags

from mtz_tf import cli, data, io_utils, torch_weights, training
from mtz_tf.compress import criteria, neuron_merging

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Input model, a .keras file (logits output).")
flags.DEFINE_string(
    "torch_npz",
    None,
    "Input LeNet-300-100 in PyTorch layout (.npz with ip{1,2,3}_weight/bias), instead of --model.",
)
flags.DEFINE_enum("criterion", "l1-norm", list(criteria.CRITERIA), "Which neurons to keep.")
flags.DEFINE_float(
    "prune_fraction", 0.5, "Fraction of neurons removed from every prunable layer, in [0, 1)."
)
flags.DEFINE_list(
    "layer_prune_fractions",
    None,
    "Per-layer fractions NAME=FRACTION,... instead of --prune_fraction (other layers are left "
    "alone).",
)
flags.DEFINE_float(
    "threshold",
    None,
    "Least cosine similarity to merge a pruned neuron (unitless, in [-1, 1]). Default: the "
    "reference scripts' 0.45 for layers without BatchNorm, 0.1 for layers with BatchNorm.",
)
flags.DEFINE_float(
    "lamda", neuron_merging.DEFAULT_LAMDA, "BatchNorm variant: weight of the cosine distance."
)
flags.DEFINE_enum("mode", "merge", ["prune", "merge"], "prune: only prune; merge: compensate.")
flags.DEFINE_enum(
    "scale",
    "reference",
    list(neuron_merging.SCALES),
    "BatchNorm slope: the reference code's formula or the exact one.",
)
flags.DEFINE_enum("dataset", "fashion_mnist", ["fashion_mnist", "mnist"], "Test set.")
flags.DEFINE_string("data_dir", None, "Directory of MNIST-format IDX files (default: Debian's).")
flags.DEFINE_enum(
    "normalization",
    "symmetric",
    ["symmetric", "unit"],
    "Input scaling the model was trained with: (x/255-0.5)/0.5 or x/255.",
)
flags.register_validator(
    "prune_fraction", lambda r: 0.0 <= r < 1.0, "--prune_fraction must be in [0, 1)."
)
flags.register_validator("lamda", lambda v: 0.0 <= v <= 1.0, "--lamda must be in [0, 1].")
flags.DEFINE_string("output", None, "Where to save the compressed model (.keras).")
flags.DEFINE_string("results_json", None, "Where to write the configuration and results.")


def _load_model() -> keras.Model:
    if bool(FLAGS.model) == bool(FLAGS.torch_npz):
        raise app.UsageError("Pass exactly one of --model and --torch_npz.")
    if FLAGS.torch_npz:
        return torch_weights.lenet_300_100_from_torch_npz(FLAGS.torch_npz)
    return keras.models.load_model(FLAGS.model)


def _prune_fraction():
    if not FLAGS.layer_prune_fractions:
        return FLAGS.prune_fraction
    fractions = {}
    for item in FLAGS.layer_prune_fractions:
        name, sep, value = item.partition("=")
        if not sep:
            raise app.UsageError(
                f"--layer_prune_fractions entries must be NAME=FRACTION. Received: {item!r}"
            )
        fractions[name] = float(value)
    return fractions


def main(argv):
    del argv
    config = {f.name: f.value for f in FLAGS.get_flags_for_module(sys.modules[__name__])}
    cli.logger.info("Configuration: %s", json.dumps(config, sort_keys=True))
    model = _load_model()
    images, labels = data.load(FLAGS.dataset, split="test", data_dir=FLAGS.data_dir)
    x = data.normalize(images, FLAGS.normalization)
    before = training.accuracy(model, x, labels)
    compressed, report = neuron_merging.compress(
        model,
        _prune_fraction(),
        criterion=FLAGS.criterion,
        merge=FLAGS.mode == "merge",
        threshold=FLAGS.threshold,
        lamda=FLAGS.lamda,
        scale=FLAGS.scale,
    )
    after = training.accuracy(compressed, x, labels)
    for r in report.layers:
        cli.logger.info(
            "%s: %d -> %d neurons (%d merged, %d only pruned)",
            r.name,
            r.units,
            r.kept,
            r.merged,
            r.units - r.kept - r.merged,
        )
    result = {
        "config": config,
        "accuracy_before": before,
        "accuracy_after": after,
        "params_before": int(model.count_params()),
        "params_after": int(compressed.count_params()),
        "layers": [r.__dict__ for r in report.layers],
    }
    print(
        f"test accuracy {100 * before:.2f}% -> {100 * after:.2f}%; parameters "
        f"{result['params_before']:,} -> {result['params_after']:,} "
        f"({100 * result['params_after'] / result['params_before']:.1f}%)"
    )
    if FLAGS.output:
        io_utils.save_model(compressed, FLAGS.output)
        cli.logger.info("Saved %s", FLAGS.output)
    if FLAGS.results_json:
        io_utils.write_json(FLAGS.results_json, result)


if __name__ == "__main__":
    cli.run(main)

"""Deployment benchmark: a fully zipped pair against the two separate models.

Trains two models briefly on Fashion-MNIST (LeNet-300-100, or LeNet-5 with --model=lenet5),
zips them fully (share=1.0, no retraining: sizes and speed do not depend on it), exports
the zipped model and both separate models the same way (.keras, SavedModel, TFLite), and
measures file sizes and batch-1 latency in one run (mtz_tf.deploy_report). Prints the
Markdown table and writes it, with the command that regenerates it and the issue's
targets, to results/export_<model>.md.

Example:
    python benchmarks/bench_export.py --model=lenet300
"""

import os
import sys

from absl import app, flags, logging

import mtz_tf
from mtz_tf import data, deploy_report, io_utils, models, training

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "lenet300", ["lenet300", "lenet5"], "Architecture of both models.")
flags.DEFINE_integer("epochs", 1, "Training epochs of each model.")
flags.DEFINE_integer("train_size", 12000, "Training samples per model (samples).")
flags.DEFINE_integer("calibration_size", 1000, "Calibration samples for the Hessians.")
flags.DEFINE_enum(
    "quantize", "none", ["none", "dynamic", "int8"], "TFLite quantization of both sides."
)
flags.DEFINE_integer("runs", 500, "Timed calls per side and backend (calls).")
flags.DEFINE_integer("warmup", 50, "Untimed calls per side and backend first (calls).")
flags.DEFINE_integer("tflite_threads", 1, "TFLite interpreter threads.")
flags.DEFINE_string("data_dir", None, "Directory of Fashion-MNIST IDX files.")
flags.DEFINE_string("output_dir", "artifacts/bench_export", "Where the exports go.")
flags.DEFINE_string(
    "results",
    None,
    "Markdown results file. Default: results/export_<model>.md.",
)

# The targets for a fully zipped LeNet-5 pair (ratios zipped / two separate).
TARGET_TFLITE_SIZE = 0.55
TARGET_LATENCY = 0.60
_BUILDERS = {"lenet300": models.lenet_300_100, "lenet5": models.lenet5}
_TITLES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5"}


def _flags() -> list[str]:
    given = sys.argv[1:]
    if not any(f.startswith("--model=") for f in given):
        given = [f"--model={FLAGS.model}"] + given
    return given


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # TF's INFO lines about every SavedModel write.
    x, y = data.load("fashion_mnist", "train", FLAGS.data_dir)
    x_test, y_test = data.load("fashion_mnist", "test", FLAGS.data_dir)
    x, y = data.normalize(x[: FLAGS.train_size]), y[: FLAGS.train_size]
    x_test, y_test = data.normalize(x_test[:1000]), y_test[:1000]
    tasks = ("a", "b")
    separate = {}
    for seed, task in enumerate(tasks, start=1):
        model = _BUILDERS[FLAGS.model](seed=seed, name=f"{FLAGS.model}_{task}")
        training.train_classifier(model, x, y, FLAGS.epochs, seed=seed, verbose=2)
        separate[task] = model
    calibration = data.to_dataset(
        data.calibration_subset(x, FLAGS.calibration_size), batch_size=500
    )
    zipped, _ = mtz_tf.zip_models(separate, {t: calibration for t in tasks}, share=1.0, verbose=1)
    how = "zipped with mtz_tf.zip_models(share=1.0), no retraining"
    quantize = None if FLAGS.quantize == "none" else FLAGS.quantize
    report = deploy_report.size_speed_report(
        zipped,
        separate,
        os.path.join(FLAGS.output_dir, FLAGS.model),
        sample_inputs=(x_test, y_test),
        quantize=quantize,
        representative_data=x[:200] if quantize == "int8" else None,
        overwrite=True,
        runs=FLAGS.runs,
        warmup=FLAGS.warmup,
        tflite_threads=FLAGS.tflite_threads,
    )
    title = f"{_TITLES[FLAGS.model]}: fully zipped pair (share=1.0) against the two models"
    table = report.to_markdown(title=title)
    accuracy = {t: training.accuracy(m, x_test, y_test) for t, m in separate.items()}
    size = report.size_ratio("tflite")
    lines = [
        table,
        f"Issue targets (for LeNet-5): TFLite file ≤ {100 * TARGET_TFLITE_SIZE:.0f} % of the two "
        f"separate files: **{100 * size:.1f} %** "
        f"({'met' if size <= TARGET_TFLITE_SIZE else 'missed'}); all tasks in ≤ "
        f"{100 * TARGET_LATENCY:.0f} % of the time of the two models: "
        + "; ".join(
            f"{backend} **{100 * report.latency_ratio(backend):.1f} %** "
            f"({'met' if report.latency_ratio(backend) <= TARGET_LATENCY else 'missed'})"
            for backend in report.latency_ms
        )
        + ".",
        "",
        f"Models: trained {FLAGS.epochs} epoch(s) on {FLAGS.train_size} Fashion-MNIST images "
        f"(test accuracy on 1000 images: "
        + ", ".join(f"{t} {100 * a:.1f} %" for t, a in accuracy.items())
        + f"); {how} ({zipped.count_params():,} parameters). Sizes and speed do not depend "
        "on the retraining.",
        "",
        "Regenerate with:",
        "",
        "```",
        " ".join([".venv/bin/python benchmarks/bench_export.py"] + _flags()),
        "```",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    results = FLAGS.results or os.path.join("results", f"export_{FLAGS.model}.md")
    io_utils.write_text(results, text)
    print(f"Wrote {results}")


if __name__ == "__main__":
    app.run(main)

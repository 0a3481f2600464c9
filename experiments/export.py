"""Exports a zipped model for deployment (.keras, SavedModel, TFLite), checked for parity.

Without --separate_models the artifacts go straight into --output_dir (with export.json:
sizes and parity figures). With it, the zipped
model goes to <output_dir>/zipped, each separate model to <output_dir>/separate_<name>
(exported the same way), and the size/speed comparison to
<output_dir>/deployment_report.{md,json}; the table is also printed.

Example:
    python experiments/export.py --model=artifacts/demo/zipped.keras \
        --output_dir=artifacts/deploy --formats=keras,saved_model,tflite \
        --separate_models=artifacts/demo/fashion_a.keras,artifacts/demo/fashion_b.keras
"""

import quiet_startup  # noqa: F401 (first: quiets TensorFlow's native log)

import json
import os
import re

from absl import flags

from mtz_tf import cli, data, deploy_report, distribution, io_utils
from mtz_tf import exporter as export_lib

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "model",
    None,
    "The zipped model (.keras): one input and a dict of task outputs (a plain one-output "
    "model works too).",
    required=True,
)
flags.DEFINE_string(
    "output_dir",
    None,
    "Directory to write (atomically: a temporary directory beside it is renamed into place).",
    required=True,
)
flags.DEFINE_list(
    "formats", list(export_lib.FORMATS), f"Comma-separated subset of {export_lib.FORMATS}."
)
flags.DEFINE_enum(
    "quantize",
    "none",
    ["none", "dynamic", "int8"],
    "TFLite quantization: none (float32), dynamic (int8 weights) or int8 (int8 weights and "
    "activations, float32 input/output; calibrated on --representative_size training images).",
)
flags.DEFINE_bool("overwrite", False, "Replace --output_dir if it exists and is not empty.")
flags.DEFINE_bool("per_task_tflite", False, "Also write model_<task>.tflite for every task.")
flags.DEFINE_list(
    "separate_models",
    [],
    "Comma-separated .keras models the zipped one replaces, for the size/speed comparison; "
    "each is named after its file name (its directory's name if file names repeat).",
)
flags.DEFINE_enum(
    "dataset",
    "fashion_mnist",
    ["fashion_mnist", "mnist", "none"],
    "Sample inputs for the parity check and the latency: the test split (its labels are "
    "used for every task's accuracy when --quantize is set), or none for seeded random inputs.",
)
flags.DEFINE_string("data_dir", None, "Directory of MNIST-format IDX files.")
flags.DEFINE_integer(
    "parity_size", 1000, "Test samples for the parity check (and quantized accuracy)."
)
flags.DEFINE_integer(
    "representative_size", 200, "Training samples that calibrate --quantize=int8 (samples)."
)
flags.DEFINE_integer("runs", 500, "Timed calls per model and backend for the latency (calls).")
flags.DEFINE_integer("warmup", 50, "Untimed calls before timing (calls).")


def _names(paths: list[str]) -> list[str]:
    """Identifiers from file names (else directory names, else with an index) to be unique."""

    def ident(text: str) -> str:
        text = re.sub(r"\W", "_", text)
        return text if text.isidentifier() else f"m_{text}"

    stems = [ident(os.path.splitext(os.path.basename(p))[0]) for p in paths]
    if len(set(stems)) < len(stems):
        stems = [
            ident(os.path.basename(os.path.dirname(os.path.abspath(p)))) + "_" + s
            for p, s in zip(paths, stems)
        ]
    if len(set(stems)) < len(stems):
        stems = [f"{s}_{i}" for i, s in enumerate(stems)]
    return stems


def main(argv):
    del argv
    import keras  # Imported here so that --help is fast.

    config = cli.own_flags()
    cli.logger.info("Export configuration: %s", config)
    distribution.check_exportable("experiments/export.py")
    zipped = keras.saving.load_model(FLAGS.model, compile=False)
    quantize = None if FLAGS.quantize == "none" else FLAGS.quantize
    sample = representative = None
    if FLAGS.dataset != "none":
        x_test, y_test = data.load(FLAGS.dataset, "test", FLAGS.data_dir)
        sample = (data.normalize(x_test[: FLAGS.parity_size]), y_test[: FLAGS.parity_size])
        if quantize == "int8":
            x_train, _ = data.load(FLAGS.dataset, "train", FLAGS.data_dir)
            representative = data.normalize(
                data.calibration_subset(x_train, FLAGS.representative_size, seed=0)
            )
    options = dict(
        formats=FLAGS.formats,
        quantize=quantize,
        representative_data=representative,
        overwrite=FLAGS.overwrite,
    )
    if not FLAGS.separate_models:
        result = export_lib.export(
            zipped,
            FLAGS.output_dir,
            per_task_tflite=FLAGS.per_task_tflite,
            parity_data=sample,
            **options,
        )
        for name, artifact in result["artifacts"].items():
            cli.logger.info("%s: %s (%d bytes)", name, artifact["path"], artifact["bytes"])
        cli.logger.info("Parity (max abs difference per artifact and task): %s", result["parity"])
        if quantize:
            cli.logger.info("Quantized TFLite: %s", json.dumps(result["quantized"]))
    else:
        paths = FLAGS.separate_models
        separate = {
            name: keras.saving.load_model(p, compile=False) for name, p in zip(_names(paths), paths)
        }
        markdown = deploy_report.deployment_report(
            zipped,
            separate,
            FLAGS.output_dir,
            sample,
            runs=FLAGS.runs,
            warmup=FLAGS.warmup,
            **options,
        )
        print(markdown)
    io_utils.write_json(os.path.join(FLAGS.output_dir, "export_flags.json"), config)


if __name__ == "__main__":
    cli.run(main)

"""Progress through the mtz_tf logger, the binaries' routing, and the zip report's forms."""

import io
import json
import logging

import keras
import numpy as np
import pytest

import mtz_tf
from mtz_tf import cli, data, progress


def _pair():
    models = {}
    for seed, task in enumerate(("a", "b")):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((6,))
        x = keras.layers.Dense(5, activation="relu", name="h1")(inputs)
        x = keras.layers.Dense(4, activation="relu", name="h2")(x)
        models[task] = keras.Model(inputs, keras.layers.Dense(3, name="out")(x))
    x = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
    y = np.arange(64) % 3
    calibration = {t: data.to_dataset(x, batch_size=32) for t in models}
    evaluation = {t: data.to_dataset(x, y, batch_size=32) for t in models}
    return models, calibration, evaluation


def test_a_zip_logs_one_line_per_hidden_layer(progress_lines):
    models, calibration, evaluation = _pair()
    _, report = mtz_tf.zip_models(models, calibration, share=[5, 2], evaluation=evaluation)
    lines = progress_lines.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[zip 1/2] h1: shared 5/5, merge cost ")
    assert lines[1].startswith("[zip 2/2] h2: shared 2/4, merge cost ")
    accuracy = report.layers[1].accuracy_before_retraining["a"]
    assert f"acc zipped a={accuracy:.4f}" in lines[1]


def test_verbose_zero_logs_nothing(progress_lines):
    models, calibration, _ = _pair()
    mtz_tf.zip_models(models, calibration, share=1.0, verbose=0)
    assert progress_lines.getvalue() == ""


def test_show_replaces_its_handler_and_prefixes_warnings(progress_lines):
    stream = io.StringIO()
    handler = progress.show(logging.INFO, stream)
    try:
        logging.getLogger("mtz_tf.zipper").info("one line")
        logging.getLogger("mtz_tf.exporter").warning("careful")
        logging.getLogger("mtz_tf.zipper").debug("hidden")
        shown_handlers = [h for h in progress.logger.handlers if getattr(h, "_mtz_tf_show", 0)]
        assert shown_handlers == [handler]
        assert stream.getvalue() == "one line\nwarning: careful\n"
        assert progress_lines.getvalue() == ""  # the earlier handler is gone
    finally:
        progress.logger.removeHandler(handler)


@pytest.mark.parametrize("verbosity, quiet", [(0, True), (-1, True), (1, False)])
def test_binaries_silence_framework_info_unless_asked(verbosity, quiet, progress_lines):
    from absl import logging as absl_logging

    before = {name: logging.getLogger(name).level for name in cli.NOISY_LOGGERS}
    absl_before = absl_logging.get_verbosity()
    try:
        cli.route_output(verbosity)
        for name in cli.NOISY_LOGGERS:
            assert logging.getLogger(name).isEnabledFor(logging.INFO) is not quiet
        expected = {0: logging.INFO, -1: logging.WARNING, 1: logging.DEBUG}[verbosity]
        assert progress.logger.level == expected
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)
        absl_logging.set_verbosity(absl_before)


def _report():
    report = mtz_tf.ZipReport(tasks=["a", "b"], matching="greedy")
    report.accuracy_original = {"a": 0.9, "b": 0.8}
    for name, width, shared, cost, before, after in (
        ("fc1", 300, 300, 61.78, {"a": 0.85, "b": 0.84}, {"a": 0.86, "b": 0.85}),
        ("fc2", 100, 50, 0.0, {"a": 0.81, "b": 0.80}, None),
    ):
        report.layers.append(
            mtz_tf.LayerReport(
                name=name,
                widths={"a": width, "b": width},
                shared=shared,
                merge_cost=cost,
                accuracy_before_retraining=before,
                accuracy_after_retraining=after,
                retrain_steps=10 if after else 0,
                seconds=1.25,
                repair="refit: fc2" if name == "fc1" else "",
            )
        )
    report.parameters = {"shared": 10, "specific": 5, "total": 15, "input_models": 30}
    report.parameters["ratio"] = 0.5
    return report


def test_report_table_has_a_row_per_layer_with_its_numbers():
    report = _report()
    lines = str(report).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:4] == ["layer", "stream", "shared / width", "merge cost"]
    assert header[4:8] == ["acc zipped a", "acc zipped b", "acc retrained a", "acc retrained b"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:4]]
    assert rows[0][:8] == ["fc1", "", "300 / 300", "61.78", "0.8500", "0.8400", "0.8600", "0.8500"]
    assert rows[0][8:] == ["refit: fc2", "10", "1.2"]
    assert rows[1][8] == ""
    assert rows[1][2:8] == ["50 / 100", "0", "0.8100", "0.8000", "", ""]
    assert "Accuracy of the input models: a 0.9000, b 0.8000." in lines
    assert "Parameters: 30 in the input models -> 15 zipped (50.0 %), 10 of them shared." in lines


def test_report_figure_is_a_png_with_one_tick_per_layer(tmp_path):
    report = _report()
    report.coupled_groups = [["fc1", "fc2"]]
    figure = report.figure()
    assert len(figure.axes) == 3  # shared/width, merge cost, accuracy
    labels = [t.get_text() for t in figure.axes[-1].get_xticklabels()]
    assert labels == ["fc1\n(s1)", "fc2\n(s1)"]
    heights = [bar.get_height() for bar in figure.axes[0].patches]
    assert heights == [300, 100, 300, 50]  # widths, then shared counts
    path = tmp_path / "report.png"
    report.save_figure(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A report without labels has no accuracy panel; the JSON round trip keeps it whole.
    plain = mtz_tf.ZipReport.from_dict(json.loads(report.to_json()))
    for layer in plain.layers:
        layer.accuracy_before_retraining = layer.accuracy_after_retraining = None
    plain.accuracy_original = None
    assert len(plain.figure().axes) == 2

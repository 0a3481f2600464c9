"""What zipping saves at deployment: file sizes and latency, zipped against separate models.

:func:`size_speed_report` exports the zipped model and each separate input model the same
way (:func:`mtz_tf.export`, same formats and quantization), then measures in one
run:

* file sizes: ``.keras`` file, SavedModel directory, TFLite file of the zipped model
  against the sum over the separate models;
* latency at batch 1 of one call of the zipped model (one input, every task's output)
  against calling the separate models one after another, with the TFLite interpreter, a
  Keras eager call, and the SavedModel ``serve`` signature (graph mode). Every backend gets
  warm-up calls, then zipped and separate calls alternate (so load on a shared machine
  hits both alike) and the median of each is kept.

:func:`deployment_report` does that and returns the Markdown table, also writing it with a
JSON copy into the output directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from mtz_tf import exporter as export_lib
from mtz_tf import io_utils
from mtz_tf.report import Report

REPORT_MARKDOWN = "deployment_report.md"
REPORT_JSON = "deployment_report.json"
_SIZE_ROWS = (
    ("keras", ".keras file"),
    ("saved_model", "SavedModel directory"),
    ("tflite", "TFLite file"),
)
_LATENCY_ROWS = (
    ("tflite", "TFLite interpreter"),
    ("keras", "Keras eager call (.keras loaded back)"),
    ("saved_model", "SavedModel `serve` (graph)"),
)


@dataclasses.dataclass
class DeploymentReport(Report):
    """Sizes and latencies of a zipped model against its separate input models.

    Attributes:
        tasks: list of str, the zipped model's tasks.
        separate: list of str, names of the separate models (the keys given).
        parameters: {"zipped", "separate"} parameter counts (separate: the sum).
        sizes: {format: {"zipped": bytes, "separate": bytes summed, "each": {name: bytes}}}.
        latency_ms: {backend: {"zipped": median ms, "separate": median ms of running all
            separate models one after another}}.
        quantize: None, "dynamic" or "int8", the TFLite quantization of both sides.
        runs: int, timed calls per side and backend; warmup: int, untimed calls first.
        tflite_threads: int, interpreter threads.
        machine: str, where it was measured.
        exports: {"zipped": export result, "separate": {name: export result}}.
    """

    tasks: list
    separate: list
    parameters: dict
    sizes: dict
    latency_ms: dict
    quantize: str | None
    runs: int
    warmup: int
    tflite_threads: int
    machine: str
    exports: dict

    def size_ratio(self, fmt: str) -> float:
        """Zipped size / summed separate size for ``fmt`` ("keras", "saved_model", "tflite")."""
        entry = self.sizes[fmt]
        return entry["zipped"] / entry["separate"]

    def latency_ratio(self, backend: str) -> float:
        """Zipped latency / latency of the separate models in sequence for ``backend``."""
        entry = self.latency_ms[backend]
        return entry["zipped"] / entry["separate"]

    @property
    def params_before(self) -> int:
        """Parameters of the separate models together."""
        return self.parameters["separate"]

    @property
    def params_after(self) -> int:
        """Parameters of the zipped model."""
        return self.parameters["zipped"]

    def to_markdown(self, title: str | None = None) -> str:
        """A Markdown table: one row per size and latency, zipped / separate ratios."""
        n = len(self.separate)
        quant = "float32" if self.quantize is None else f"{self.quantize}-quantized"
        lines = [] if title is None else [f"### {title}", ""]
        lines += [
            f"| {', '.join(self.tasks)} | zipped | {n} separate models | zipped / separate |",
            "|---|---:|---:|---:|",
        ]
        p = self.parameters
        lines.append(
            f"| parameters | {p['zipped']:,} | {p['separate']:,} | "
            f"{100 * p['zipped'] / p['separate']:.1f} % |"
        )
        for fmt, label in _SIZE_ROWS:
            if fmt not in self.sizes:
                continue
            s = self.sizes[fmt]
            label = f"{label} ({quant})" if fmt == "tflite" else label
            lines.append(
                f"| {label} | {_mb(s['zipped'])} | {_mb(s['separate'])} | "
                f"{100 * self.size_ratio(fmt):.1f} % |"
            )
        for backend, label in _LATENCY_ROWS:
            if backend not in self.latency_ms:
                continue
            t = self.latency_ms[backend]
            lines.append(
                f"| latency, {label} | {t['zipped']:.3f} ms | {t['separate']:.3f} ms | "
                f"{100 * self.latency_ratio(backend):.1f} % |"
            )
        lines += [
            "",
            f"Sizes: the zipped model against the sum over the {n} separate models, each "
            "exported the same way. Latency: batch 1, one call of the zipped model (every "
            f"task's output) against the {n} separate models called one after another; "
            f"{self.warmup} warm-up calls, then the median of {self.runs} calls per side, the "
            f"two sides alternating in one run; TFLite with {self.tflite_threads} thread(s). "
            f"Machine: {self.machine}.",
        ]
        return "\n".join(lines) + "\n"


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB"


def _machine() -> str:
    return (
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} logical CPUs, "
        f"TF {tf.__version__}"
    )


def interleaved_medians(
    calls: Mapping[str, Callable[[], object]], runs: int, warmup: int
) -> dict[str, float]:
    """Median wall time (ms) of each call, the calls alternating (order flipped each round)."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times = {name: [] for name in names}
    for i in range(runs):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def _latencies(exports: dict, x: np.ndarray, runs, warmup, threads) -> dict:
    """{backend: {"zipped", "separate"}} median ms, for the backends that were exported."""
    zipped_result, separate_results = exports["zipped"], exports["separate"]
    formats = zipped_result["formats"]
    x_tf = tf.constant(x)
    backends = {}
    if "tflite" in formats:

        def runner(result):
            path = result["artifacts"]["tflite"]["path"]
            return export_lib.tflite_interpreter(path, num_threads=threads).get_signature_runner(
                "serve"
            )

        z = runner(zipped_result)
        s = [runner(r) for r in separate_results.values()]
        backends["tflite"] = (lambda: z(input=x), lambda: [r(input=x) for r in s])
    if "keras" in formats:
        # The .keras artifacts loaded back (uncompiled, as a deployment would load them),
        # so that both sides are measured alike whatever state the given models are in.
        def load(result):
            return keras.saving.load_model(result["artifacts"]["keras"]["path"], compile=False)

        zm, sm = load(zipped_result), [load(r) for r in separate_results.values()]
        backends["keras"] = (
            lambda: zm(x_tf, training=False),
            lambda: [m(x_tf, training=False) for m in sm],
        )
    if "saved_model" in formats:

        def signature(result):
            loaded = tf.saved_model.load(result["artifacts"]["saved_model"]["path"])
            return loaded, loaded.signatures["serve"]

        # The loaded objects stay referenced (locals) while the signatures run.
        z_loaded, z_sig = signature(zipped_result)
        s_loaded = [signature(r) for r in separate_results.values()]
        backends["saved_model"] = (
            lambda: z_sig(input=x_tf),
            lambda: [sig(input=x_tf) for _, sig in s_loaded],
        )
    result = {}
    for backend, (zipped_call, separate_call) in backends.items():
        medians = interleaved_medians(
            {"zipped": zipped_call, "separate": separate_call}, runs=runs, warmup=warmup
        )
        result[backend] = medians
    return result


def _relocated(value, staging: str, final: str):
    """``value`` (an export result) with paths under ``staging`` moved to ``final``."""
    if isinstance(value, dict):
        return {k: _relocated(v, staging, final) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocated(v, staging, final) for v in value]
    if isinstance(value, str) and (value == staging or value.startswith(staging + os.sep)):
        return final + value[len(staging) :]
    return value


def _export_into(staging: str, final: str, name: str, model, **options) -> dict:
    """Exports ``model`` to ``staging/name``, its manifest naming ``final/name``."""
    result = export_lib.export(model, os.path.join(staging, name), **options)
    result = _relocated(result, staging, final)
    manifest = os.path.join(staging, name, export_lib.MANIFEST_FILE)
    with open(manifest, "w") as f:
        json.dump(result, f, indent=2)
    return result


def size_speed_report(
    zipped: keras.Model,
    separate_models: Mapping[str, keras.Model],
    out_dir: str,
    sample_inputs=None,
    formats: Sequence[str] = export_lib.FORMATS,
    quantize: str | None = None,
    representative_data=None,
    overwrite: bool = False,
    runs: int = 200,
    warmup: int = 20,
    tflite_threads: int = 1,
) -> DeploymentReport:
    """Exports ``zipped`` and every separate model the same way, then measures both.

    Args:
        zipped: keras.Model, one input and a dict of task outputs (a zipped model).
        separate_models: {name: keras.Model}, the input models it replaces (one input each).
        out_dir: str; the zipped model goes to ``out_dir/zipped``, separate model ``name``
            to ``out_dir/separate_<name>`` (each by :func:`mtz_tf.export`). A
            non-empty ``out_dir`` needs ``overwrite`` and is replaced as a whole; if an
            export fails, the previous ``out_dir`` is put back.
        sample_inputs: array (N, ...) of model inputs or ``(x, y)`` (labels as in
            ``export``'s ``parity_data``): used for the parity checks, and its first
            sample for the batch-1 latency. None: seeded random inputs.
        formats, quantize, representative_data: as in :func:`mtz_tf.export`.
        overwrite: bool, replace a non-empty ``out_dir``.
        runs: int, timed calls per side and backend (the median is kept).
        warmup: int, untimed calls per side and backend first.
        tflite_threads: int, TFLite interpreter threads for the latency.

    Returns:
        A :class:`DeploymentReport` (``to_markdown()``, ``to_dict()``).
    """
    if not isinstance(separate_models, Mapping) or not separate_models:
        raise ValueError(
            "`separate_models` must be a non-empty dict {name: keras.Model}. Received: "
            f"{type(separate_models).__name__}"
        )
    for name in separate_models:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"Separate model names must be identifiers. Received: {name!r}")
    if runs < 1 or warmup < 0:
        raise ValueError(f"`runs` must be >= 1 and `warmup` >= 0. Received: {runs}, {warmup}")
    spec = export_lib._input_spec(zipped)
    if sample_inputs is None:
        sample_inputs = np.random.default_rng(0).standard_normal((64, *spec.shape[1:]))
        sample_inputs = sample_inputs.astype(spec.dtype.as_numpy_dtype)
    x = export_lib._samples(sample_inputs, limit=10**9)
    options = dict(formats=formats, quantize=quantize, representative_data=representative_data)
    out_dir = os.path.abspath(out_dir)
    export_lib._check_out_dir(out_dir, overwrite)
    with io_utils.staged_directory(out_dir) as staging:
        zipped_result = _export_into(
            staging, out_dir, "zipped", zipped, parity_data=sample_inputs, **options
        )
        separate_results = {}
        for name, model in separate_models.items():
            parity = x
            if isinstance(sample_inputs, tuple) and len(sample_inputs) == 2:
                y = sample_inputs[1]  # One label array for all, or {name: labels}.
                if not isinstance(y, Mapping):
                    parity = (x, y)
                elif name in y:
                    parity = (x, y[name])
            separate_results[name] = _export_into(
                staging, out_dir, f"separate_{name}", model, parity_data=parity, **options
            )
    sizes = {}
    for fmt in zipped_result["artifacts"]:
        if fmt not in ("keras", "saved_model", "tflite"):
            continue  # Per-task TFLite files have no separate counterpart.
        each = {n: r["artifacts"][fmt]["bytes"] for n, r in separate_results.items()}
        sizes[fmt] = {
            "zipped": zipped_result["artifacts"][fmt]["bytes"],
            "separate": int(sum(each.values())),
            "each": each,
        }
    exports = {"zipped": zipped_result, "separate": separate_results}
    x1 = np.asarray(x[:1], dtype=spec.dtype.as_numpy_dtype)
    latency = _latencies(exports, x1, runs, warmup, tflite_threads)
    return DeploymentReport(
        tasks=export_lib.task_names(zipped),
        separate=list(separate_models),
        parameters={
            "zipped": int(zipped.count_params()),
            "separate": int(sum(m.count_params() for m in separate_models.values())),
        },
        sizes=sizes,
        latency_ms=latency,
        quantize=quantize,
        runs=runs,
        warmup=warmup,
        tflite_threads=tflite_threads,
        machine=_machine(),
        exports=exports,
    )


def deployment_report(
    zipped: keras.Model,
    separate_models: Mapping[str, keras.Model],
    out_dir: str,
    sample_inputs=None,
    **kwargs,
) -> str:
    """Exports, measures and returns the Markdown size/speed table (see
    :func:`size_speed_report` for the arguments; ``kwargs`` go to it).

    Also writes ``out_dir/deployment_report.md`` and ``out_dir/deployment_report.json``.
    """
    report = size_speed_report(zipped, separate_models, out_dir, sample_inputs, **kwargs)
    markdown = report.to_markdown(title="Deployment: zipped model against the separate models")
    io_utils.write_text(os.path.join(out_dir, REPORT_MARKDOWN), markdown)
    io_utils.write_json(os.path.join(out_dir, REPORT_JSON), report.to_dict())
    return markdown

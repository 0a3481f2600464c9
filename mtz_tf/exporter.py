"""Deployment: write a (zipped) Keras model as .keras, SavedModel and TFLite, checked.

:func:`export` writes, into one output directory,

* ``model.keras``: the Keras model (architecture and weights; no optimizer state);
* ``saved_model/``: a TF SavedModel whose ``serve`` signature maps one input to the dict
  of all task outputs, and, for a multi-task model (dict outputs), one ``serve_<task>``
  signature per task that computes only what that task needs (its graph is
  :func:`mtz_tf.zipped_network.task_model`, so the other tasks' specific neurons are not computed);
* ``model.tflite``: one TFLite model with all task outputs (signature ``serve``), and on
  request ``model_<task>.tflite`` per task (signature ``serve_<task>``), optionally
  quantized (``"dynamic"`` range or full ``"int8"`` with float input and output);
* ``export.json``: what was written, the file sizes and the parity figures.

Every signature takes one tensor named ``input`` and returns a dict keyed by task name (a
single-output model has one output named ``output``).

The write is atomic (:func:`mtz_tf.io_utils.staged_directory`): everything is built in a
staging directory beside ``out_dir``, every artifact is loaded back and compared with the
Keras model, and only then is the directory swapped into place, in one atomic exchange with
an existing ``out_dir``. On any failure the staging directory is removed and an existing
``out_dir`` is left as it was. Files and directories get the modes the umask gives.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from mtz_tf import data as data_lib
from mtz_tf import distribution, io_utils

_LOG = logging.getLogger(__name__)

FORMATS = ("keras", "saved_model", "tflite")
QUANTIZE = (None, "dynamic", "int8")
INPUT_NAME = "input"
SINGLE_OUTPUT_NAME = "output"
KERAS_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
TFLITE_FILE = "model.tflite"
MANIFEST_FILE = "export.json"
DEFAULT_TOLERANCE = 1e-4
"""Largest max-abs difference accepted between a float32 artifact and the Keras model."""

_PARITY_SAMPLES = 64
_REPRESENTATIVE_SAMPLES = 200


class ParityError(RuntimeError):
    """An exported artifact does not compute what the Keras model computes."""


# ---------------------------------------------------------------------------------------
# Model introspection.


def task_names(model: keras.Model) -> list[str]:
    """The output names of ``model``: its dict keys, or ``["output"]`` for one tensor."""
    output = model.output
    if isinstance(output, Mapping):
        return list(output)
    if isinstance(output, (list, tuple)):
        raise ValueError(
            f"Model {model.name!r} has {len(output)} outputs as a list; export needs one "
            "output tensor or a dict of outputs keyed by task name."
        )
    return [SINGLE_OUTPUT_NAME]


def _as_dict(model: keras.Model, outputs) -> dict:
    return dict(outputs) if isinstance(outputs, Mapping) else {SINGLE_OUTPUT_NAME: outputs}


def _predict(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> dict:
    """{task: float64 outputs} of ``model`` on ``x``, by direct calls (no ``predict``, whose
    tf.function retraces for every new model)."""
    chunks = [
        _as_dict(model, model(x[i : i + batch_size], training=False))
        for i in range(0, len(x), batch_size)
    ]
    return {
        t: np.concatenate([np.asarray(c[t], dtype=np.float64) for c in chunks]) for t in chunks[0]
    }


def _without_optimizer(model: keras.Model) -> keras.Model:
    """``model`` without compile state, so that ``.keras`` files hold no optimizer moments.

    Deployment needs weights only; a compiled model's Adam state would triple its file.
    Functional and Sequential models are rebuilt from their config with the same weights;
    others are saved as they are.
    """
    if getattr(model, "optimizer", None) is None:
        return model
    try:
        copy = model.__class__.from_config(model.get_config())
        copy.set_weights(model.get_weights())
    except (TypeError, ValueError, NotImplementedError):
        return model
    return copy


def _input_spec(model: keras.Model) -> tf.TensorSpec:
    inputs = model.inputs
    if len(inputs) != 1:
        raise ValueError(
            f"Model {model.name!r} has {len(inputs)} inputs; export needs a model with one "
            "input (zipped tasks share it)."
        )
    shape = [None] + list(inputs[0].shape[1:])
    return tf.TensorSpec(shape, inputs[0].dtype or "float32", name=INPUT_NAME)


def _same_tensors(a, b) -> bool:
    a = a if isinstance(a, (list, tuple)) else [a]
    b = b if isinstance(b, (list, tuple)) else [b]
    return len(a) == len(b) and all(u is v for u, v in zip(a, b))


def _task_chain(model: keras.Model, task: str):
    """The task's forward function over ``model``'s own layers, or None if not a chain.

    Works for a linear chain of zipped layers (``call_task(x, task)``) and weightless
    layers (Flatten, Dropout, pooling, activations) between them.
    """
    previous = model.inputs[0]
    chain = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if not _same_tensors(layer.input, previous):
            return None
        if not (hasattr(layer, "call_task") or not layer.weights):
            return None
        chain.append(layer)
        previous = layer.output
    final = model.output[task]
    if not (
        final is previous or (isinstance(previous, list) and any(final is p for p in previous))
    ):
        return None

    def forward(x):
        for layer in chain:
            if hasattr(layer, "call_task"):
                x = layer.call_task(x, task)
            else:
                x = layer(x, training=False)
        return x

    return forward


def _has_zipped_layers(model: keras.Model) -> bool:
    return any(type(layer).__module__.startswith("mtz_tf.") for layer in model.layers)


def task_functions(model: keras.Model) -> dict:
    """{task: a function or model x -> that task's output only} of a multi-task model.

    * A chain of zipped layers: a function running the model's own layers for one task,
      reading its variables (an endpoint costs no extra weights).
    * Any other model with zipped layers: :func:`mtz_tf.zipped_network.task_model` (plain layers
      holding a copy of the task's view of the weights).
    * A model without zipped layers (e.g. a shared trunk with one head per task): the
      functional sub-model from the input to the task's output, which runs only the layers
      that output depends on and shares the model's variables.

    Parity checks of every ``serve_<task>`` endpoint catch any of these being wrong.
    """
    from mtz_tf import zipped_network  # Lazy: only multi-task models need it.

    if not isinstance(model.output, Mapping):
        return {}
    result = {}
    for task in task_names(model):
        forward = _task_chain(model, task)
        if forward is not None:
            result[task] = forward
            continue
        if _has_zipped_layers(model):
            try:
                result[task] = zipped_network.task_model(model, task)
                continue
            except (TypeError, ValueError, NotImplementedError, AttributeError) as e:
                _LOG.warning(
                    "zipped_network.task_model cannot split task %r (%s); serve_%s uses the "
                    "functional sub-model instead, which also computes other tasks' zipped "
                    "neurons.",
                    task,
                    e,
                    task,
                )
        result[task] = keras.Model(model.input, model.output[task], name=f"{model.name}_{task}")
    return result


# ---------------------------------------------------------------------------------------
# Writers.


def _serve_fn(model, names: Sequence[str]):
    def serve(x):
        outputs = model(x, training=False) if isinstance(model, keras.Model) else model(x)
        if isinstance(outputs, Mapping):
            return {name: outputs[name] for name in names}
        return {names[0]: outputs}

    return serve


def write_saved_model(model: keras.Model, path: str, per_task: Mapping) -> list:
    """Writes a SavedModel with ``serve`` and one ``serve_<task>`` per entry of ``per_task``.

    ``per_task`` maps task names to Keras models or functions of the input (see
    :func:`task_functions`).

    Returns the signature names written.
    """
    spec = _input_spec(model)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", _serve_fn(model, task_names(model)), input_signature=[spec])
    for task, task_model in per_task.items():
        if isinstance(task_model, keras.Model):
            archive.track(task_model)
        archive.add_endpoint(f"serve_{task}", _serve_fn(task_model, [task]), input_signature=[spec])
    archive.write_out(path, verbose=False)
    return ["serve"] + [f"serve_{task}" for task in per_task]


def _samples(data, limit: int) -> np.ndarray:
    """Up to ``limit`` input samples from an array, a (x, y) tuple or a batched dataset."""
    if isinstance(data, tf.data.Dataset):
        return data_lib.first_inputs(data, limit, "`representative_data`")
    if isinstance(data, tuple) and len(data) == 2:  # (x, y); a list is a list of inputs.
        data = data[0]
    return np.asarray(data)[:limit]


def convert_tflite(
    saved_model_dir: str,
    signature: str,
    quantize: str | None = None,
    representative: np.ndarray | None = None,
) -> bytes:
    """Converts one signature of a SavedModel to a TFLite flatbuffer.

    ``quantize``: None (float32), ``"dynamic"`` (int8 weights, float activations) or
    ``"int8"`` (int8 weights and activations calibrated on ``representative``, float32
    input and output so callers feed the same arrays).
    """
    converter = tf.lite.TFLiteConverter.from_saved_model(
        saved_model_dir, signature_keys=[signature]
    )
    if quantize is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "int8":
        samples = np.asarray(representative, dtype=np.float32)

        def representative_dataset():
            for sample in samples:
                yield {INPUT_NAME: sample[None]}

        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Calibration's tf.lite.Interpreter deprecation notice.
        return converter.convert()


def tflite_interpreter(path: str, num_threads: int | None = None):
    """A TFLite interpreter for ``path`` (LiteRT's when installed, else ``tf.lite``'s)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter  # noqa: N806 - a class.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice.
        return Interpreter(model_path=path, num_threads=num_threads)


def run_tflite(path: str, signature: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """Runs signature ``signature`` of the TFLite file ``path`` on the batch ``x``."""
    runner = tflite_interpreter(path).get_signature_runner(signature)
    return {k: np.asarray(v) for k, v in runner(**{INPUT_NAME: x}).items()}


def _dir_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


# ---------------------------------------------------------------------------------------
# Parity.


def _labels(parity_data, names: Sequence[str]) -> dict | None:
    if not (isinstance(parity_data, tuple) and len(parity_data) == 2):
        return None
    y = parity_data[1]
    if isinstance(y, Mapping):
        missing = [t for t in names if t not in y]
        if missing:
            raise ValueError(
                f"`parity_data` labels must have one array per task {list(names)}. "
                f"Missing: {missing}"
            )
        return {t: np.asarray(y[t]) for t in names}
    return {t: np.asarray(y) for t in names}


def _compare(artifact: str, expected: dict, got: dict, tolerance: float) -> dict[str, float]:
    diffs = {}
    for task, want in expected.items():
        if task not in got:
            raise ParityError(
                f"Artifact {artifact!r} has no output {task!r}; it returns {sorted(got)}."
            )
        have = np.asarray(got[task])
        if have.shape != want.shape:
            raise ParityError(
                f"Artifact {artifact!r}, task {task!r}: output shape {have.shape} differs from "
                f"the Keras model's {want.shape}."
            )
        diff = float(np.max(np.abs(have.astype(np.float64) - want))) if want.size else 0.0
        # float32 rounding grows with the outputs' size: above 1 the tolerance is relative.
        scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
        if not diff <= tolerance * scale:  # Also catches NaN.
            raise ParityError(
                f"Parity check failed: artifact {artifact!r}, task {task!r}: max abs difference "
                f"{diff:.3g} from the Keras model exceeds the tolerance {tolerance:g} x "
                f"max(1, max |output|) = {tolerance * scale:.3g} (on {len(want)} sample "
                "inputs). The export was not written."
            )
        diffs[task] = diff
    return diffs


def _quantized_figures(expected: dict, got: dict, labels: dict | None) -> dict:
    figures = {}
    for task, want in expected.items():
        have = np.asarray(got[task], dtype=np.float64)
        entry = {
            "max_abs_diff": float(np.max(np.abs(have - want))),
            "top1_agreement": float(np.mean(np.argmax(have, -1) == np.argmax(want, -1))),
        }
        if labels is not None:
            entry["accuracy"] = float(np.mean(np.argmax(have, -1) == labels[task]))
            entry["keras_accuracy"] = float(np.mean(np.argmax(want, -1) == labels[task]))
        figures[task] = entry
    return figures


# ---------------------------------------------------------------------------------------
# The public entry point.


def _validate(formats, quantize, representative_data, tolerance) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if not formats or unknown or len(set(formats)) != len(formats):
        raise ValueError(
            f"`formats` must be distinct names from {FORMATS}. Received: formats={formats!r}"
        )
    if quantize not in QUANTIZE:
        raise ValueError(f"`quantize` must be one of {QUANTIZE}. Received: quantize={quantize!r}")
    if quantize is not None and "tflite" not in formats:
        raise ValueError(
            f"`quantize={quantize!r}` applies to TFLite only; add 'tflite' to `formats`. "
            f"Received: formats={formats!r}"
        )
    if quantize == "int8" and representative_data is None:
        raise ValueError(
            "`quantize='int8'` calibrates activation ranges and needs `representative_data` "
            "(an array or batched dataset of typical inputs, a few hundred samples)."
        )
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"`tolerance` must be a number >= 0. Received: tolerance={tolerance!r}")
    return formats


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"`out_dir` {out_dir!r} exists and is not a directory.")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(
            f"`out_dir` {out_dir!r} exists and is not empty; pass `overwrite=True` "
            "(--overwrite) to replace it, or choose another directory."
        )


def export(
    model: keras.Model,
    out_dir: str,
    formats: Iterable[str] = FORMATS,
    quantize: str | None = None,
    representative_data=None,
    overwrite: bool = False,
    per_task_tflite: bool = False,
    parity_data=None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict:
    """Writes ``model`` for deployment and checks every artifact against it.

    Args:
        model: keras.Model with one input and a dict of outputs keyed by task name (a
            zipped model), or one output tensor (a plain model, output name ``output``).
        out_dir: str, the directory to create; written atomically (see module docstring).
        formats: iterable of ``"keras"``, ``"saved_model"``, ``"tflite"``.
        quantize: None, ``"dynamic"`` or ``"int8"``; applies to the TFLite files only.
        representative_data: inputs for ``"int8"`` calibration: an array (N, ...), an
            ``(x, y)`` tuple, or a batched ``tf.data.Dataset`` of x or (x, y); at most 200
            samples are used.
        overwrite: bool, replace an existing non-empty ``out_dir``.
        per_task_tflite: bool, also write ``model_<task>.tflite`` for every task.
        parity_data: inputs for the parity check: an array (N, ...), or ``(x, y)`` with
            ``y`` one label array for all tasks or a dict {task: labels}. Labels give
            per-task accuracies of quantized TFLite files. None: 64 seeded standard-normal
            inputs (no accuracies).
        tolerance: float, the largest max-abs difference accepted between a float32
            artifact (every artifact but quantized TFLite files) and the Keras model, per
            unit of max(1, max |output|) (float32 rounding grows with the outputs' size).

    Returns:
        A JSON-serializable dict: ``out_dir``, ``tasks``, ``formats``, ``quantize``,
        ``artifacts`` {name: {"path", "bytes", ...}}, ``parity`` {artifact: {task: max abs
        diff}} and, when quantized, ``quantized`` {artifact: {task: {"accuracy" (with
        labels), "keras_accuracy", "top1_agreement", "max_abs_diff"}}}. The same dict is
        written to ``out_dir/export.json``.

    Raises:
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is False.
        ParityError: an artifact's outputs differ from the Keras model's by more than
            ``tolerance``; nothing is written.
        ValueError: a replicating ``tf.distribute`` strategy is current
            (:func:`mtz_tf.distribution.check_exportable`).

    Example:
        >>> result = export(zipped, "deploy/", per_task_tflite=True)
        >>> sm = tf.saved_model.load("deploy/saved_model")
        >>> sm.signatures["serve_fashion"](input=x)["fashion"]
    """
    distribution.check_exportable("mtz_tf.export")
    formats = _validate(formats, quantize, representative_data, tolerance)
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model. Received: {type(model).__name__}")
    spec = _input_spec(model)
    names = task_names(model)
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_out_dir(out_dir, overwrite)

    if parity_data is None:
        x = np.random.default_rng(0).standard_normal((_PARITY_SAMPLES, *spec.shape[1:]))
    else:
        x = _samples(parity_data, limit=10**9)
    x = np.asarray(x, dtype=spec.dtype.as_numpy_dtype)
    if x.shape[1:] != tuple(spec.shape[1:]) or len(x) == 0:
        raise ValueError(
            f"`parity_data` inputs must have shape (N, {', '.join(map(str, spec.shape[1:]))}) "
            f"with N >= 1 to match the model's input. Received: {x.shape}"
        )
    labels = _labels(parity_data, names)
    if labels is not None and any(len(v) != len(x) for v in labels.values()):
        raise ValueError(
            f"`parity_data` has {len(x)} inputs but label arrays of lengths "
            f"{ {t: len(v) for t, v in labels.items()} }."
        )
    representative = (
        None
        if representative_data is None
        else _samples(representative_data, _REPRESENTATIVE_SAMPLES).astype(np.float32)
    )
    expected = _predict(model, x)

    with io_utils.staged_directory(out_dir) as tmp_dir:
        result = _write_all(
            model,
            tmp_dir,
            formats,
            quantize,
            representative,
            per_task_tflite,
            x,
            expected,
            labels,
            tolerance,
        )
        result.update(
            out_dir=out_dir,
            tasks=names,
            formats=list(formats),
            quantize=quantize,
            parity_samples=len(x),
            tolerance=tolerance,
        )
        for artifact in result["artifacts"].values():
            artifact["path"] = os.path.join(out_dir, artifact["file"])
        with open(os.path.join(tmp_dir, MANIFEST_FILE), "w") as f:
            json.dump(result, f, indent=2)
    return result


def _write_all(
    model,
    tmp_dir,
    formats,
    quantize,
    representative,
    per_task_tflite,
    x,
    expected,
    labels,
    tolerance,
) -> dict:
    artifacts, parity, quantized = {}, {}, {}
    if "keras" in formats:
        path = os.path.join(tmp_dir, KERAS_FILE)
        _without_optimizer(model).save(path)
        restored = keras.saving.load_model(path, compile=False)
        got = _predict(restored, x)
        parity["keras"] = _compare(KERAS_FILE, expected, got, tolerance)
        artifacts["keras"] = {"file": KERAS_FILE, "bytes": _dir_bytes(path)}

    need_saved_model = "saved_model" in formats or "tflite" in formats
    if need_saved_model:
        # TFLite converts from the SavedModel; without "saved_model" in `formats` it is
        # written to a scratch directory inside tmp_dir and deleted before the rename.
        keep = "saved_model" in formats
        sm_dir = os.path.join(tmp_dir, SAVED_MODEL_DIR if keep else ".saved_model_scratch")
        per_task = task_functions(model)
        signatures = write_saved_model(model, sm_dir, per_task)
        if keep:
            loaded = tf.saved_model.load(sm_dir)
            missing = [s for s in signatures if s not in loaded.signatures]
            if missing:
                raise ParityError(f"The SavedModel lacks signatures {missing}.")
            for signature in signatures:
                outputs = loaded.signatures[signature](**{INPUT_NAME: tf.constant(x)})
                want = (
                    expected
                    if signature == "serve"
                    else {signature[len("serve_") :]: expected[signature[len("serve_") :]]}
                )
                if set(outputs) != set(want):
                    raise ParityError(
                        f"Artifact 'saved_model', signature {signature!r} returns "
                        f"{sorted(outputs)}; expected exactly {sorted(want)}."
                    )
                got = {k: v.numpy() for k, v in outputs.items()}
                parity[f"saved_model/{signature}"] = _compare(
                    f"saved_model/{signature}", want, got, tolerance
                )
            artifacts["saved_model"] = {
                "file": SAVED_MODEL_DIR,
                "bytes": _dir_bytes(sm_dir),
                "signatures": signatures,
            }

        if "tflite" in formats:
            jobs = [("tflite", TFLITE_FILE, "serve", expected)]
            if per_task_tflite:
                jobs += [
                    (f"tflite_{t}", f"model_{t}.tflite", f"serve_{t}", {t: expected[t]})
                    for t in per_task
                ]
            for name, file, signature, want in jobs:
                path = os.path.join(tmp_dir, file)
                flatbuffer = convert_tflite(sm_dir, signature, quantize, representative)
                with open(path, "wb") as f:
                    f.write(flatbuffer)
                got = run_tflite(path, signature, x)
                if quantize is None:
                    parity[name] = _compare(file, want, got, tolerance)
                else:
                    missing = [t for t in want if t not in got]
                    if missing:
                        raise ParityError(f"Artifact {file!r} lacks outputs {missing}.")
                    quantized[name] = _quantized_figures(want, got, labels)
                artifacts[name] = {
                    "file": file,
                    "bytes": len(flatbuffer),
                    "signature": signature,
                    "quantize": quantize,
                }
        if not keep:
            shutil.rmtree(sm_dir)

    result = {"artifacts": artifacts, "parity": parity}
    if quantize is not None:
        result["quantized"] = quantized
    return result

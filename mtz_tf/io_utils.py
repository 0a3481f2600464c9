"""Atomic writes: a file appears complete under its final name, or not at all."""

from __future__ import annotations

import json
import os
import tempfile

import keras


def _temp_beside(path: str, suffix: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=directory)
    os.close(handle)
    return temp


def save_model(model: keras.Model, path: str) -> None:
    """Saves ``model`` to ``path`` (``.keras``) through a temp file and an atomic rename."""
    if not path.endswith(".keras"):
        raise ValueError(f"Model paths must end in '.keras'. Received: {path!r}")
    temp = _temp_beside(path, ".keras")
    try:
        model.save(temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temp file and an atomic rename."""
    temp = _temp_beside(path, ".txt")
    try:
        with open(temp, "w") as f:
            f.write(text)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def write_json(path: str, value) -> None:
    """Writes ``value`` as indented JSON to ``path``, atomically."""
    write_text(path, json.dumps(value, indent=2) + "\n")


def read_json(path: str):
    """Reads a JSON file."""
    with open(path) as f:
        return json.load(f)


def load_model(path: str) -> keras.Model:
    """Loads a ``.keras`` model, with an error that names a missing or wrong path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model file at {path!r}; expected a '.keras' file.")
    return keras.saving.load_model(path)

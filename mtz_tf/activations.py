"""Activations identified by the function itself, never by its serialized name.

Keras serializes any function whose ``__name__`` matches a built-in (a user's own ``relu``
that computes something else) as that built-in, so a name read from a config can stand for
the wrong function. Here a function is the built-in ``name`` only when it *is*
``keras.activations.get(name)``; a custom function is known by the name it is registered
under (``@keras.saving.register_keras_serializable``), which is also what lets a zipped
model that uses it save and load. An unregistered custom function has no name that would
bring it back, so it is refused with an error that says how to register it.

Zipping permutes and merges units, so it needs activations that act on each unit alone:
the built-ins in :data:`ELEMENTWISE`, and registered custom functions that pass
:func:`is_elementwise`'s numerical probe.
"""

from __future__ import annotations

import functools

import keras
import numpy as np

ELEMENTWISE = frozenset(
    {
        "linear",
        "relu",
        "relu6",
        "leaky_relu",
        "elu",
        "selu",
        "gelu",
        "silu",
        "swish",
        "tanh",
        "sigmoid",
        "hard_sigmoid",
        "hard_silu",
        "hard_swish",
        "softplus",
        "softsign",
        "mish",
        "exponential",
    }
)
"""Built-in activations that act on each unit alone."""

_BUILTIN_NAMES = (
    "linear",
    "relu",
    "relu6",
    "leaky_relu",
    "elu",
    "selu",
    "gelu",
    "silu",
    "swish",
    "tanh",
    "sigmoid",
    "hard_sigmoid",
    "hard_silu",
    "hard_swish",
    "softplus",
    "softsign",
    "mish",
    "exponential",
    "softmax",
    "log_softmax",
)


def _builtin(name: str):
    try:
        return keras.activations.get(name)
    except ValueError:
        return None


def builtin_name(fn) -> str | None:
    """``name`` when ``fn`` is the Keras built-in ``keras.activations.get(name)``, else None."""
    if fn is None:
        return "linear"
    for name in _BUILTIN_NAMES:
        if _builtin(name) is fn:
            return name
    return None


def identify(fn) -> str | None:
    """The name that brings ``fn`` back: a built-in's name, a registered function's
    registered name (``"package>name"``), or None for an unregistered custom function."""
    name = builtin_name(fn)
    if name is not None:
        return name
    registered = keras.saving.get_registered_name(fn)
    if keras.saving.get_registered_object(registered) is fn:
        return registered
    return None


def describe(fn) -> str:
    """A readable name for messages: the module and qualified name of ``fn``."""
    module = getattr(fn, "__module__", None) or type(fn).__module__
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qualname}"


def label(fn) -> str:
    """:func:`identify`'s name, or for an unregistered custom function a description that
    matches no name (so no set of known activations contains it)."""
    return identify(fn) or f"unregistered custom function {describe(fn)}"


def canonical(fn, layer: str) -> str:
    """:func:`identify`, refusing an unregistered custom function with a clear error."""
    name = identify(fn)
    if name is None:
        raise ValueError(
            f"Layer {layer!r} uses the custom activation {describe(fn)}, which is neither a "
            "Keras built-in nor registered, so a zipped model could not compute or save it "
            "faithfully. Register it with "
            "`@keras.saving.register_keras_serializable(package='my_package')` (it must act "
            "on each unit alone), or use a built-in activation such as 'relu'."
        )
    return name


def resolve(name: str):
    """The function a :func:`identify` name stands for."""
    fn = _builtin(name) if ">" not in name else keras.saving.get_registered_object(name)
    if fn is None:
        raise ValueError(
            f"Activation {name!r} is neither a Keras built-in nor a registered function; "
            "import the module that registers it (`@keras.saving.register_keras_serializable`) "
            "before building or loading the model."
        )
    return fn


@functools.lru_cache(maxsize=128)
def is_elementwise(name: str) -> bool:
    """Whether the activation ``name`` acts on each unit alone.

    Built-ins are looked up in :data:`ELEMENTWISE`. A registered custom function is probed:
    on a random batch x (4, 6, 8), changing channels S must change no output outside S,
    output shapes must equal input shapes, and permuting channels must permute outputs the
    same way (up to float32 rounding of the function's own value).
    """
    if ">" not in name:
        return name in ELEMENTWISE
    fn = resolve(name)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6, 8)).astype("float32")
    y = x.copy()
    changed = rng.random(8) < 0.5
    y[..., changed] = rng.normal(size=y[..., changed].shape)
    order = rng.permutation(8)
    try:
        fx, fy = (
            np.asarray(keras.ops.convert_to_numpy(fn(keras.ops.convert_to_tensor(v))))
            for v in (x, y)
        )
        fp = np.asarray(keras.ops.convert_to_numpy(fn(keras.ops.convert_to_tensor(x[..., order]))))
    except Exception:  # noqa: BLE001 - any failure means the probe cannot vouch for it
        return False
    if fx.shape != x.shape or fy.shape != x.shape or fp.shape != x.shape:
        return False
    tol = 1e-5 * max(1.0, float(np.max(np.abs(fx))))
    same_outside = np.max(np.abs(fx[..., ~changed] - fy[..., ~changed]), initial=0.0) <= tol
    return bool(same_outside and np.max(np.abs(fp - fx[..., order])) <= tol)

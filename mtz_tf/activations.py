"""Activations identified by the function itself, never by its serialized name.

Keras serializes any function whose ``__name__`` matches a built-in (a user's own ``relu``
that computes something else) as that built-in, so a name read from a config can stand for
the wrong function. Here a function is the built-in ``name`` only when it *is* the public
``keras.activations.<name>`` (never looked up through ``keras.activations.get``, which a
``custom_object_scope`` redirects); a custom function is known by the ``"package>name"`` it
is registered under (``@keras.saving.register_keras_serializable``), which is also what lets
a zipped model that uses it save and load. An unregistered custom function has no name that would
bring it back, so it is refused with an error that says how to register it.

Zipping permutes and merges units, so it needs activations that act on each unit alone:
the built-ins in :data:`ELEMENTWISE`, and registered custom functions that pass
:func:`is_elementwise`'s numerical probe. Output heads are never zipped, so they may use
any built-in or registered activation (``softmax``).
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
        "celu",
        "selu",
        "gelu",
        "silu",
        "swish",
        "tanh",
        "hard_tanh",
        "tanh_shrink",
        "sigmoid",
        "log_sigmoid",
        "hard_sigmoid",
        "sparse_sigmoid",
        "hard_silu",
        "hard_swish",
        "softplus",
        "sparse_plus",
        "squareplus",
        "softsign",
        "hard_shrink",
        "soft_shrink",
        "mish",
        "exponential",
    }
)
"""Built-in activations that act on each unit alone (every public ``keras.activations``
function but ``softmax``, ``log_softmax``, ``sparsemax`` and ``glu``, which mix units, and
``threshold``, which needs arguments of its own)."""

_UNREGISTERED = "unregistered custom function"
"""How :func:`label` starts the description of an unregistered custom function."""

_NOT_ACTIVATIONS = frozenset({"get", "serialize", "deserialize"})


@functools.cache
def _builtins() -> tuple[dict, dict]:
    """``({name: function}, {id(function): name})`` of the public ``keras.activations``
    functions, read from the module itself (never through ``keras.activations.get``, which a
    ``custom_object_scope`` can redirect). An alias (``swish``) names its function's own name
    (``silu``)."""
    by_name = {
        name: fn
        for name, fn in vars(keras.activations).items()
        if not name.startswith("_") and name not in _NOT_ACTIVATIONS and callable(fn)
    }
    by_id = {}
    for name, fn in sorted(by_name.items()):
        own = getattr(fn, "__name__", None)
        by_id.setdefault(id(fn), own if by_name.get(own) is fn else name)
    return by_name, by_id


def builtin_name(fn) -> str | None:
    """``name`` when ``fn`` is the public Keras built-in ``keras.activations.<name>`` itself
    (by identity), else None."""
    if fn is None:
        return "linear"
    by_name, by_id = _builtins()
    name = by_id.get(id(fn))
    return name if name is not None and by_name[name] is fn else None


def identify(fn) -> str | None:
    """The name that brings ``fn`` back: a built-in's name, a registered function's
    registered name (``"package>name"``), or None for an unregistered custom function."""
    name = builtin_name(fn)
    if name is not None:
        return name
    # Only a package-registered name ("package>name") vouches for a custom function: a bare
    # name is the function's __name__, which a custom_object_scope may map to it, but which
    # would load as Keras's built-in of that name.
    registered = keras.saving.get_registered_name(fn)
    if ">" in registered and keras.saving.get_registered_object(registered) is fn:
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
    return identify(fn) or f"{_UNREGISTERED} {describe(fn)}"


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
    if ">" in name:
        fn = keras.saving.get_registered_object(name)
    else:
        fn = _builtins()[0].get(name)
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

    Built-ins are looked up in :data:`ELEMENTWISE`; a registered custom function
    (``"package>name"``) is probed (:func:`_probe`). Any other name, e.g. :func:`label`'s
    description of an unregistered custom function, cannot be vouched for: False.
    """
    if ">" not in name:
        return name in ELEMENTWISE
    return _probe(resolve(name))


def unverifiable(name: str) -> str | None:
    """For :func:`label`'s description of an unregistered custom function, a noun phrase
    saying that its properties cannot be checked and how to register it (for messages where
    an activation must act on each unit alone); None for any other name."""
    if not name.startswith(_UNREGISTERED):
        return None
    return (
        f"the {name}, whose properties (whether it acts on each unit alone) cannot be "
        "checked; register it with "
        "`@keras.saving.register_keras_serializable(package='my_package')` so that it is "
        "known by name and can be probed"
    )


def _probe(fn) -> bool:
    """Numerical check that ``fn`` acts on each unit alone: on a random batch x (4, 6, 8),
    changing channels S must change no output outside S, output shapes must equal input
    shapes, and permuting channels must permute outputs the same way (up to float32
    rounding of the function's own value)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6, 8)).astype("float32")
    y = x.copy()
    changed = rng.random(8) < 0.5
    y[..., changed] = rng.normal(size=y[..., changed].shape)
    order = rng.permutation(8)
    try:
        fx, fy, fp = (
            np.asarray(keras.ops.convert_to_numpy(fn(keras.ops.convert_to_tensor(v))))
            for v in (x, y, x[..., order])
        )
    except Exception:  # noqa: BLE001 - any failure means the probe cannot vouch for it
        return False
    if fx.shape != x.shape or fy.shape != x.shape or fp.shape != x.shape:
        return False
    tol = 1e-5 * max(1.0, float(np.max(np.abs(fx))))
    same_outside = np.max(np.abs(fx[..., ~changed] - fy[..., ~changed]), initial=0.0) <= tol
    return bool(same_outside and np.max(np.abs(fp - fx[..., order])) <= tol)

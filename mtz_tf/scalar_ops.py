"""Keras-ops nodes of a functional model as layers.

A functional model may compute with ``keras.ops`` directly on symbolic tensors: MobileNetV3's
hard sigmoid is ``ReLU(6)(x + 3.0) * (1.0 / 6.0)``, two ops nodes (``Add``, ``Multiply``)
that are not in ``model.layers``. The readers of :mod:`mtz_tf.graph`,
:mod:`mtz_tf.compress.neuron_merging` and :mod:`mtz_tf.compress.bn_graph` follow layers, so
:func:`as_layers` first rebuilds such a model with every op of one tensor and one scalar
written as the ``Rescaling`` layer that computes it:

    x + c  = Rescaling(scale=1, offset=c)(x)      x − c = Rescaling(1, −c)(x)
    c − x  = Rescaling(−1, c)(x)                  x · c = c · x = Rescaling(c, 0)(x)
    x / c  = Rescaling(1/c, 0)(x)

(``Rescaling`` computes x · scale + offset; x / c becomes a product with 1/c, equal up to
float rounding). Any other ops node is refused by name.
"""

from __future__ import annotations

import numbers

import keras
import numpy as np

_AFFINE_OPS = ("Add", "Subtract", "Multiply", "Divide", "TrueDivide")


def has_ops_nodes(model: keras.Model) -> bool:
    """Whether the functional ``model`` computes with operations that are not layers."""
    return any(not isinstance(op, keras.layers.Layer) for op in getattr(model, "operations", ()))


def _scalar(value) -> float | None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return float(value)
    return None


def _rescaling(op, args: tuple, kwargs: dict) -> tuple[float, float, object]:
    """(scale, offset, tensor) of an ops node computing an affine function of one tensor
    with a scalar (module docstring), or a ValueError naming the op."""
    kind = type(op).__name__
    keras_op = type(op).__module__.startswith("keras.") and kind in _AFFINE_OPS
    if keras_op and len(args) == 2 and not kwargs:
        tensors = [isinstance(a, keras.KerasTensor) for a in args]
        constants = [_scalar(a) for a in args]
        if tensors == [True, False] and constants[1] is not None:
            c = constants[1]
            return {
                "Add": (1.0, c),
                "Subtract": (1.0, -c),
                "Multiply": (c, 0.0),
                "Divide": (1.0 / c if c else None, 0.0),
                "TrueDivide": (1.0 / c if c else None, 0.0),
            }[kind] + (args[0],)
        if tensors == [False, True] and constants[0] is not None and kind != "Divide":
            c = constants[0]
            affine = {"Add": (1.0, c), "Subtract": (-1.0, c), "Multiply": (c, 0.0)}.get(kind)
            if affine is not None:
                return affine + (args[1],)
    raise ValueError(
        f"Operation {op.name!r} ({type(op).__module__}.{kind}) is a Keras-ops node that the "
        "readers cannot follow; supported are only a tensor plus, minus, times or divided by "
        "a Python scalar (read as a Rescaling layer). Wrap other computations in a layer."
    )


def as_layers(model: keras.Model) -> keras.Model:
    """``model`` itself when all its operations are layers, else an equal functional model
    whose scalar ops nodes are ``Rescaling`` layers (module docstring) and whose layers are
    fresh copies (same names, configs and weights). ``model`` is not modified.

    Raises:
        ValueError: for an ops node that is not an affine function of one tensor with a
            scalar (or one whose divisor is zero), named in the message.
    """
    if not has_ops_nodes(model):
        return model
    names = {op.name for op in model.operations}
    rebuilt = {}
    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name) for t in model.inputs]
    for old, new in zip(model.inputs, inputs):
        rebuilt[id(old)] = new
    copies = []

    def rebuild(tensor):
        if id(tensor) not in rebuilt:
            op, node_index, tensor_index = tensor._keras_history
            node = op._inbound_nodes[node_index]
            args = keras.tree.map_structure(
                lambda a: rebuild(a) if isinstance(a, keras.KerasTensor) else a, node.arguments.args
            )
            kwargs = keras.tree.map_structure(
                lambda a: rebuild(a) if isinstance(a, keras.KerasTensor) else a,
                node.arguments.kwargs,
            )
            if isinstance(op, keras.layers.Layer):
                copy = op.__class__.from_config(op.get_config())
                outputs = copy(*args, **kwargs)
                copies.append((copy, op))
            else:
                scale, offset, x = _rescaling(op, node.arguments.args, node.arguments.kwargs)
                if scale is None:
                    raise ValueError(f"Operation {op.name!r} divides by zero.")
                name = op.name
                while name in names - {op.name}:
                    name += "_op"
                outputs = keras.layers.Rescaling(scale, offset, name=name)(rebuild(x))
            flat = keras.tree.flatten(outputs)
            for old, new in zip(keras.tree.flatten(node.outputs), flat):
                rebuilt[id(old)] = new
            if id(tensor) not in rebuilt:
                rebuilt[id(tensor)] = flat[tensor_index]
        return rebuilt[id(tensor)]

    outputs = keras.tree.map_structure(rebuild, model.output)
    result = keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs, name=model.name)
    for copy, original in copies:
        copy.set_weights(original.get_weights())
    return result

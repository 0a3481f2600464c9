"""mtz_tf: Multi-Task Zipping and within-model compression for Keras models.

The public API: :func:`zip_models` with :class:`Retrain`, the :class:`ZippedDense` layer,
and the modules ``data``, ``models``, ``hessian``, ``cost``, ``matching``, ``graph``.
"""

from mtz_tf import cost, data, graph, hessian, matching, models, stack, training
from mtz_tf.layers import ChannelMajorFlatten, ZippedConv2D, ZippedDense
from mtz_tf.report import LayerReport, ZipReport
from mtz_tf.retrain import Retrain
from mtz_tf.zipper import add_task, zip_models

__version__ = "0.1.0"

__all__ = [
    "LayerReport",
    "Retrain",
    "add_task",
    "ZipReport",
    "ChannelMajorFlatten",
    "ZippedConv2D",
    "ZippedDense",
    "cost",
    "data",
    "graph",
    "hessian",
    "matching",
    "models",
    "stack",
    "training",
    "zip_models",
]

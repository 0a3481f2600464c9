"""mtz_tf: Multi-Task Zipping and within-model compression for Keras models.

The public API: :func:`zip_models` and :func:`add_task` with :class:`Retrain`,
:func:`describe` (what zipping will do with a model), the zipped
layers (:class:`ZippedDense`, :class:`ZippedConv2D`), deployment (:func:`export`,
:func:`deployment_report`), and the modules ``data``, ``models``, ``hessian``, ``cost``,
``matching``, ``repair``, ``frontier``, ``graph``, ``zipped_network``, ``training``, and
``progress`` (where progress messages go: the ``mtz_tf`` logger).
"""

from mtz_tf import (
    checkpoint,
    compress,
    cost,
    data,
    frontier,
    graph,
    hessian,
    io_utils,
    matching,
    models,
    progress,
    repair,
    training,
    zipped_network,
)
from mtz_tf.allocation import ShareBudget, shared_parameter_fraction
from mtz_tf.deploy_report import DeploymentReport, deployment_report, size_speed_report
from mtz_tf.exporter import ParityError, export
from mtz_tf.graph import describe
from mtz_tf.layers import ChannelMajorFlatten, ZippedConv2D, ZippedDense
from mtz_tf.report import LayerReport, ZipReport
from mtz_tf.retrain import Retrain, RetrainingDivergedError
from mtz_tf.zipper import add_task, zip_models

__version__ = "0.1.0"

__all__ = [
    "ChannelMajorFlatten",
    "DeploymentReport",
    "LayerReport",
    "ParityError",
    "Retrain",
    "RetrainingDivergedError",
    "ShareBudget",
    "ZipReport",
    "ZippedConv2D",
    "ZippedDense",
    "add_task",
    "checkpoint",
    "compress",
    "cost",
    "data",
    "deployment_report",
    "describe",
    "export",
    "frontier",
    "graph",
    "hessian",
    "io_utils",
    "matching",
    "models",
    "progress",
    "repair",
    "shared_parameter_fraction",
    "size_speed_report",
    "zipped_network",
    "training",
    "zip_models",
]

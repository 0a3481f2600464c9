"""mtz_tf: Multi-Task Zipping and within-model compression for Keras models."""

from mtz_tf import data, graph, models

__version__ = "0.1.0"

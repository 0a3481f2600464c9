"""Within-model compressors: Neuron Merging and ISTA channel pruning."""

from mtz_tf.compress import criteria, neuron_merging, surgery
from mtz_tf.compress.neuron_merging import LayerReport as NeuronMergingReport
from mtz_tf.compress.neuron_merging import compress as merge_neurons
from mtz_tf.compress.neuron_merging import prunable_layers

__all__ = [
    "NeuronMergingReport",
    "criteria",
    "merge_neurons",
    "neuron_merging",
    "prunable_layers",
    "surgery",
]

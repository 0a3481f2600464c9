"""Within-model compressors: Neuron Merging and ISTA channel pruning."""

from mtz_tf.compress import (
    bn_graph,
    criteria,
    flops,
    ista,
    l1_filter_pruning,
    neuron_merging,
    surgery,
)
from mtz_tf.compress.bn_graph import read_bn_graph
from mtz_tf.compress.flops import count_flops
from mtz_tf.compress.ista import (
    ISTASGD,
    ISTAReport,
    fine_tune,
    ista_prune,
    memory_lambdas,
    recalibrate_batchnorm,
    remove_zero_channels,
    rescale_gamma,
    soft_threshold,
    train_sparse,
)
from mtz_tf.compress.l1_filter_pruning import l1_filter_prune, l1_filter_prune_to_params
from mtz_tf.compress.neuron_merging import NeuronMergingReport, PrunedLayer, prunable_layers
from mtz_tf.compress.neuron_merging import compress as merge_neurons

__all__ = [
    "ISTAReport",
    "ISTASGD",
    "NeuronMergingReport",
    "PrunedLayer",
    "bn_graph",
    "count_flops",
    "criteria",
    "fine_tune",
    "flops",
    "ista",
    "ista_prune",
    "l1_filter_prune",
    "l1_filter_prune_to_params",
    "l1_filter_pruning",
    "memory_lambdas",
    "merge_neurons",
    "neuron_merging",
    "prunable_layers",
    "read_bn_graph",
    "recalibrate_batchnorm",
    "remove_zero_channels",
    "rescale_gamma",
    "soft_threshold",
    "surgery",
    "train_sparse",
]

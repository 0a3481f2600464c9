"""Within-model compressors: Neuron Merging and ISTA channel pruning."""

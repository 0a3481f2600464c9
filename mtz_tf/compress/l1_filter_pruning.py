"""l1-norm filter pruning (Li, Kadav, Durdanovic, Samet, Graf, ICLR 2017), a baseline for ISTA.

In every prunable channel group (see :mod:`mtz_tf.compress.bn_graph`) channel c is scored by
the l1 norm of the filters that write it, summed over the group's writers (for a residual
stream: every block adding into it),

    s_c = sum_w sum_{kh,kw,i} |K_w[kh, kw, i, c]|,

and the same fraction f of channels is kept in every group: the round(f * C) (at least 1)
with the largest s_c. Pruned channels are deleted outright, as in the paper: the BatchNorm
outputs of those filters are dropped, nothing is absorbed into the readers. Fine-tune after.
"""

from __future__ import annotations

from collections.abc import Collection

import keras
import numpy as np

from mtz_tf import scalar_ops
from mtz_tf.compress import bn_graph, ista, surgery


def l1_filter_prune(
    model: keras.Model, keep_fraction: float, bn_names: Collection[str] | None = None
) -> keras.Model:
    """Returns a physically smaller copy of ``model`` keeping the largest-l1 filters.

    Args:
        model: keras.Model with Conv2D/Dense -> BatchNorm blocks; not modified.
        keep_fraction: float in (0, 1], fraction of channels kept in each pruned group.
        bn_names: optional collection of BatchNorm names; only groups all of whose writers
            are named are pruned (None: every prunable group).

    Returns:
        The pruned model.

    Raises:
        ValueError: for ``keep_fraction`` outside (0, 1] or a model without BatchNorm.
    """
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"`keep_fraction` must be in (0, 1]. Received: {keep_fraction}")
    model = scalar_ops.as_layers(model)  # Keras-ops nodes read as layers
    graph = bn_graph.read_bn_graph(model)
    ista._require_bn(model, graph)
    weights = {}
    for group in graph.prunable_groups:
        if bn_names is not None and not all(w.bn in bn_names for w in group.writers):
            continue
        scores = np.zeros(group.width)
        for w in group.writers:
            kernel = model.get_layer(w.producer).kernel.numpy()
            scores += np.abs(kernel).reshape(-1, group.width).sum(axis=0)  # (C,)
        keep = max(1, int(round(keep_fraction * group.width)))
        pruned = np.argsort(-scores, kind="stable")[keep:]
        for w in group.writers:
            layer = model.get_layer(w.bn)
            named = {v.path.split("/")[-1]: v.numpy().copy() for v in layer.weights}
            for key in ("gamma", "beta"):
                if key in named:
                    named[key][pruned] = 0.0  # output ReLU(0) = 0: plain deletion
            weights[w.bn] = [named[v.path.split("/")[-1]] for v in layer.weights]
    return ista.remove_zero_channels(surgery.rebuild(model, {}, weights))


def l1_filter_prune_to_params(
    model: keras.Model,
    target_params: int,
    bn_names: Collection[str] | None = None,
    iterations: int = 20,
) -> tuple[keras.Model, float]:
    """:func:`l1_filter_prune` with the keep fraction bisected to ``target_params``.

    Returns:
        ``(pruned, keep_fraction)``: the pruned model with the largest parameter count that
        is at most ``target_params`` (or the smallest reachable one), and the fraction used.
    """
    if target_params <= 0:
        raise ValueError(f"`target_params` must be positive. Received: {target_params}")
    low, high = 0.0, 1.0
    best = None
    for _ in range(iterations):
        mid = (low + high) / 2
        pruned = l1_filter_prune(model, max(mid, 1e-6), bn_names)
        if pruned.count_params() <= target_params:
            best, low = (pruned, mid), mid
        else:
            high = mid
    if best is None:
        best = (l1_filter_prune(model, 1e-6, bn_names), 1e-6)
    return best

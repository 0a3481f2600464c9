"""Automatic per-layer share counts from a global target.

Sharing a pair in layer l costs its merge cost c (ΔE) and saves up to s_l parameters: the
shared neuron's incoming weights are stored once instead of T times once its inputs are
shared too, s_l = (T − 1)·(P·d_in + 1) (P kernel positions, d_in input channels, +1 the
bias). Using the full fan-in rather than the currently shared one keeps a layer whose
inputs are not shared yet from looking free (it enables the savings downstream).
Taking pairs cheapest-first *per saved parameter* across layers means sharing, in every
layer, the greedy-order pairs with c / s_l <= λ for one global threshold λ. A pass zips the
layers in order without retraining, so each layer's costs are those of the network zipped
so far, and picks k_l by that rule; λ is then found by bisection on log λ so that the
target is met:

* ``parameters=f``: the fraction of every task's parameters that are shared,
  Σ_t shared_t / Σ_t params_t, reaches at least f (as close as the λ grid allows);
* ``cost=b``: the summed merge cost over all layers stays at most b.

The layers writing into one residual stream share one count: a stream's pairs are ranked
by their summed writer costs per parameter saved over all its writers (in a chain every
stream is one layer), and the pass zips the network as :mod:`mtz_tf.driver` does.
"""

from __future__ import annotations

import dataclasses

from mtz_tf import driver, zipped_network
from mtz_tf.report import ZipReport


@dataclasses.dataclass(frozen=True)
class ShareBudget:
    """A global sharing target for :func:`mtz_tf.zip_models` (``share=ShareBudget(...)``).

    Attributes:
        parameters: float in [0, 1] or None, the fraction of every task's parameters to
            share.
        cost: float >= 0 or None, the largest total merge cost ΔE to accept.
        steps: int, bisection steps on log10 λ over ``LOG_THRESHOLD_RANGE``.
    """

    parameters: float | None = None
    cost: float | None = None
    steps: int = 20

    def __post_init__(self):
        if (self.parameters is None) == (self.cost is None):
            raise ValueError(
                "Give exactly one of `parameters` (a fraction) or `cost` (a total merge "
                f"cost). Received: parameters={self.parameters}, cost={self.cost}"
            )
        if self.parameters is not None and not 0.0 <= self.parameters <= 1.0:
            raise ValueError(f"`parameters` must be in [0, 1]. Received: {self.parameters}")
        if self.cost is not None and self.cost < 0:
            raise ValueError(f"`cost` must be non-negative. Received: {self.cost}")


LOG_THRESHOLD_RANGE = (-12.0, 12.0)
"""The interval of log10 λ searched by :func:`allocate`."""


def shared_parameter_fraction(model) -> float:
    """Σ_t (shared parameters task t uses) / Σ_t (parameters of task t's view)."""
    shared_total = uses = 0
    for layer in zipped_network.zipped_layers(model):
        shared, specific = layer.parameter_counts()
        users = sum(1 for t in range(len(layer.task_names)) if layer.shared_count(t))
        shared_total += shared * users
        uses += specific
    denominator = shared_total + uses
    return shared_total / denominator if denominator else 0.0


def _threshold_pass(plans, models, states, calibration, config, widths, lam):
    """Zips every hidden unit (no retraining) as :func:`mtz_tf.driver.zip_graph`
    does, sharing the greedy-order pairs with c / s <= lam: one count per stream (a unit
    alone in a chain), from the stream's summed writer costs per parameter saved by all
    its writers."""
    task_names = list(models)
    report = ZipReport(tasks=task_names, matching=config["matching"])
    model = driver.zip_graph(
        plans[task_names[0]],
        plans,
        models,
        task_names,
        states,
        calibration,
        list(widths),
        config,
        None,
        None,
        report,
        0,
        threshold=lam,
    )
    counts = [state.shared_units for state in states[: len(widths)]]
    return (
        counts,
        sum(layer.merge_cost for layer in report.layers),
        shared_parameter_fraction(model),
    )


def allocate(plans, models, calibration, budget: ShareBudget, config, batch_norm, widths):
    """Per-layer shared counts meeting ``budget`` (module docstring); returns (counts, info).

    For a parameter target the smallest λ that reaches it is kept, for a cost budget the
    largest λ that stays within it (λ = 0 shares only cost-free pairs, so it always does).
    """
    by_parameters = budget.parameters is not None

    def run(lam):
        states = zipped_network.separate_states(plans, models, batch_norm)
        return _threshold_pass(plans, models, states, calibration, config, widths, lam)

    def meets(result):
        _, total, fraction = result
        return fraction >= budget.parameters if by_parameters else total <= budget.cost

    # Bisection on log10 λ: merge costs per saved parameter span many decades, and their
    # scale depends on the data, so a linear search would miss small ones.
    low, high = LOG_THRESHOLD_RANGE
    top = run(10.0**high)
    if by_parameters:
        best = (10.0**high, top)
        if not meets(top):  # even sharing (nearly) everything misses it: nothing to search
            low = high
    elif meets(top):  # everything shared stays within the cost budget: nothing to search
        best, low = (10.0**high, top), high
    else:
        best = (0.0, run(0.0))
    for _ in range(budget.steps if low < high else 0):
        middle = 0.5 * (low + high)
        result = run(10.0**middle)
        if meets(result):
            best = (10.0**middle, result)
            high, low = (middle, low) if by_parameters else (high, middle)
        else:
            high, low = (high, middle) if by_parameters else (middle, low)
    lam, (counts, total, fraction) = best
    return counts, {
        "target": dataclasses.asdict(budget),
        "threshold": lam,
        "counts": counts,
        "estimated_merge_cost": total,
        "estimated_shared_parameter_fraction": fraction,
    }

"""The zip driver: every graph, a chain being one whose streams each have one unit.

In a residual network an ``Add`` sums the outputs of several units channel by channel, so
those units' channels are *coupled* (:class:`mtz_tf.graph.CoupledGroup`): every unit
writing into one stream must put its neurons in the same order, or the sum would mix
unrelated channels. Such a group is zipped with one matching for all its writers, chosen
from the summed merge cost Σ_w ΔE_w of every writer w; each writer then ties its own
neurons at those positions with its own Hessians. Units outside coupled groups (every
unit of a chain) are groups of one: their matching comes from their own cost alone.

Order. Units are visited in topological order. A group's matching is chosen when its first
writer is reached; every writer's output columns (and BatchNorm parameters) and every
reader's input rows are permuted to [matched, in pair order; the rest] at once, and each
writer ties its matched neurons when it is reached itself (its input is aligned by then).

The cycle. A stream's later writers (a block's second conv) read units (the block's first
conv) that read the stream itself, so when the stream's matching is chosen their inputs
are not aligned across tasks yet and ΔE is undefined for them. Their cost then uses a
*provisional alignment*, computed first on the input models: every group in order is
matched in full (all neurons) from the summed costs of its writers whose inputs are
aligned by the groups matched before; a second sweep, with every input aligned by the
first, refines it. Writers whose inputs are aligned in the zipped network use its current
Hessians; the others the input models' Hessians under the provisional alignment, with
task 0's weights standing in for the group of tasks already matched.
"""

from __future__ import annotations

import dataclasses
import time

import keras
import numpy as np
import tensorflow as tf

from mtz_tf import cost, frontier, graph, hessian, layer_zip, repair, zipped_network
from mtz_tf import matching as matching_lib
from mtz_tf.retrain import after_layer

PROVISIONAL_SWEEPS = 2
"""Sweeps of the provisional alignment (the second sees every writer's input aligned)."""


@dataclasses.dataclass
class _Topology:
    """Groups of units sharing one neuron order, who reads them, and the shared counts.

    A unit reading a ``Concatenate`` of several groups' outputs, or a spanning channel-wise
    unit (:meth:`mtz_tf.graph.Plan.spans`), is a *follower* of each of them: the
    concatenation is laid out shared-first (:class:`mtz_tf.layers.SharedFirstConcatenate`:
    every segment's shared channels, then every segment's own), and a follower's input rows
    (a spanning unit's channels) are kept in that layout, which changes as each group's
    count is laid out (``laid_out``) when the group is matched.
    """

    groups: list  # tuples of unit indices
    group_of: dict  # unit index -> group index (spanning units have none)
    source: dict  # unit index -> the one group it reads, or None
    readers: dict  # group index -> unit indices reading it alone
    shares: list  # per group, neurons shared
    segments: dict  # follower unit index -> [(group, unit index) per segment it reads]
    followers: dict  # group index -> follower unit indices
    laid_out: set  # groups whose shared count the followers' layouts lead with

    def inputs_decided(self, unit: int, decided: set) -> bool:
        """Whether every group ``unit`` reads is in ``decided``."""
        if unit in self.segments:
            return all(g in decided for g, _ in self.segments[unit])
        return self.source[unit] is None or self.source[unit] in decided

    def unit_share(self, unit: int) -> int:
        """Neurons ``unit`` shares: its group's, or a spanning unit's segments' sum."""
        if unit in self.group_of:
            return self.shares[self.group_of[unit]]
        return sum(self.shares[g] for g, _ in self.segments[unit])


def topology(plan: graph.Plan, shares: list[int]) -> _Topology:
    """The zip groups of ``plan`` with per-group shares from per-hidden-unit ``shares``
    (a spanning unit's entry is not used: it shares what its segments share).

    Raises:
        ValueError: if the units of one coupled group were given different shares, or a
            unit reading a Concatenate of several groups writes into a residual stream.
    """
    groups = plan.zip_groups()
    group_of = {u: g for g, members in enumerate(groups) for u in members}
    inputs = {u: plan.input_segments(u, groups) for u in range(len(plan.units))}
    source = {u: segs[0][0] if len(segs) == 1 else None for u, segs in inputs.items()}
    segments = {u: segs for u, segs in inputs.items() if len(segs) > 1}
    readers = {g: [u for u, s in source.items() if s == g] for g in range(len(groups))}
    followers = {
        g: sorted({u for u, segs in segments.items() if g in dict(segs)})
        for g in range(len(groups))
    }
    for u in segments:
        others = [w for w in groups[group_of[u]] if w != u] if u in group_of else []
        if any(not graph.is_channelwise(plan.units[w]) for w in others):
            raise ValueError(
                f"Layer {plan.units[u].name!r} reads a Concatenate of several layers' outputs "
                "and writes into a residual stream; zipping takes Concatenate readers outside "
                "residual streams only (as in DenseNet)."
            )
    per_group = []
    for members in groups:
        counts = {shares[u] for u in members}
        if len(counts) != 1:
            names = [plan.units[u].name for u in members]
            raise ValueError(
                f"Layers {names} write into one residual stream and must share the same "
                f"number of neurons. Received shares {[shares[u] for u in members]}."
            )
        per_group.append(counts.pop())
    return _Topology(groups, group_of, source, readers, per_group, segments, followers, set())


def _full(state: zipped_network.LayerState) -> zipped_network.LayerState:
    """``state`` seen with all its input rows aligned (for layouts of whole kernels)."""
    return dataclasses.replace(state, input_shared_units=state.kernels[0].shape[-2])


def _hessian_index(state: zipped_network.LayerState, channels: np.ndarray, mode: str) -> np.ndarray:
    """Rows/columns of the layer-input Hessian that input channels ``channels`` occupy (in
    that order), the bias row last."""
    if state.kind == "Dense":
        rows, size = _row_index(state, channels), state.kernels[0].shape[-2]
    elif mode == "channel":
        rows, size = channels, state.kernels[0].shape[-2]
    else:
        c_in = state.kernels[0].shape[-2]
        positions = int(np.prod(state.kernel_prefix))
        rows = (np.arange(positions)[:, None] * c_in + channels[None, :]).ravel()
        size = positions * c_in
    return np.append(rows, size) if state.use_bias else rows


def _row_index(state: zipped_network.LayerState, channels: np.ndarray) -> np.ndarray:
    """Kernel input rows (axis −2) of input channels ``channels``."""
    group = state.input_group
    return (channels[:, None] * group + np.arange(group)).ravel()


def original_hessians(plans, models, states, calibration, mode) -> list:
    """Per hidden unit, each task's full layer-input Hessian in its input model (NumPy)."""
    per_task = []
    for task, model in models.items():
        units = plans[task].hidden_units
        feature_model = keras.Model(
            model.input, [model.get_layer(unit.name).input for unit in units]
        )

        def features(batch, feature_model=feature_model):
            rows = []
            for x, state in zip(feature_model(batch, training=False), states):
                if state.kind == "Dense" and state.input_group > 1:
                    # Keras flattens (h, w, c); zipped kernels are channel-major (c, h, w).
                    n = tf.shape(x)[0]
                    x = tf.reshape(x, [n, state.input_group, -1])
                    x = tf.reshape(tf.transpose(x, [0, 2, 1]), [n, -1])
                rows.append(layer_zip.hessian_rows(x, state, mode))
            return rows

        bias = [state.use_bias for state in states[: len(units)]]
        description = f"calibration data of task {task!r}"
        if tf.distribute.get_strategy().num_replicas_in_sync > 1:
            hessians, _ = hessian.input_hessians(features, calibration[task], bias, description)
        else:  # a few batches: eager beats tracing the whole model
            (hessians,) = hessian.eager_moments(
                lambda batch, _: features(batch), [calibration[task]], bias, [description]
            )
        per_task.append([h.numpy() for h in hessians])
    return [list(h) for h in zip(*per_task)]


def provisional_alignment(top: _Topology, states, hessians, config, rng) -> dict:
    """Full matchings of every group on the input models (module docstring).

    Returns:
        {group: [(rows of task 0, rows of task t)] per task t ≥ 1}: matched neuron
        indices, task 0's in ascending order.
    """
    mode = config["hessian"]
    aligned: dict = {}
    for _ in range(PROVISIONAL_SWEEPS):
        for g, members in enumerate(top.groups):
            pairs = []
            for t in range(1, len(states[0].kernels)):
                costs = 0.0
                for w in (w for w in members if w not in top.segments):
                    # A Concatenate reader (a group of its own) has no provisional view.
                    view = _aligned_view(states[w], hessians[w], top.source[w], aligned, t, mode)
                    if view is not None:
                        costs = costs + layer_zip.pair_costs(*view, config, rng)
                if np.isscalar(costs):  # no writer has aligned inputs yet: keep index order
                    n = min(states[members[0]].units[0], states[members[0]].units[t])
                    pairs.append((np.arange(n), np.arange(n)))
                    continue
                rows, cols = matching_lib.match(costs, min(costs.shape), config["matching"])
                order = np.argsort(rows)
                pairs.append((rows[order], cols[order]))
            aligned[g] = pairs
    return aligned


def _aligned_view(state, hessians, source, aligned, t, mode):
    """(w_0, w_t, H_0, H_t) of a unit in the input models with task t's input rows put in
    task 0's order by the provisional alignment of ``source``, or None if not aligned."""
    full = _full(state)
    kernels = [state.kernels[0], state.kernels[t]]
    h = [hessians[0], hessians[t]]
    if source is not None:
        if source not in aligned:
            return None
        channels = aligned[source][t - 1]
        kernels = [k[..., _row_index(state, c), :] for k, c in zip(kernels, channels)]
        h = [m[np.ix_(i, i)] for m, i in zip(h, (_hessian_index(state, c, mode) for c in channels))]
        full = dataclasses.replace(full, input_shared_units=kernels[0].shape[-2])
    w = [
        layer_zip.cost_layout(full, kernel, bias, mode)
        for kernel, bias in zip(kernels, (state.biases[0], state.biases[t]))
    ]
    return w[0], w[1], h[0], h[1]


def _current_layouts(state, mode):
    """Each task's layout of its own neurons on the shared inputs."""
    return [layer_zip.cost_layout(state, k, b, mode) for k, b in zip(state.kernels, state.biases)]


def decide_group(
    g, top, states, current, provisional, original, config, rng, threshold=None
) -> list:
    """Chooses group ``g``'s matching from the summed costs of its writers.

    ``current`` maps each writer whose input is aligned in the zipped network to its
    current per-task Hessians; the other writers use ``provisional``/``original``.
    Tasks join one at a time: task 1 ties k of its neurons to k of task 0's, every further
    task ties k of its neurons to the k of the group (its weights the Hessian-weighted
    merge of its members, its Hessian Σ H_t).

    With a ``threshold`` λ (:mod:`mtz_tf.allocation`) the group's k is chosen here and
    stored in ``top.shares``: the greedy-order pairs of tasks 0 and 1 whose summed cost per
    saved parameter (saved over all the group's writers) is at most λ.

    Returns:
        Per task, the indices of its k matched neurons in pair order.
    """
    mode, k = config["hessian"], top.shares[g]
    num_tasks = len(states[top.groups[g][0]].kernels)
    if k == 0 and threshold is None:
        return [np.zeros(0, dtype=np.int64)] * num_tasks
    layouts = {w: _current_layouts(states[w], mode) for w in current}
    group = {w: (layouts[w][0], current[w][0]) for w in current}  # (weights, Σ H) so far
    picked = [None] * num_tasks
    for t in range(1, num_tasks):
        costs = 0.0
        for w in top.groups[g]:
            if w in current:
                w_g, h_g = group[w]
                costs = costs + layer_zip.pair_costs(
                    w_g, layouts[w][t], h_g, current[w][t], config, rng
                )
            elif provisional is not None:
                view = _aligned_view(states[w], original[w], top.source[w], provisional, t, mode)
                w_0, w_t, h_0, h_t = view
                if t > 1:  # task 0's matched neurons stand in for the group
                    w_0, h_0 = w_0[..., picked[0]], layer_zip.neurons(h_0, picked[0])
                costs = costs + layer_zip.pair_costs(w_0, w_t, h_0, h_t, config, rng)
        seeding = t == 1
        if seeding and threshold is not None:
            k = top.shares[g] = _threshold_count(
                costs, [states[w] for w in top.groups[g]], threshold
            )
            if k == 0:
                return [np.zeros(0, dtype=np.int64)] * num_tasks
        rows, cols = matching_lib.match(costs, k if seeding else costs.shape[0], config["matching"])
        if seeding:
            picked[0] = rows
        else:
            order = np.argsort(rows)
            rows, cols = rows[order], cols[order]
        picked[t] = cols
        for w, (w_g, h_g) in group.items():
            if seeding:
                w_g, h_g = w_g[..., rows], layer_zip.neurons(h_g, rows)
            h_t = layer_zip.neurons(current[w][t], cols)
            pair = [w_g, layouts[w][t][..., cols]]
            merged = cost.merged_weights(pair, [h_g, h_t], config["damping"]).numpy()
            group[w] = (merged, h_g + h_t)
    return picked


def _threshold_count(costs: np.ndarray, writers: list, threshold: float) -> int:
    """Greedy-order pairs whose cost per saved parameter is at most ``threshold``."""
    rows, cols = matching_lib.greedy(costs, min(costs.shape))
    saving = sum(layer_zip.saving_per_pair(state, len(state.kernels)) for state in writers)
    return int(np.sum(costs[rows, cols] / saving <= threshold))


def decide_newcomer(g, top, states, current, pair_states, provisional, original, config, rng):
    """Chooses which neurons of a task joining a zipped network (the last task) tie to
    group ``g``'s k shared neurons, from the summed costs of the group's writers.

    A writer whose input is aligned for the newcomer costs the shared weights (Hessian
    Σ H_t of the tasks using them) against the newcomer's neurons in the current network;
    the others use the provisional alignment of ``pair_states`` (the first zipped task's
    view, standing in for the group, and the newcomer's input model).

    Returns:
        The newcomer's k matched neuron indices, in the shared neurons' order.
    """
    mode, k = config["hessian"], top.shares[g]
    newcomer = len(states[top.groups[g][0]].kernels) - 1
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    costs = 0.0
    for w in top.groups[g]:
        state = states[w]
        if w in current:
            members = [t for t, s in enumerate(state.sharing) if s and t != newcomer]
            w_group = layer_zip.cost_layout(state, state.shared_kernel, state.shared_bias, mode)
            w_new = layer_zip.cost_layout(
                state, state.kernels[newcomer], state.biases[newcomer], mode
            )
            h_group = layer_zip.neurons(tf.add_n([current[w][t] for t in members]), slice(k))
            costs = costs + layer_zip.pair_costs(
                w_group, w_new, h_group, current[w][newcomer], config, rng
            )
        elif provisional is not None:
            w_0, w_new, h_0, h_new = _aligned_view(
                pair_states[w], original[w], top.source[w], provisional, 1, mode
            )
            h_0 = layer_zip.neurons(h_0, slice(k))
            costs = costs + layer_zip.pair_costs(w_0[..., :k], w_new, h_0, h_new, config, rng)
    rows, cols = matching_lib.match(costs, k, config["matching"])
    return cols[np.argsort(rows)]


def _newcomer_alignment(plan, zipped, old_task, task, model, newcomer, top, calibration, config):
    """The provisional alignment of a joining task's input model with the first zipped
    task's view, on their own Hessians; returns (pair_states, original, provisional)."""
    mode = config["hessian"]
    hidden = len(plan.hidden_units)
    zipped_states = zipped_network.read_states(zipped, plan)[:hidden]
    pair_states = []
    for layer, own in zip(zipped_network.zipped_layers(zipped)[:hidden], newcomer):
        kernel, bias = layer.task_weights(old_task)
        kernel = np.asarray(kernel, np.float64)
        bias = np.zeros(kernel.shape[-1]) if bias is None else np.asarray(bias, np.float64)
        pair_states.append(
            dataclasses.replace(
                own,
                kernels=[kernel, own.kernels[0]],
                biases=[bias, own.biases[0]],
                norms=[],
                sharing=[False, False],
            )
        )
    whole_inputs = [_full(dataclasses.replace(s, kernels=s.kernels[:1])) for s in zipped_states]
    view_hessians = layer_zip.layers_hessians(
        zipped,
        zipped_network.zipped_layers(zipped)[:hidden],
        whole_inputs,
        frontier.FullPasses({old_task: calibration[old_task]}),
        mode,
    )
    own_hessians = original_hessians(
        {task: plan}, {task: model}, newcomer, {task: calibration[task]}, mode
    )
    original = [[v[0].numpy(), o[0]] for v, o in zip(view_hessians, own_hessians)]
    rng = np.random.default_rng([config["seed"], 7])
    return pair_states, original, provisional_alignment(top, pair_states, original, config, rng)


def permute_group(g, top, states, picked: dict, align: bool = True) -> None:
    """Puts every writer's neurons and every reader's input rows of group ``g`` in the order
    [matched, in pair order; the rest in original order] for each task t of ``picked``
    ({t: its matched neurons}); readers then take the first k channels as aligned inputs
    (``align``; a task joining a zipped model finds them aligned already). Followers
    (:class:`_Topology`) move to the shared-first layout with g's count laid out."""
    k = top.shares[g]
    before, after = set(top.laid_out), top.laid_out | {g}
    for t, chosen in picked.items():
        for f in top.followers[g]:
            _relayout(states, f, t, top, before, after, {g: chosen})
        n = states[top.groups[g][0]].kernels[t].shape[-1]
        order = np.concatenate([chosen, np.setdiff1d(np.arange(n), chosen)])
        for w in top.groups[g]:
            state = states[w]
            state.kernels[t] = state.kernels[t][..., order]
            state.biases[t] = state.biases[t][order]
            if state.norms:
                state.norms[t] = tuple(v[order] for v in state.norms[t])
        for r in top.readers[g]:
            reader = states[r]
            reader.kernels[t] = reader.kernels[t][..., _row_index(reader, order), :]
    top.laid_out.add(g)
    for r in top.readers[g] if align else ():
        layer_zip.align_inputs(states[r], k * states[r].input_group)
    for f in top.followers[g] if align else ():
        if states[f].kind not in graph.CHANNELWISE_KINDS:
            shared = sum(top.shares[s] for s, _ in top.segments[f] if s in top.laid_out)
            layer_zip.align_inputs(states[f], shared * states[f].input_group)


def _relayout(states, f, t, top, before: set, after: set, orders: dict) -> None:
    """Moves follower ``f``'s task-t input rows (a spanning unit's channels) from the
    shared-first layout of the groups ``before`` to that of ``after``, with the channels of
    each group g in ``orders`` reordered to ``orders[g]`` (all of its neurons, new order
    first matched; missing groups keep theirs).

    With L_b, L_a the layouts (natural channel per position) and π the reordering of the
    natural channels, position p of the new layout takes the old position of π(L_a[p]).
    """
    segments = top.segments[f]
    widths = [states[u].units[t] for _, u in segments]
    offsets = np.cumsum([0] + widths)[:-1]
    natural = np.arange(sum(widths))
    for (g, _), offset, n in zip(segments, offsets, widths):
        if g in orders:
            chosen = np.asarray(orders[g], dtype=np.int64)
            natural[offset : offset + n] = offset + np.concatenate(
                [chosen, np.setdiff1d(np.arange(n), chosen)]
            )

    def layout(laid):
        return zipped_network.shared_first_order(
            widths, [top.shares[g] if g in laid else 0 for g, _ in segments]
        )

    old = layout(before)
    position = np.empty_like(old)
    position[old] = np.arange(len(old))
    index = position[natural[layout(after)]]
    state = states[f]
    if state.kind in graph.CHANNELWISE_KINDS:  # its channels are its input's
        state.kernels[t] = state.kernels[t][..., index]
        state.biases[t] = state.biases[t][index]
        if state.norms:
            state.norms[t] = tuple(v[index] for v in state.norms[t])
    else:
        state.kernels[t] = state.kernels[t][..., _row_index(state, index), :]


def tie_unit(state: zipped_network.LayerState, k: int, hessians, config, joining=None) -> float:
    """Ties the first k neurons of every task in ``joining`` (default: all) into k shared
    ones, in place; returns the summed cost ½ Σ_t (w_t − w̃)ᵀ H_t (w_t − w̃) (true Hessians
    whatever the merge).

    If the unit shares neurons already (tasks joining a zipped model), its shared neurons
    enter the merge as one member with the summed Hessian Σ H_t of the tasks using them.
    """
    mode, damping = config["hessian"], config["damping"]
    joining = list(range(len(state.kernels)) if joining is None else joining)
    if k == 0:
        return 0.0
    layouts = [
        layer_zip.cost_layout(state, state.kernels[t], state.biases[t], mode)[..., :k]
        for t in joining
    ]
    weights = [layer_zip.neurons(hessians[t], slice(k)) for t in joining]
    sizes = [1] * len(joining)
    if state.shared_units:
        members = [t for t, s in enumerate(state.sharing) if s and t not in joining]
        layouts.insert(
            0, layer_zip.cost_layout(state, state.shared_kernel, state.shared_bias, mode)
        )
        weights.insert(0, layer_zip.neurons(tf.add_n([hessians[t] for t in members]), slice(k)))
        sizes.insert(0, len(members))
    if config["tie"] == "hessian":
        merged = cost.merged_weights(layouts, weights, damping).numpy()
    else:
        merged = np.average(layouts, axis=0, weights=sizes)
    total = float(tf.reduce_sum(cost.deviation_costs(layouts, weights, merged, damping)))
    k_in = state.input_shared_units
    for t in joining:
        state.cross_kernels[t] = state.kernels[t][..., k_in:, :k]
        state.kernels[t] = state.kernels[t][..., k:]
        state.biases[t] = state.biases[t][k:]
        state.sharing[t] = True
    state.shared_kernel, state.shared_bias = layer_zip.unpack_merged(state, merged, mode)
    state.shared_units = k
    return total


def propagate_common(plan: graph.Plan, states: list) -> None:
    """Sets each unit's ``common_input``: whether all tasks receive one tensor there."""
    common = {graph.MODEL_INPUT: True}
    states_iter = iter(states)
    for index, step in enumerate(plan.steps):
        inputs = [common[i] for i in step.inputs]
        if isinstance(step, graph.Unit):
            state = next(states_iter)
            state.common_input = inputs[0]
            common[index] = state.common_output
        else:
            common[index] = all(inputs)


def zip_graph(
    plan,
    plans,
    models,
    task_names,
    states,
    calibration,
    shares,
    config,
    retrain,
    evaluation,
    report,
    verbose,
    threshold=None,
    resume=None,
    save=None,
) -> keras.Model:
    """Zips every hidden unit of a residual network (module docstring); returns the model.

    Arguments as :func:`mtz_tf.zipper.zip_models`'s internals: ``states`` from
    :func:`mtz_tf.zipped_network.separate_states`, ``shares`` one count per hidden unit. With a
    ``threshold`` λ each stream's count is chosen by :func:`decide_group` instead (the
    allocation pass of :mod:`mtz_tf.allocation`; ``shares`` are then upper bounds).
    ``resume=(states, completed)`` continues a checkpointed zip whose first ``completed``
    units are done (the provisional alignment is recomputed from the input models, the
    streams those units write are matched already); ``save(model, completed)``, if given,
    checkpoints after every unit.
    """
    top = topology(plan, shares)
    began = time.time()
    original = provisional = None
    if any(len(members) > 1 for members in top.groups) and config["pairing"] != "random":
        original = original_hessians(plans, models, states, calibration, config["hessian"])
        rng = np.random.default_rng([config["seed"], 7])
        provisional = provisional_alignment(top, states, original, config, rng)
    _report_groups(report, plan, top, began)
    start = 0
    if resume is not None:
        states, start = resume

    def decide(g, current, u):
        rng = np.random.default_rng([config["seed"], u])
        picked = decide_group(
            g, top, states, current, provisional, original, config, rng, threshold
        )
        permute_group(g, top, states, dict(enumerate(picked)))

    run = (retrain, evaluation, report, verbose, save)
    return _walk(plan, task_names, states, top, calibration, config, decide, None, run, start)


def _report_groups(report, plan, top, began) -> None:
    report.alignment_seconds = time.time() - began
    report.coupled_groups = [
        [plan.units[w].name for w in members] for members in top.groups if len(members) > 1
    ]


def _walk(plan, task_names, states, top, calibration, config, decide, joining, options, start=0):
    """The unit loop of :func:`zip_graph` and :func:`join_graph`; returns the model.

    Per unit u from ``start``, in topological order: each task's Hessians of the writers of
    u's group whose inputs are aligned (all of them when the group is first reached, else u
    alone); ``decide(g, current, u)`` matches and permutes group g at its first writer;
    then u's first k neurons of the ``joining`` tasks (None: all) are tied, the model is
    rebuilt (reusing unchanged layers) and repaired (:func:`mtz_tf.repair.repair_unit`, once
    anything is tied), the layer is reported and retrained, and the calibration frontier
    (:mod:`mtz_tf.frontier`, which serves every calibration pass) moves past u.
    ``options`` is ``(retrain, evaluation, report, verbose, save)``; ``save(model,
    completed)`` checkpoints.
    """
    retrain, evaluation, report, verbose, save = options
    decided = {top.group_of[u] for u in range(start) if u in top.group_of}
    top.laid_out |= decided
    retrain_offset = sum(layer.retrain_steps for layer in report.layers)
    propagate_common(plan, states)
    model = zipped_network.build_model(plan, task_names, states)
    changed = any(state.shared_units for state in states[:start])  # anything tied yet
    feed = frontier.calibration_feed(plan, task_names, calibration)
    feed.reset(model, start)
    session = {}  # the retraining's trainer and batch stream, kept between units
    for u in range(start, len(plan.hidden_units)):
        began = time.time()
        g = top.group_of.get(u)  # None for a spanning unit: its order is its inputs'
        writers = top.groups[g] if g is not None and g not in decided else (u,)
        aligned = [w for w in writers if top.inputs_decided(w, decided)]
        layers = zipped_network.zipped_layers(model)
        hessians = layer_zip.layers_hessians(
            model,
            [layers[w] for w in aligned],
            [states[w] for w in aligned],
            feed,
            config["hessian"],
        )
        current = dict(zip(aligned, hessians))
        timings = {"hessians": time.time() - began}
        if g is not None and g not in decided:
            decide(g, current, u)
            decided.add(g)
            if repair.needs_before(states[u], config):  # in the new neuron order
                model = zipped_network.build_model(plan, task_names, states, reuse=model)
        timings["costs_matching"] = time.time() - began - sum(timings.values())
        merge_cost = tie_unit(states[u], top.unit_share(u), current[u], config, joining)
        changed = changed or top.unit_share(u) > 0
        propagate_common(plan, states)
        timings["merge"] = time.time() - began - sum(timings.values())
        before, model = model, zipped_network.build_model(plan, task_names, states, reuse=model)
        timings["rebuild"] = time.time() - began - sum(timings.values())
        repaired = (
            repair.repair_unit(
                before, model, plan, states, u, feed, config, top.unit_share(u) > 0, joining
            )
            if changed
            else ""
        )
        timings["repair"] = time.time() - began - sum(timings.values())
        layer_report, retrain_offset = after_layer(
            model,
            plan,
            states,
            u,
            merge_cost,
            retrain,
            evaluation,
            retrain_offset,
            began,
            timings,
            verbose,
            session,
        )
        layer_report.repair = repaired
        moved = time.time()
        if u + 1 < len(plan.hidden_units):  # nothing reads the last unit's frontier
            if layer_report.retrain_steps:  # every weight moved: the frontier is recomputed
                feed.reset(model, u + 1)
            else:
                feed.advance(model, u)
        layer_report.timings["frontier"] = time.time() - moved
        layer_report.seconds += layer_report.timings["frontier"]
        report.layers.append(layer_report)
        if save:
            save(model, u + 1)
    # The networks of the walk share layers (build_model's `reuse`): the result gets its own.
    return zipped_network.build_model(plan, task_names, states)


def join_graph(
    plan, zipped, task, model, task_names, states, newcomer, calibration, config, run
) -> keras.Model:
    """Zips one more task into a zipped residual network; returns the new model.

    ``states`` are the zipped network's with the newcomer appended as the last task
    (unshared, :func:`mtz_tf.zipper.add_task`), ``newcomer`` its own separate states. Each
    stream keeps its shared count; its matching for the newcomer is chosen from the summed
    writer costs (:func:`decide_newcomer`, provisional alignment against the first zipped
    task's view for the writers whose inputs are not aligned yet), and each writer's shared
    weights become the merge of the group (Σ H_t of its tasks) with the newcomer's matched
    neurons. The other tasks' own neurons are not touched. ``run`` is ``(retrain,
    evaluation, report, verbose)``.
    """
    retrain, evaluation, report, verbose = run
    hidden = plan.hidden_units
    top = topology(plan, [state.shared_units for state in states[: len(hidden)]])
    new = len(task_names) - 1
    rng = np.random.default_rng([config["seed"], 7])
    began = time.time()
    pair_states = original = provisional = None
    # The newcomer's Concatenate readers take the zipped network's shared-first layout.
    top.laid_out = set(range(len(top.groups)))
    for f in top.segments:
        _relayout(states, f, new, top, set(), top.laid_out, {})
    if any(len(members) > 1 for members in top.groups):
        pair_states, original, provisional = _newcomer_alignment(
            plan, zipped, task_names[0], task, model, newcomer, top, calibration, config
        )
    _report_groups(report, plan, top, began)

    def decide(g, current, u):
        picked = decide_newcomer(
            g, top, states, current, pair_states, provisional, original, config, rng
        )
        permute_group(g, top, states, {new: picked}, align=False)

    run = (retrain, evaluation, report, verbose, None)
    return _walk(plan, task_names, states, top, calibration, config, decide, [new], run)

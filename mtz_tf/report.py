"""The JSON-serializable reports of the library's methods: the one ``zip_models`` returns
(as a table and a figure) and the pattern every method's report follows.

Every report is a dataclass with ``params_before`` and ``params_after`` (``count_params``
of the input model(s) and of the result), ``to_dict()`` (plain JSON types) and
``to_json()``; :class:`Report` provides the last two."""

from __future__ import annotations

import dataclasses
import json

from mtz_tf import io_utils


class Report:
    """The serialisation every method's report dataclass shares."""

    def to_dict(self) -> dict:
        """The report as plain JSON types (``dataclasses.asdict``)."""
        return dataclasses.asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


@dataclasses.dataclass
class LayerReport:
    """What happened to one hidden layer.

    Attributes:
        name: str, layer name.
        widths: {task: neurons}.
        shared: int, neurons shared by all tasks.
        merge_cost: float, summed merge cost ΔE of the tied neurons (calibration Hessians).
        accuracy_before_retraining: {task: accuracy} right after zipping, or None.
        accuracy_after_retraining: {task: accuracy} after light retraining, or None.
        retrain_steps: int, joint retraining iterations after this layer.
        seconds: float, wall time for this layer (Hessians, costs, matching, retraining).
        timings: {phase: seconds}, the split of ``seconds``.
        repair: str, what repaired the network after the tie (:func:`mtz_tf.repair.repair_unit`):
            ``"batch_norm"``, ``"refit: <units>"``, ``"statistics: <units>"``, or ``""``.
    """

    name: str
    widths: dict
    shared: int
    merge_cost: float
    accuracy_before_retraining: dict | None = None
    accuracy_after_retraining: dict | None = None
    retrain_steps: int = 0
    seconds: float = 0.0
    timings: dict = dataclasses.field(default_factory=dict)
    repair: str = ""

    def progress_line(self, index: int, count: int) -> str:
        """The one-line progress message for hidden layer ``index`` of ``count``."""
        line = (
            f"[zip {index + 1}/{count}] {self.name}: shared {self.shared}/"
            f"{min(self.widths.values())}, merge cost {self.merge_cost:.4g}"
        )
        for label, acc in (
            ("acc zipped", self.accuracy_before_retraining),
            ("acc retrained", self.accuracy_after_retraining),
        ):
            if acc:
                line += f", {label} " + " ".join(f"{t}={a:.4f}" for t, a in acc.items())
        if self.repair:
            line += f", repair {self.repair}"
        if self.retrain_steps:
            line += f", {self.retrain_steps} retrain steps"
        return line + f" ({self.seconds:.1f}s)"


@dataclasses.dataclass
class ZipReport(Report):
    """Per-layer results and parameter counts of a zip.

    Attributes:
        tasks: list of task names.
        matching: str, ``"greedy"`` or ``"optimal"``.
        pairing: str, how pairs are chosen (``"hessian"``, ``"euclidean"``, ``"random"``).
        tie: str, the weights of a tied pair, ``"hessian"`` or ``"average"``.
        accuracy_original: {task: accuracy} of the input models, or None without labels.
        layers: list of :class:`LayerReport`, input to output.
        parameters: {"shared", "specific", "total", "input_models", "ratio"}; ratio is
            total / input_models.
        share_allocation: how a ``ShareBudget`` was turned into per-layer counts (target,
            threshold λ, counts, estimated cost and shared fraction), or None.
        coupled_groups: for a residual network, the layers of each residual stream
            (zipped with one matching), or None.
        alignment_seconds: time spent on the provisional alignment of residual streams.
        retrain_optimizer: the retraining optimizer, {"class_name", "config", "source"}
            (:func:`mtz_tf.retrain.resolve_optimizer`), or None without retraining.
        repair: str, the ``repair`` option (:data:`mtz_tf.repair.REPAIRS`).
    """

    tasks: list
    matching: str
    pairing: str = "hessian"
    tie: str = "hessian"
    accuracy_original: dict | None = None
    layers: list = dataclasses.field(default_factory=list)
    parameters: dict = dataclasses.field(default_factory=dict)
    share_allocation: dict | None = None
    coupled_groups: list | None = None
    alignment_seconds: float = 0.0
    retrain_optimizer: dict | None = None
    repair: str = "none"

    def __str__(self) -> str:
        return self.table()

    def _stream_numbers(self) -> dict:
        """{layer name: 1-based number of its residual stream} for stream members."""
        return {n: i + 1 for i, group in enumerate(self.coupled_groups or []) for n in group}

    def table(self) -> str:
        """The report as a table for the terminal (Markdown pipes): per hidden layer its
        stream, shared count / width, merge cost, each task's accuracy right after zipping
        (and repairing) and after retraining (when labels were given), the repair that ran,
        retraining steps and seconds; then the input models' accuracy and the parameter
        counts."""
        streams = self._stream_numbers()
        tasks = list(self.tasks)
        header = ["layer", "stream", "shared / width", "merge cost"]
        measured = [
            (label, key)
            for label, key in (
                ("zipped", "accuracy_before_retraining"),
                ("retrained", "accuracy_after_retraining"),
            )
            if any(getattr(layer, key) for layer in self.layers)
        ]
        header += [f"acc {label} {t}" for label, _ in measured for t in tasks]
        header += ["repair", "retrain steps", "seconds"]
        rows = []
        for layer in self.layers:
            row = [
                layer.name,
                str(streams.get(layer.name, "")),
                f"{layer.shared} / {min(layer.widths.values())}",
                f"{layer.merge_cost:.4g}",
            ]
            for _, key in measured:
                accuracy = getattr(layer, key) or {}
                row += [f"{accuracy[t]:.4f}" if t in accuracy else "" for t in tasks]
            rows.append(row + [layer.repair, str(layer.retrain_steps), f"{layer.seconds:.1f}"])
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
        ] + ["| " + " | ".join(row) + " |" for row in rows]
        if self.accuracy_original:
            original = ", ".join(f"{t} {a:.4f}" for t, a in self.accuracy_original.items())
            lines.append(f"\nAccuracy of the input models: {original}.")
        if self.parameters:
            p = self.parameters
            lines.append(
                f"Parameters: {p['input_models']:,} in the input models -> {p['total']:,} "
                f"zipped ({100 * p['ratio']:.1f} %), {p['shared']:,} of them shared."
            )
        if self.retrain_optimizer:
            o = self.retrain_optimizer
            rate = o["config"].get("learning_rate")
            rate = f"learning rate {rate:.3g}" if isinstance(rate, float) else f"{rate}"
            lines.append(f"Retraining optimizer: {o['class_name']}, {rate} ({o['source']}).")
        return "\n".join(lines)

    def figure(self):
        """A Matplotlib figure of the zip, per hidden layer (input to output): the shared
        count against the layer's width (the narrowest task's), the merge cost (log scale),
        and, when labels were given, each task's accuracy right after zipping the layer
        and after its retraining, the input models' accuracy as dashed lines. Layers of
        one residual stream carry its number (``s1``, ...)."""
        from matplotlib.figure import Figure

        names = [layer.name for layer in self.layers]
        streams = self._stream_numbers()
        labels = [f"{n}\n(s{streams[n]})" if n in streams else n for n in names]
        positions = list(range(len(names)))
        accuracy = self.accuracy_original is not None or any(
            layer.accuracy_before_retraining for layer in self.layers
        )
        rows = 3 if accuracy else 2
        figure = Figure(figsize=(max(6.0, 0.5 * len(names) + 2), 2.6 * rows))
        axes = figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
        widths = [min(layer.widths.values()) for layer in self.layers]
        axes[0].bar(positions, widths, color="0.85", label="width")
        axes[0].bar(positions, [layer.shared for layer in self.layers], label="shared")
        axes[0].set_ylabel("neurons")
        axes[0].legend(fontsize=7)
        costs = [max(layer.merge_cost, 1e-12) for layer in self.layers]
        axes[1].plot(positions, costs, "o-")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("merge cost")
        if accuracy:
            ax = axes[2]
            for index, task in enumerate(self.tasks):
                color = f"C{index}"
                for key, style, label in (
                    ("accuracy_before_retraining", "o--", "zipped"),
                    ("accuracy_after_retraining", "s-", "retrained"),
                ):
                    values = [(getattr(layer, key) or {}).get(task) for layer in self.layers]
                    points = [(i, v) for i, v in zip(positions, values) if v is not None]
                    if points:
                        xs, ys = zip(*points)
                        ax.plot(xs, ys, style, color=color, label=f"{task} {label}")
                if self.accuracy_original and task in self.accuracy_original:
                    ax.axhline(
                        self.accuracy_original[task],
                        color=color,
                        ls=":",
                        lw=1,
                        label=f"{task} input model",
                    )
            ax.set_ylabel("accuracy")
            ax.legend(fontsize=7)
        axes[-1].set_xticks(positions, labels, rotation=45, ha="right", fontsize=7)
        ratio = self.parameters.get("ratio")
        title = f"Zip of {', '.join(self.tasks)}"
        if ratio is not None:
            title += f": {100 * ratio:.1f} % of the input models' parameters"
        axes[0].set_title(title, fontsize=9)
        for ax in axes:
            ax.grid(alpha=0.3)
        figure.tight_layout()
        return figure

    def save_figure(self, path: str) -> None:
        """Writes :meth:`figure` to ``path`` (PNG, or the format its extension names),
        atomically."""
        io_utils.save_figure(self.figure(), path, dpi=120)

    @property
    def retrain_steps(self) -> int:
        """Total joint retraining iterations over all layers."""
        return sum(layer.retrain_steps for layer in self.layers)

    @property
    def params_before(self) -> int | None:
        """Parameters of the input models together (None before the zip finished)."""
        return self.parameters.get("input_models")

    @property
    def params_after(self) -> int | None:
        """Parameters of the zipped model, shared ones counted once."""
        return self.parameters.get("total")

    _DERIVED = ("retrain_steps", "params_before", "params_after")

    def to_dict(self) -> dict:
        """The fields and the derived totals (``retrain_steps``, ``params_before``,
        ``params_after``) as plain JSON types."""
        result = super().to_dict()
        result.update({key: getattr(self, key) for key in self._DERIVED})
        return result

    @classmethod
    def from_dict(cls, values: dict) -> ZipReport:
        values = {k: v for k, v in values.items() if k not in cls._DERIVED}
        layers = [LayerReport(**layer) for layer in values.pop("layers", [])]
        return cls(layers=layers, **values)

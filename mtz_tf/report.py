"""The JSON-serializable report that ``zip_models`` returns."""

from __future__ import annotations

import dataclasses
import json


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
        if self.retrain_steps:
            line += f", {self.retrain_steps} retrain steps"
        return line + f" ({self.seconds:.1f}s)"


@dataclasses.dataclass
class ZipReport:
    """Per-layer results and parameter counts of a zip.

    Attributes:
        tasks: list of task names.
        matching: str, ``"greedy"`` or ``"optimal"``.
        criterion: str, pairing criterion (``"hessian"``, ``"euclidean"``, ``"random"``).
        merge: str, ``"hessian"`` or ``"average"``.
        accuracy_original: {task: accuracy} of the input models, or None without labels.
        layers: list of :class:`LayerReport`, input to output.
        parameters: {"shared", "specific", "total", "input_models", "ratio"}; ratio is
            total / input_models.
        share_allocation: how a ``ShareBudget`` was turned into per-layer counts (target,
            threshold λ, counts, estimated cost and shared fraction), or None.
        coupled_groups: for a residual network, the layers of each residual stream
            (zipped with one matching), or None.
        alignment_seconds: time spent on the provisional alignment of residual streams.
    """

    tasks: list
    matching: str
    criterion: str = "hessian"
    merge: str = "hessian"
    accuracy_original: dict | None = None
    layers: list = dataclasses.field(default_factory=list)
    parameters: dict = dataclasses.field(default_factory=dict)
    share_allocation: dict | None = None
    coupled_groups: list | None = None
    alignment_seconds: float = 0.0

    @property
    def retrain_steps(self) -> int:
        """Total joint retraining iterations over all layers."""
        return sum(layer.retrain_steps for layer in self.layers)

    def to_dict(self) -> dict:
        result = dataclasses.asdict(self)
        result["retrain_steps"] = self.retrain_steps
        return result

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, values: dict) -> ZipReport:
        values = {k: v for k, v in values.items() if k != "retrain_steps"}
        layers = [LayerReport(**layer) for layer in values.pop("layers", [])]
        return cls(layers=layers, **values)

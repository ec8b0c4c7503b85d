"""Typed outputs of the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class QuantizationOutcome:
    """What `quantize` produced. `model_path` is `<workdir>/out/quantized.onnx`; `files` lists it
    and every external-data file beside it (all inside `model_path.parent`)."""

    model_path: Path
    files: list[Path]
    preprocessing_steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    calibration_samples: int = 0
    # Free-form facts worth showing the user (e.g. quantized node counts, chosen variant in auto mode).
    details: dict[str, Any] = field(default_factory=dict)
    # More artifacts for the job to store, by name (e.g. mode auto's sensitivity.json).
    artifacts: dict[str, Path] = field(default_factory=dict)


@dataclass
class EvaluationOutcome:
    """What `evaluate` measured. `to_dict()` gives the contract's JobResult keys `original`,
    `quantized`, `comparison` and `warnings`, plus `machine` and `evaluation` facts."""

    original: dict[str, Any]
    quantized: dict[str, Any]
    comparison: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "original": self.original,
            "quantized": self.quantized,
            "comparison": self.comparison,
            "warnings": list(self.warnings),
            "machine": self.machine,
            "evaluation": self.evaluation,
        }

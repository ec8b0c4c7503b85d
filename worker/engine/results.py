"""What `quantize` produced, before it is measured: the model, its files, and the facts of how it was made."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.result import QuantizationFacts


@dataclass
class QuantizationOutcome:
    """`model_path` is `<workdir>/out/quantized.onnx`; `files` lists it and every external-data file beside it
    (all inside `model_path.parent`)."""

    model_path: Path
    files: list[Path]
    facts: QuantizationFacts
    preprocessing_steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    # More artifacts for the job to store, by name (e.g. mode auto's sensitivity.json).
    artifacts: dict[str, Path] = field(default_factory=dict)

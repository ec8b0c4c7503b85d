"""Typed inputs of the engine: what to quantize, how to evaluate, where the data is."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Self, TypeVar

T = TypeVar("T")


class Mode(StrEnum):
    STATIC = "static"
    DYNAMIC = "dynamic"
    WEIGHT_ONLY = "weight_only"
    FP16 = "fp16"
    AUTO = "auto"


class QuantFormat(StrEnum):
    QDQ = "qdq"
    QOPERATOR = "qoperator"


class CalibrationMethod(StrEnum):
    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"
    DISTRIBUTION = "distribution"


class QType(StrEnum):
    INT8 = "int8"
    UINT8 = "uint8"
    INT16 = "int16"
    UINT16 = "uint16"
    INT4 = "int4"
    UINT4 = "uint4"


class Stage(StrEnum):
    """Stages of a job, in order. The engine reports progress within one of them."""

    QUEUED = "queued"
    VALIDATING = "validating"
    PREPROCESSING = "preprocessing"
    CALIBRATING = "calibrating"
    QUANTIZING = "quantizing"
    EVALUATING = "evaluating"
    REPORTING = "reporting"
    DONE = "done"


# (stage, fraction of that stage done in 0..1). Called often; the caller throttles.
ProgressCallback = Callable[[Stage, float], None]


def no_progress(stage: Stage, fraction: float) -> None:
    """A ProgressCallback that ignores everything (engine used on its own)."""


@dataclass(frozen=True)
class CandidateProgress:
    """Mode auto: the candidate recipe being tried now, `index` of `total` (from 1)."""

    index: int
    total: int
    name: str


# Called as a search moves to its next candidate, and with None once it is past the candidates.
CandidateCallback = Callable[[CandidateProgress | None], None]


def no_candidate(candidate: CandidateProgress | None) -> None:
    """A CandidateCallback that ignores everything."""


def _from_mapping(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build a dataclass from a mapping, ignoring unknown keys and None for defaulted fields."""
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name not in data:
            continue
        value = data[field.name]
        if value is None and field.default is not None and field.default is not dataclasses.MISSING:
            continue
        if isinstance(value, list):
            value = tuple(value)
        kwargs[field.name] = value
    return cls(**kwargs)


@dataclass(frozen=True)
class QuantizationSpec:
    """The contract's `recipe`, as the engine understands it. Field names match the HTTP contract."""

    mode: Mode = Mode.STATIC
    format: QuantFormat = QuantFormat.QDQ
    activation_type: QType = QType.UINT8
    weight_type: QType = QType.INT8
    calibration_method: CalibrationMethod = CalibrationMethod.MINMAX
    percentile: float = 99.999
    per_channel: bool = False
    reduce_range: bool = False
    symmetric_activations: bool = False
    # None: ONNX Runtime's default (symmetric for signed weight types).
    symmetric_weights: bool | None = None
    op_types_to_quantize: tuple[str, ...] | None = None
    nodes_to_exclude: tuple[str, ...] | None = None
    calibration_batch_size: int = 1
    max_calibration_samples: int | None = None
    block_size: int = 128
    # Largest allowed drop of top-1 accuracy, as a fraction (0.01 is one percentage point).
    accuracy_tolerance: float = 0.01

    def __post_init__(self) -> None:
        # Accept plain strings (from JSON) and normalise them to the enums.
        object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "format", QuantFormat(self.format))
        object.__setattr__(self, "activation_type", QType(self.activation_type))
        object.__setattr__(self, "weight_type", QType(self.weight_type))
        object.__setattr__(self, "calibration_method", CalibrationMethod(self.calibration_method))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Self:
        return _from_mapping(cls, data)


@dataclass(frozen=True)
class EvaluationSpec:
    """The contract's `evaluation`, plus the bounds the operator sets."""

    latency_runs: int = 50
    warmup_runs: int = 5
    threads: int | None = None  # None: the worker's cores
    batch_size: int = 1
    max_samples: int | None = 256  # fidelity/accuracy samples at most
    max_seconds: float = 300.0  # the whole evaluation stops measuring after this long

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Self:
        return _from_mapping(cls, data)


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: numpy dtype name and shape (int, symbolic name, or None)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Self:
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))


@dataclass(frozen=True)
class DatasetSource:
    """A stored dataset file as the engine reads it."""

    path: Path
    format: str  # "npz" | "npy" | "images"
    preprocess: Mapping[str, Any] | None = None  # images only: the contract's preprocess spec

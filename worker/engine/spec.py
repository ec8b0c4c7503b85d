"""Typed inputs of the engine: what to quantize, how to evaluate, where the data is.

The recipe (`QuantizationSpec`) and tensor specs are the shared contract's own types
(`service.contract`), so the API and the engine validate with the same code."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Self, TypeVar

from service.contract.formats import TensorSpec
from service.contract.progress import CandidateProgress, Note
from service.contract.recipe import (
    ActivationType,
    CalibrationMethod,
    FidelityMetric,
    FidelitySpec,
    Mode,
    Objective,
    QType,
    QuantFormat,
)
from service.contract.recipe import Recipe as QuantizationSpec

__all__ = [
    "ActivationType",
    "CalibrationMethod",
    "CandidateProgress",
    "DatasetSource",
    "EvaluationSpec",
    "FidelityMetric",
    "FidelitySpec",
    "Mode",
    "Note",
    "NoteCallback",
    "Objective",
    "ProgressCallback",
    "QType",
    "QuantFormat",
    "QuantizationSpec",
    "Stage",
    "TensorSpec",
    "no_note",
    "no_progress",
]

T = TypeVar("T")


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


# What the engine does now, for the person watching (mode auto: "candidate 2 of 5: ...", with the
# candidate typed; "search step 3: ..."). Called rarely; each note replaces the one before.
NoteCallback = Callable[[Note], None]


def no_note(note: Note) -> None:
    """A NoteCallback that ignores everything."""


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
class DatasetSource:
    """A stored dataset file as the engine reads it."""

    path: Path
    format: str  # "npz" | "npy" | "images"
    preprocess: Mapping[str, Any] | None = None  # images only: the contract's preprocess spec

"""What the user asks of the measurement (`EvaluationSettings`, a job's `evaluation`), and the same with
the operator's caps applied (`EvaluationSpec`, what the engine measures by)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import ConfigDict, Field


@dataclass(frozen=True)
class EvaluationSettings:
    """How to measure. Latency runs of the two models are interleaved."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    latency_runs: Annotated[int, Field(ge=1, le=100_000)] = 50
    warmup_runs: Annotated[int, Field(ge=0, le=10_000)] = 5
    threads: Annotated[int | None, Field(ge=1, le=256, description="Default: the worker's cores.")] = None
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 1


@dataclass(frozen=True)
class EvaluationSpec(EvaluationSettings):
    """The job's settings within the operator's bounds: the engine's input."""

    max_samples: int | None = 256  # fidelity/accuracy samples at most
    max_seconds: float = 300.0  # the whole evaluation stops measuring after this long

    @classmethod
    def capped(
        cls, asked: EvaluationSettings, *, max_latency_runs: int, max_samples: int | None, max_seconds: float
    ) -> EvaluationSpec:
        return cls(
            latency_runs=min(asked.latency_runs, max_latency_runs),
            warmup_runs=asked.warmup_runs,
            threads=asked.threads,
            batch_size=asked.batch_size,
            max_samples=max_samples,
            max_seconds=max_seconds,
        )

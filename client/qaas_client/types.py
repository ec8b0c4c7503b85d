"""Typed views of the service's JSON (the contract's shapes). Fields the service adds later stay in `raw`.

The client is its own distribution without the server's dependencies, so it reads the result (whose one
type is the server's `core.result.JobResult`) through these thin views; tests/client/test_types.py holds
them to that type. Verdicts (`faithful`, `within_budget`, `within_tolerance`) are the server's: the client
shows them and never judges a number itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: list[int | str | None]


@dataclass(frozen=True)
class Model:
    id: str
    name: str
    size_bytes: int
    opset: int | None
    inputs: list[Tensor]
    outputs: list[Tensor]
    created_at: str
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Model:
        def tensors(key: str) -> list[Tensor]:
            return [Tensor(t["name"], t.get("dtype", ""), list(t.get("shape") or [])) for t in data.get(key) or []]

        return cls(
            id=data["id"],
            name=data.get("name", ""),
            size_bytes=int(data.get("size_bytes", 0)),
            opset=data.get("opset"),
            inputs=tensors("inputs"),
            outputs=tensors("outputs"),
            created_at=data.get("created_at", ""),
            raw=data,
        )


@dataclass(frozen=True)
class Dataset:
    id: str
    name: str
    format: str
    num_samples: int
    size_bytes: int
    has_labels: bool
    created_at: str
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Dataset:
        return cls(
            id=data["id"],
            name=data.get("name", ""),
            format=data.get("format", ""),
            num_samples=int(data.get("num_samples", 0)),
            size_bytes=int(data.get("size_bytes", 0)),
            has_labels=bool(data.get("has_labels")),
            created_at=data.get("created_at", ""),
            raw=data,
        )


@dataclass(frozen=True)
class Artifact:
    name: str
    size_bytes: int
    sha256: str
    media_type: str
    url: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Artifact:
        return cls(data["name"], int(data["size_bytes"]), data["sha256"], data.get("media_type", ""), data["url"])


@dataclass(frozen=True)
class JobUpdate:
    """One step of a job's life, from the event stream or a poll. `candidate`/`candidates` count
    `auto`'s recipes (k of n) while it tries them."""

    status: str
    stage: str
    progress: float
    candidate: int | None = None
    candidates: int | None = None
    candidate_name: str | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class OutputFidelity:
    name: str
    cosine: float | None
    sqnr_db: float | None
    max_abs_error: float | None
    top1_agreement: float | None
    faithful: bool | None = None  # the server's verdict; None: not judged (or a result of an older server)


@dataclass(frozen=True)
class Accuracy:
    metric: str
    original: float
    quantized: float
    delta: float
    within_tolerance: bool | None = None


@dataclass(frozen=True)
class Report:
    """The job's result: what quantization cost and gained. `raw` is the whole JSON body."""

    original_size_bytes: int
    quantized_size_bytes: int
    size_ratio: float | None
    speedup_p50: float | None
    original_p50_ms: float | None
    quantized_p50_ms: float | None
    outputs: list[OutputFidelity]
    accuracy: Accuracy | None
    warnings: list[str]
    auto_verdict: str | None
    auto_chosen: str | None
    raw: dict[str, Any] = field(repr=False)
    within_budget: bool | None = None  # the server's verdict on the whole model

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        original = data.get("original") or {}
        quantized = data.get("quantized") or {}
        comparison = data.get("comparison") or {}
        accuracy = comparison.get("accuracy")
        auto = (data.get("quantization") or {}).get("auto") or {}
        chosen = auto.get("chosen")
        return cls(
            original_size_bytes=int(original.get("size_bytes", 0)),
            quantized_size_bytes=int(quantized.get("size_bytes", 0)),
            size_ratio=_float(comparison.get("size_ratio")),
            speedup_p50=_float(comparison.get("speedup_p50")),
            original_p50_ms=_float((original.get("latency_ms") or {}).get("p50")),
            quantized_p50_ms=_float((quantized.get("latency_ms") or {}).get("p50")),
            outputs=[
                OutputFidelity(
                    o.get("name", ""),
                    _float(o.get("cosine")),
                    _float(o.get("sqnr_db")),
                    _float(o.get("max_abs_error")),
                    _float(o.get("top1_agreement")),
                    o.get("faithful") if o.get("budgeted", True) else None,
                )
                for o in comparison.get("outputs") or []
            ],
            accuracy=Accuracy(
                str(accuracy.get("metric", "")),
                float(accuracy["original"]),
                float(accuracy["quantized"]),
                float(accuracy["delta"]),
                accuracy.get("within_tolerance"),
            )
            if isinstance(accuracy, dict)
            else None,
            warnings=[str(w) for w in data.get("warnings") or []],
            auto_verdict=auto.get("verdict"),
            auto_chosen=chosen if isinstance(chosen, str) else None,
            raw=data,
            within_budget=(comparison.get("fidelity") or {}).get("within_budget"),
        )

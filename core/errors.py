"""Errors: the contract's `{code, message, detail}` shape, and the exception that carries it on either
side of the queue."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Self


@dataclass(frozen=True)
class ErrorInfo:
    """The contract's error: a snake_case `code`, one human sentence that says what to fix, and a `detail`
    mapping. The body of every 4xx/5xx answer (`{"error": ErrorInfo}`) and a failed job's `error`."""

    code: str
    message: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(code=data["code"], message=data["message"], detail=dict(data.get("detail") or {}))


class RuleError(Exception):
    """A request, recipe, dataset or model that a rule refuses, or a failure the user can act on
    (`invalid_recipe`, `dataset_model_mismatch`, `evaluation_failed`, ...). The API answers it with a 4xx;
    the engine fails the job with it, the same code and sentence."""

    def __init__(self, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail or {}

    @property
    def info(self) -> ErrorInfo:
        return ErrorInfo(self.code, self.message, self.detail)

    def to_dict(self) -> dict[str, Any]:
        return self.info.to_dict()

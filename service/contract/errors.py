"""The error a broken rule raises, on either side of the queue."""

from __future__ import annotations

from typing import Any


class RuleError(Exception):
    """A request, recipe or dataset that breaks a rule: a contract error `code` (`invalid_recipe`,
    `invalid_dataset`, `dataset_model_mismatch`, ...), one human sentence that says what to fix,
    and a `detail` mapping. The API answers it with a 4xx; the engine fails the job with it."""

    def __init__(self, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail or {}

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "detail": self.detail}

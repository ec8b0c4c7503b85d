"""The one exception the engine raises for a failure a user can act on."""

from __future__ import annotations

from typing import Any


class EngineError(Exception):
    """A failure with a contract error code (`quantization_failed`, `evaluation_failed`,
    `invalid_dataset`, `dataset_model_mismatch`, `invalid_recipe`, ...) and one human sentence."""

    def __init__(self, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail or {}

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "detail": self.detail}

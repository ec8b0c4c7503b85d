"""The one exception the service raises for a failure a client can act on, and its wire shape."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Rendered as `{"error": {"code", "message", "detail"}}` with `status` by the app's one handler."""

    status: int = 400
    code: str = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        detail: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.detail = detail or {}
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "detail": self.detail}}


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class Forbidden(ServiceError):
    status = 403
    code = "forbidden"


class Conflict(ServiceError):
    status = 409
    code = "conflict"


class InvalidModel(ServiceError):
    status = 422
    code = "invalid_model"


class UnsupportedOperator(ServiceError):
    status = 422
    code = "unsupported_operator"


class ExternalDataEscape(ServiceError):
    status = 422
    code = "external_data_escape"


class InvalidDataset(ServiceError):
    status = 422
    code = "invalid_dataset"


class DatasetModelMismatch(ServiceError):
    status = 422
    code = "dataset_model_mismatch"


class InvalidRecipe(ServiceError):
    status = 422
    code = "invalid_recipe"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"


class ResourceLimit(ServiceError):
    status = 422
    code = "resource_limit"


class Unavailable(ServiceError):
    status = 503
    code = "unavailable"

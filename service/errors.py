"""The one exception the service raises for a failure a client can act on, and its wire shape."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from core.errors import RuleError


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


class InvalidTarget(ServiceError):
    """A job's `target` names no class or pool with a live worker (or no name a worker could have)."""

    status = 422
    code = "invalid_target"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"


class QuotaExceeded(ServiceError):
    """A tenant's standing allowance (stored bytes) is used up; `payload_too_large` is one request's size."""

    status = 413
    code = "quota_exceeded"


class RateLimited(ServiceError):
    status = 429
    code = "rate_limited"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"


class ResourceLimit(ServiceError):
    status = 422
    code = "resource_limit"


class Unavailable(ServiceError):
    status = 503
    code = "unavailable"


def from_rule(error: RuleError) -> ServiceError:
    """The ServiceError (and so the HTTP status) for a shared rule's error, by its code."""
    cls = next((c for c in _RULE_ERRORS if c.code == error.code), ServiceError)
    return cls(error.message, code=error.code, status=None if cls is not ServiceError else 422, detail=error.detail)


@contextlib.contextmanager
def service_errors() -> Iterator[None]:
    """Raise a shared rule's error as the matching ServiceError inside the block."""
    try:
        yield
    except RuleError as exc:
        raise from_rule(exc) from exc


_RULE_ERRORS: tuple[type[ServiceError], ...] = (
    NotFound,
    Conflict,
    InvalidModel,
    UnsupportedOperator,
    ExternalDataEscape,
    InvalidDataset,
    DatasetModelMismatch,
    InvalidRecipe,
    InvalidTarget,
    PayloadTooLarge,
    ResourceLimit,
)

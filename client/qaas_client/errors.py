"""Typed exceptions: every failure the service reports arrives as one of these, carrying its error code."""

from __future__ import annotations

from typing import Any


class QaasError(Exception):
    """The service's `{"error": {"code", "message", "detail"}}`, or a failure of the client itself.

    `status` is the HTTP status (None when no answer came, or for a job that failed in the worker)."""

    def __init__(
        self, code: str, message: str, *, detail: dict[str, Any] | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail or {}
        self.status = status

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, status={self.status!r})"


class InvalidInputError(QaasError):
    """The model, dataset, recipe or request was refused (4xx); the message says what to fix."""


class AuthenticationError(QaasError):
    """The API key is missing, unknown or revoked (401/403)."""


class NotFoundError(QaasError):
    """No such model, dataset, job or artifact for this key's tenant (404)."""


class ConflictError(QaasError):
    """The resource's state forbids the request, e.g. deleting a model a running job uses (409)."""


class TooLargeError(QaasError):
    """One upload exceeds the limit, or storing it would exceed the tenant's quota (413)."""


class RateLimitedError(QaasError):
    """Too many requests or active jobs (429), still so after the retries `Retry-After` allowed."""


class UnavailableError(QaasError):
    """The service or one of its dependencies is unreachable (503, or no connection at all)."""


class ServerError(QaasError):
    """The service failed on its side (5xx other than 503)."""


class UnsafeResponseError(QaasError):
    """The service sent something the client refuses to act on: an artifact name that is not a plain
    file name, a file it would write through a symbolic link, a URL off the service's origin."""


class InsecureTransportWarning(UserWarning):
    """The API key is about to travel unencrypted (plain `http://` to a host other than this machine)."""


class JobFailedError(QaasError):
    """The job ended `failed`; `code` is the job's error code (e.g. `quantization_failed`, `timeout`)."""

    def __init__(self, job_id: str, code: str, message: str, *, detail: dict[str, Any] | None = None) -> None:
        super().__init__(code, message, detail=detail)
        self.job_id = job_id


class JobCancelledError(JobFailedError):
    """The job ended `cancelled`."""


_BY_STATUS: dict[int, type[QaasError]] = {
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: TooLargeError,
    429: RateLimitedError,
    503: UnavailableError,
}


def error_for(status: int, body: Any, fallback: str) -> QaasError:
    """The exception for an HTTP error answer; `fallback` is the text shown when the body is not ours."""
    info = body.get("error") if isinstance(body, dict) else None
    if isinstance(info, dict) and isinstance(info.get("code"), str):
        code, message = info["code"], str(info.get("message") or info["code"])
        detail = info.get("detail") if isinstance(info.get("detail"), dict) else {}
    else:
        code, message, detail = f"http_{status}", fallback or f"HTTP {status}", {}
    cls = _BY_STATUS.get(status) or (InvalidInputError if 400 <= status < 500 else ServerError)
    return cls(code, message, detail=detail, status=status)

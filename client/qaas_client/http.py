"""One HTTP session with the service: the key, typed errors, and retries that honour `Retry-After`."""

from __future__ import annotations

import email.utils
import ipaddress
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import httpx

from qaas_client.errors import QaasError, UnavailableError, UnsafeResponseError, error_for

RETRY_STATUSES = (429, 503)
MAX_BACKOFF_S = 10.0
MAX_REDIRECTS = 5
DEFAULT_PORTS = {"http": 80, "https": 443}

# Called before each retry with (what went wrong, seconds about to be waited, retry number from 1).
RetryHook = Callable[[str, float, int], None]
# Opens the files of a multipart upload afresh for every attempt; the stack closes them.
FileOpener = Callable[[ExitStack], dict[str, Any] | list[tuple[str, Any]]]


def _user_agent() -> str:
    try:
        return f"qaas-client/{version('qaas-client')}"
    except PackageNotFoundError:
        return "qaas-client"


def retry_after_s(response: httpx.Response) -> float | None:
    """`Retry-After` as seconds: a number of seconds or an HTTP date (RFC 9110); None when absent or unreadable."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def origin(url: httpx.URL | str) -> tuple[str, str, int | None]:
    """Scheme, host and port: what decides whether the API key may go to a URL."""
    url = httpx.URL(url)
    return url.scheme, url.host, url.port or DEFAULT_PORTS.get(url.scheme)


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cleartext_key_warning(url: str, api_key: str | None) -> str | None:
    """What to say when `api_key` would travel unencrypted to `url`; None when it would not."""
    parsed = httpx.URL(url)
    if not api_key or parsed.scheme != "http" or is_loopback(parsed.host):
        return None
    return (
        f"{url} is plain http:// on another machine: the API key and your files travel unencrypted. "
        "Use https:// (a TLS proxy in front of the service)."
    )


def _describe(response: httpx.Response) -> str:
    error = error_for(response.status_code, _json_or_none(response), response.reason_phrase)
    return f"{response.status_code} {error.code}: {error.message}"


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


class Http:
    """Every request goes through `send`: on 429 and 503 it waits what `Retry-After` asks (or backs off
    when the header is absent) and tries again, up to `max_retries` times; a wait longer than
    `max_wait_s` is not attempted. Those answers mean the service did nothing, so repeating is safe
    for any method; job creation carries an `Idempotency-Key` regardless."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        max_wait_s: float = 120.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        on_retry: RetryHook | None = None,
    ) -> None:
        headers = {"User-Agent": _user_agent()}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.url = url.rstrip("/")
        self.origin = origin(self.url)
        self.max_retries = max_retries
        self.max_wait_s = max_wait_s
        self.sleep = sleep
        self.on_retry = on_retry
        self.client = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
        )

    def close(self) -> None:
        self.client.close()

    def send(
        self,
        method: str,
        path: str,
        *,
        stream: bool = False,
        open_files: FileOpener | None = None,
        read_timeout: float | None = None,
        redirects: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """The response of a successful request (with `stream`, unread: close it); with `redirects`, a
        redirect is answered too, unfollowed. Raises a QaasError. `path` must lead to the service
        itself: the API key goes with every request, so a URL of another origin is refused."""
        attempt = 0
        while True:
            with ExitStack() as files:
                if open_files is not None:
                    kwargs["files"] = open_files(files)
                if read_timeout is not None:
                    kwargs["timeout"] = httpx.Timeout(self.client.timeout.connect, read=read_timeout)
                request = self.client.build_request(method, path, **kwargs)
                if origin(request.url) != self.origin:
                    raise UnsafeResponseError(
                        "foreign_url",
                        f"Refusing to send the API key to {_where(request.url)}, which is not the service "
                        f"({self.url}).",
                    )
                try:
                    response = self.client.send(request, stream=stream)
                except httpx.ConnectError as exc:
                    # Nothing reached the service: safe to repeat whatever the method.
                    if self._wait(attempt, None, f"cannot connect to {self.url} ({exc})"):
                        attempt += 1
                        continue
                    raise UnavailableError(
                        "connection_error",
                        f"Cannot connect to {self.url} ({exc}); is the service running? "
                        "Set QAAS_URL or run `qaas login --url ...`.",
                    ) from exc
                except httpx.TimeoutException as exc:
                    raise UnavailableError(
                        "timeout", f"{self.url} did not answer {method} {path} in time ({type(exc).__name__})."
                    ) from exc
                except httpx.HTTPError as exc:
                    raise UnavailableError(
                        "connection_error", f"The connection to {self.url} failed during {method} {path}: {exc}"
                    ) from exc
            if response.is_success or (redirects and response.is_redirect):
                return response
            if stream:
                response.read()
                response.close()
            if response.status_code in RETRY_STATUSES and self._wait(
                attempt, retry_after_s(response), _describe(response)
            ):
                attempt += 1
                continue
            raise error_for(response.status_code, _json_or_none(response), response.text[:500])

    def _wait(self, attempt: int, asked_s: float | None, why: str) -> bool:
        """Sleeps before retry number `attempt + 1`; False when out of retries or the wait is too long."""
        if attempt >= self.max_retries:
            return False
        wait = asked_s if asked_s is not None else min(MAX_BACKOFF_S, 0.5 * 2**attempt)
        if wait > self.max_wait_s:
            return False
        if self.on_retry is not None:
            self.on_retry(why, wait, attempt + 1)
        self.sleep(wait)
        return True

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.send(method, path, **kwargs).json()

    def download(self, path: str) -> httpx.Response:
        """`GET path` streamed (close the response), following redirects by hand: with the API key
        while they stay on the service's origin, without it once they leave it. A service that keeps
        its files in S3 answers 307 to a presigned URL of the store, whose signature is the credential
        there; the key must never reach another host."""
        response = self.send("GET", path, stream=True, redirects=True)
        on_service = True
        for _ in range(MAX_REDIRECTS):
            if not response.is_redirect:
                return response
            response.close()
            url = response.url.join(response.headers["location"])
            on_service = on_service and origin(url) == self.origin
            response = self.send("GET", str(url), stream=True, redirects=True) if on_service else self._elsewhere(url)
        response.close()
        raise QaasError("too_many_redirects", f"The download of {path} was redirected more than {MAX_REDIRECTS} times.")

    def _elsewhere(self, url: httpx.URL) -> httpx.Response:
        """`GET url` off the service: no API key, no retries; the response streamed, or a redirect."""
        request = self.client.build_request("GET", url)
        request.headers.pop("Authorization", None)
        where = _where(url)  # never the whole URL: its query string may be a credential
        try:
            response = self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise UnavailableError(
                "connection_error", f"The download the service redirected to {where} failed: {exc}"
            ) from exc
        if response.is_success or response.is_redirect:
            return response
        response.read()
        response.close()
        raise QaasError(
            "download_failed",
            f"{where}, where the service redirected the download, answered {response.status_code} "
            f"{response.reason_phrase}: {response.text[:300]}",
            status=response.status_code,
        )


def _where(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"

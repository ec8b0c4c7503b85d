"""Every response a test receives, checked against the service's own /openapi.json: its status must be
documented for the operation, and a JSON body must validate against the documented schema."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import httpx
import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012


@dataclass
class _Operation:
    pattern: re.Pattern[str]
    method: str
    responses: dict[str, Any]


@dataclass
class ResponseChecker:
    """An httpx response hook: `httpx.Client(event_hooks={"response": [checker]})`."""

    spec: dict[str, Any]
    checked: int = 0
    operations: list[_Operation] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.registry: Registry[Any] = Registry().with_resource(
            "urn:openapi", Resource.from_contents(self.spec, default_specification=DRAFT202012)
        )
        for path, methods in self.spec["paths"].items():
            pattern = re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$")
            for method, operation in methods.items():
                self.operations.append(_Operation(pattern, method.upper(), operation["responses"]))

    @classmethod
    def of(cls, base_url: str) -> ResponseChecker:
        spec = httpx.get(f"{base_url}/openapi.json", timeout=30).json()
        return cls(spec)

    def __call__(self, response: httpx.Response) -> None:
        request = response.request
        path = request.url.path
        if path in ("/openapi.json", "/docs", "/redoc") or path.startswith("/static-offline-docs"):
            return
        operation = next((o for o in self.operations if o.method == request.method and o.pattern.match(path)), None)
        assert operation is not None, f"{request.method} {path} is not in the OpenAPI document"
        documented = operation.responses.get(str(response.status_code))
        assert documented is not None, (
            f"{request.method} {path} answered {response.status_code}, which its OpenAPI operation does not "
            f"document (it documents {sorted(operation.responses)})"
        )
        media = response.headers.get("content-type", "").split(";")[0].strip()
        content = documented.get("content", {})
        if media != "application/json":
            return
        assert "application/json" in content, f"{request.method} {path} {response.status_code}: JSON not documented"
        schema = content["application/json"].get("schema")
        if schema is None:
            return
        response.read()
        body = response.json()
        validator = jsonschema.Draft202012Validator(_rebase(schema), registry=self.registry)
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
        assert not errors, f"{request.method} {path} {response.status_code} does not match its schema: " + "; ".join(
            f"{list(e.path)}: {e.message[:300]}" for e in errors[:5]
        )
        self.checked += 1


def _rebase(schema: Any) -> Any:
    """`#/components/...` refs point into the whole OpenAPI document (registered as urn:openapi)."""
    if isinstance(schema, dict):
        return {
            k: ("urn:openapi" + v if k == "$ref" and isinstance(v, str) and v.startswith("#") else _rebase(v))
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_rebase(v) for v in schema]
    return schema

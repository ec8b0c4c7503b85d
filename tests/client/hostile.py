"""A real HTTP server on 127.0.0.1 that answers what a test scripts and records every request it gets:
a service the client must not trust, or the object store a download is redirected to."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Seen:
    method: str
    path: str  # with its query string
    headers: dict[str, str]  # names lower-cased


class Hostile:
    """Answers `routes[path]` (the path without its query string), 404 otherwise."""

    def __init__(self) -> None:
        self.routes: dict[str, Answer] = {}
        self.seen: list[Seen] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.seen.append(Seen("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
                answer = server.routes.get(self.path.split("?", 1)[0]) or Answer(
                    404, json.dumps({"error": {"code": "not_found", "message": "No such thing."}}).encode()
                )
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def json(self, path: str, data: Any) -> None:
        self.routes[path] = Answer(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def file(self, path: str, content: bytes) -> None:
        self.routes[path] = Answer(200, content, {"Content-Type": "application/octet-stream"})

    def redirect(self, path: str, location: str) -> None:
        self.routes[path] = Answer(307, headers={"Location": location})

    def job(self, job_id: str, **fields: Any) -> None:
        self.json(
            f"/v1/jobs/{job_id}",
            {
                "id": job_id,
                "status": "succeeded",
                "stage": "done",
                "progress": 1.0,
                "recipe": {"mode": "dynamic"},
                "created_at": "2026-01-01T00:00:00Z",
                "error": None,
                **fields,
            },
        )

    def artifacts(self, job_id: str, files: dict[str, bytes], urls: dict[str, str] | None = None) -> None:
        """Lists `files` as the job's artifacts (binary, so the client downloads each), `url` as given."""
        self.json(
            f"/v1/jobs/{job_id}/artifacts",
            [
                {
                    "name": name,
                    "size_bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "media_type": "application/octet-stream",
                    "url": (urls or {}).get(name, f"/v1/jobs/{job_id}/artifacts/{name}"),
                }
                for name, data in files.items()
            ],
        )

    def asked(self, path: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.path.split("?", 1)[0] == path]


@contextmanager
def running() -> Iterator[Hostile]:
    server = Hostile()
    thread = threading.Thread(target=server.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        thread.join()

"""A real S3 HTTP server on loopback for the tests: moto's server mode (`python -m moto.server`), run
as a process of its own and reached over HTTP by boto3, exactly as a deployment reaches MinIO."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
from botocore.config import Config

from service.storage.s3 import S3Storage

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "qaas-test",
    "AWS_SECRET_ACCESS_KEY": "qaas-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    def __init__(self, logs: Path, port: int) -> None:
        self.port = port
        self.logs = logs
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / "moto.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto.server exited: {(self.logs / 'moto.log').read_text()[-2000:]}")
            try:
                httpx.get(self.url, timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("moto.server did not answer in 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self) -> Any:
        return boto3.session.Session(
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        ).client("s3", endpoint_url=self.url, config=Config(s3={"addressing_style": "path"}))

    def new_bucket(self) -> str:
        name = f"qaas-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, bucket: str, prefix: str = "qaas") -> dict[str, str]:
        """What a process needs to use this server as its storage."""
        return {
            "QAAS_STORAGE_URL": f"s3://{bucket}/{prefix}",
            "QAAS_S3_ENDPOINT_URL": self.url,
            **CREDENTIALS,
        }

    def object_keys(self, bucket: str) -> list[str]:
        page = self.client().list_objects_v2(Bucket=bucket)
        return sorted(obj["Key"] for obj in page.get("Contents", []))

    def unfinished_uploads(self, bucket: str) -> list[str]:
        return [u["Key"] for u in self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def dead_object_store() -> S3Storage:
    """S3-compatible storage at a loopback port nothing listens on, asked once (no retries)."""
    with socket.socket() as sock:  # a port that was free a moment ago; nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = boto3.session.Session(
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
    ).client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, s3={"addressing_style": "path"}),
    )
    return S3Storage(client, "qaas")


def running_server(logs: Path, port: int) -> Iterator[S3Server]:
    server = S3Server(logs, port)
    server.start()
    try:
        yield server
    finally:
        server.stop()

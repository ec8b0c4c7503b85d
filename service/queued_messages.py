"""What the broker holds: the jobs' run messages, waiting in a queue or delivered to a worker and not yet
acknowledged (a worker holds one while it runs the job, or until its countdown). The sweep sends a job's
message again only when the broker holds none (worker/reaper.py).

Read where kombu keeps them (`service.queue.celery_config` sets both places): on Redis, the queue lists
(`<prefix>qaas`, the class and pool queues `<prefix>qaas-...`, and their priority lists) and the hash of
unacknowledged deliveries (`<prefix>unacked`), all in one MULTI so that a message moving from one to the
other is seen once; on the filesystem transport, the `*.msg` files of the broker's queue folder."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections import Counter
from typing import Any

import redis

from service.queue import QUEUE, RUN_JOB_TASK
from service.settings import Settings

PRIORITY_SEPARATOR = "\x06\x16"  # kombu's: `<queue>\x06\x16<priority>` holds a queue's prioritised messages


def job_of(message: Any) -> str | None:
    """The job id of a kombu message of `qaas.run_job` (Celery's protocol 2), else None."""
    try:
        if message["headers"]["task"] != RUN_JOB_TASK:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0])
    except (KeyError, IndexError, TypeError, ValueError, binascii.Error):
        return None


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _is_queue(name: str) -> bool:
    return name == QUEUE or name.startswith((f"{QUEUE}-", f"{QUEUE}{PRIORITY_SEPARATOR}"))


class QueuedMessages:
    """Counts the broker's run messages per job. Connects on first use; `close` when done."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client: redis.Redis | None = None

    def by_job(self) -> Counter[str] | None:
        """Run messages per job id; None when this broker cannot be read (neither Redis nor the filesystem
        transport). Raises when the broker does not answer."""
        if self.settings.is_embedded:
            return self._files()
        if self.settings.redis_broker_url is not None:
            return self._redis(self.settings.redis_broker_url)
        return None

    def _files(self) -> Counter[str]:
        found: Counter[str] = Counter()
        folder = self.settings.broker_dir / "queue"
        if not folder.is_dir():
            return found
        for path in folder.glob("*.msg"):
            try:
                raw = path.read_bytes()
            except FileNotFoundError:  # a worker took it meanwhile
                continue
            job = job_of(_json(raw))  # None too for a file still being written (a message sent a moment ago)
            if job is not None:
                found[job] += 1
        return found

    def _redis(self, url: str) -> Counter[str]:
        if self.client is None:
            self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        prefix = self.settings.broker_key_prefix
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + QUEUE + "*"
        queues = [
            key
            for key in self.client.scan_iter(match=pattern, count=1000, _type="list")
            if _is_queue(key.decode(errors="replace")[len(prefix) :])
        ]
        with self.client.pipeline(transaction=True) as pipe:
            for key in queues:
                pipe.lrange(key, 0, -1)
            pipe.hvals(f"{prefix}unacked")
            *waiting, delivered = pipe.execute()
        # An unacknowledged delivery is kept as [message, exchange, routing key].
        messages = [_json(raw) for queue in waiting for raw in queue] + [
            (entry[0] if isinstance(entry, list) and entry else None) for entry in map(_json, delivered)
        ]
        return Counter(job for job in map(job_of, messages) if job is not None)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

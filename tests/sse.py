"""A small Server-Sent Events reader over an httpx streaming response, for the tests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Event:
    event: str
    id: str | None
    data: Any


class EventReader:
    """`next()` returns the next event, or None once the server closed the stream. Comment lines
    (heartbeats) are counted in `comments`."""

    def __init__(self, response: httpx.Response) -> None:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        self.lines: Iterator[str] = response.iter_lines()
        self.comments = 0

    def next(self) -> Event | None:
        fields: dict[str, str] = {}
        for line in self.lines:
            if not line:
                if "data" in fields:
                    return Event(fields.get("event", "message"), fields.get("id"), json.loads(fields["data"]))
                continue
            if line.startswith(":"):
                self.comments += 1
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            fields[name] = fields[name] + "\n" + value if name == "data" and name in fields else value
        return None

    def until_end(self) -> list[Event]:
        events = []
        while (event := self.next()) is not None:
            events.append(event)
        return events

"""Live job events for `GET /v1/jobs/{id}/events` (Server-Sent Events).

One `EventHub` per API process polls the state of every job that has an open stream, in one
query per tick whatever the number of streams, and wakes the streams of the jobs that changed.
A stream's own database work is one read when it opens (the tenant check and the first state).
While only a job's progress moves (the worker writes it every half second), the hub passes it on at most
once per `progress_interval_s`: the newest state then, never a stale one. A new status, stage or auto
candidate, and the end, go out at the next poll.

Events (the `data` of each is JSON):
- `status`: the job's status changed (and once when the stream opens): a `JobEvent`;
- `progress`: its stage, progress, note or auto's candidate changed (and once when the stream opens): a `JobEvent`;
- `end`: the job reached a terminal status; `data` is the whole Job (result or error included),
  then the stream closes.

Event ids are `<updated_at in µs>.<0 status | 1 progress | 2 end>`: a client that reconnects with
`Last-Event-ID` gets only what it has not seen, and one that already has the `end` event gets
`204 No Content`, which tells an EventSource to stop reconnecting.

A stream also ends, cleanly and without an `end` event, after `max_stream_s` (the client reconnects with
`Last-Event-ID`, as after a dropped connection), and once the API key it was opened with is revoked: the
poller checks the keys of its open streams every `key_check_s`, in one query. How many streams may be open
is `AuthMiddleware`'s to decide."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
import anyio.to_thread
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker
from sse_starlette import ServerSentEvent

from core.lifecycle import TERMINAL_STATUSES
from core.progress import candidate_of
from service.auth import unrevoked_prefixes
from service.jobs.schemas import JobEvent, JobOut
from service.tables import Job

log = logging.getLogger(__name__)
TERMINAL = frozenset(TERMINAL_STATUSES)
STATUS, PROGRESS, END = 0, 1, 2
RETRY_MS = 2000
POLL_CHUNK = 500  # ids per IN (...) list


@dataclass(frozen=True)
class Snapshot:
    """What the events say about a job at one moment."""

    event: JobEvent
    updated_at: datetime
    # Encoded events by kind: made once, sent to every stream of the job (200 streams, one encoding).
    encoded: dict[int, bytes] = field(default_factory=dict, compare=False, repr=False)

    @property
    def stamp(self) -> int:
        return int(self.updated_at.timestamp() * 1_000_000)

    @property
    def terminal(self) -> bool:
        return self.event.status in TERMINAL

    def phase_key(self) -> tuple[Any, ...]:
        """What moves rarely and is worth showing at once: status, stage and auto's candidate."""
        e = self.event
        return (e.status, e.stage, e.candidate, e.attempts)

    def progress_key(self) -> tuple[Any, ...]:
        e = self.event
        return (e.stage, e.progress, e.progress_note, e.candidate, e.attempts)

    @classmethod
    def of(cls, job: JobOut | Any, updated_at: datetime) -> Snapshot:
        event = JobEvent(
            job_id=job.id,
            status=job.status,
            stage=job.stage,
            progress=job.progress,
            attempts=job.attempts,
            progress_note=job.progress_note,
            candidate=candidate_of(job.progress_detail),
        )
        return cls(event, updated_at)


def parse_last_event_id(value: str | None) -> tuple[int, int] | None:
    """`<µs>.<n>` as this module writes them; anything else counts as no id (a fresh stream)."""
    if not value:
        return None
    stamp, _, kind = value.strip().partition(".")
    try:
        return int(stamp), int(kind or PROGRESS)
    except ValueError:
        return None


@dataclass
class _Watch:
    snapshot: Snapshot
    final: dict[str, Any] | None = None  # the whole Job, once terminal
    gone: bool = False  # the job row disappeared
    streams: int = 0
    keys: Counter[str] = field(default_factory=Counter)  # the job's open streams by API key prefix
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    published_at: float = field(default_factory=time.monotonic)

    def publish(self, snapshot: Snapshot | None, final: dict[str, Any] | None = None) -> None:
        if snapshot is None:
            self.gone = True
        else:
            self.snapshot = snapshot
            self.final = final
        self.published_at = time.monotonic()
        self.wake()

    def wake(self) -> None:
        previous, self.changed = self.changed, asyncio.Event()
        previous.set()


class EventHub:
    """The shared poller. Lives on `app.state.event_hub`; made and closed by the app's lifespan."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        poll_interval_s: float,
        progress_interval_s: float,
        max_stream_s: float = 3600.0,
        key_check_s: float = 30.0,
    ) -> None:
        self.session_factory = session_factory
        self.poll_interval_s = poll_interval_s
        self.progress_interval_s = progress_interval_s
        self.max_stream_s = max_stream_s
        self.key_check_s = key_check_s
        self.watches: dict[str, _Watch] = {}
        self.keys: Counter[str] = Counter()  # open streams by API key prefix (none with auth off)
        self.revoked: set[str] = set()  # prefixes among `keys` found revoked: their streams end
        self.polls = 0  # database queries made by the poller for jobs (for tests and the benchmark)
        self.key_checks = 0  # and for keys
        self._keys_checked_at = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._limiter = anyio.CapacityLimiter(1)

    @property
    def open_streams(self) -> int:
        return sum(w.streams for w in self.watches.values())

    @contextlib.contextmanager
    def _watching(self, snapshot: Snapshot, key: str | None) -> Iterator[_Watch]:
        job_id = snapshot.event.job_id
        watch = self.watches.get(job_id)
        if watch is None:
            watch = self.watches[job_id] = _Watch(snapshot)
        elif snapshot.stamp > watch.snapshot.stamp:
            watch.publish(snapshot)  # newer than what the other streams have: let them see it too
        watch.streams += 1
        if key is not None:
            watch.keys[key] += 1
            self.keys[key] += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="qaas-event-hub")
        try:
            yield watch
        finally:
            watch.streams -= 1
            if key is not None:
                watch.keys[key] -= 1
                self.keys[key] -= 1
                if self.keys[key] <= 0:
                    del self.keys[key]
                    self.revoked.discard(key)
            if watch.streams == 0 and self.watches.get(job_id) is watch:
                del self.watches[job_id]

    async def stream(
        self, first: JobOut, updated_at: datetime, last_seen: tuple[int, int] | None, key: str | None = None
    ) -> AsyncIterator[bytes]:
        """The events of one client's stream, from the state read when it opened. `key`: the prefix of the
        API key it was opened with (None with auth off)."""
        snapshot = Snapshot.of(first, updated_at)
        sent, after = _resume(snapshot, last_seen)
        if snapshot.terminal:
            for event in _events(sent, snapshot, after):
                yield event
            if after < END:
                yield _sse(END, snapshot, first.model_dump(mode="json"))
            return
        deadline = time.monotonic() + self.max_stream_s
        with self._watching(snapshot, key) as watch:
            while True:
                changed = watch.changed  # taken before reading, so no publish is missed
                if watch.gone or (key is not None and key in self.revoked):
                    return
                current = watch.snapshot
                if sent is None or current.stamp > sent.stamp:
                    for event in _events(sent, current, after):
                        yield event
                    sent, after = current, -1
                if current.terminal and watch.final is not None:
                    yield _sse(END, current, watch.final)
                    return
                try:
                    await asyncio.wait_for(changed.wait(), deadline - time.monotonic())
                except TimeoutError:
                    return  # its lifetime is over: the client resumes with Last-Event-ID

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while self.watches:
            await asyncio.sleep(self.poll_interval_s)
            if self.keys and time.monotonic() - self._keys_checked_at >= self.key_check_s:
                await self._check_keys()
            ids = [job_id for job_id, w in self.watches.items() if not w.gone and w.final is None]
            if not ids:
                continue
            try:
                rows, finals = await anyio.to_thread.run_sync(self._poll, ids, limiter=self._limiter)
            except (OperationalError, PoolTimeout) as exc:  # streams keep their heartbeats meanwhile
                log.warning("job events: the database is unreachable (%s); retrying", type(exc).__name__)
                continue
            except Exception:
                log.exception("job events: polling failed; retrying")
                continue
            for job_id in ids:
                watch = self.watches.get(job_id)
                if watch is None:
                    continue
                snapshot = rows.get(job_id)
                if snapshot is None:
                    watch.publish(None)
                elif job_id in finals or (snapshot.stamp > watch.snapshot.stamp and not self._held(watch, snapshot)):
                    watch.publish(snapshot, finals.get(job_id))

    async def _check_keys(self) -> None:
        """Ends the streams of keys revoked (or deleted) since they opened."""
        prefixes = list(self.keys)
        try:
            valid = await anyio.to_thread.run_sync(self._unrevoked, prefixes, limiter=self._limiter)
        except (OperationalError, PoolTimeout) as exc:
            log.warning("job events: the database is unreachable (%s); keys not checked", type(exc).__name__)
            return
        except Exception:
            log.exception("job events: checking keys failed; retrying")
            return
        self._keys_checked_at = time.monotonic()
        revoked = {prefix for prefix in prefixes if prefix not in valid and prefix in self.keys} - self.revoked
        if not revoked:
            return
        log.info("job events: ending the streams of revoked API keys %s", ", ".join(sorted(revoked)))
        self.revoked |= revoked
        for watch in self.watches.values():
            if any(watch.keys[prefix] > 0 for prefix in revoked):
                watch.wake()

    def _unrevoked(self, prefixes: list[str]) -> set[str]:
        self.key_checks += 1
        with self.session_factory() as session:
            return unrevoked_prefixes(session, prefixes)

    def _held(self, watch: _Watch, snapshot: Snapshot) -> bool:
        """Only the progress moved, and the job's streams had an event less than `progress_interval_s` ago.
        The row keeps its newer stamp, so a later poll publishes the newest state."""
        return (
            snapshot.phase_key() == watch.snapshot.phase_key()
            and time.monotonic() - watch.published_at < self.progress_interval_s
        )

    def _poll(self, ids: list[str]) -> tuple[dict[str, Snapshot], dict[str, dict[str, Any]]]:
        """One query for the light columns of every watched job; the whole row only for jobs that ended."""
        self.polls += 1
        rows: dict[str, Snapshot] = {}
        finals: dict[str, dict[str, Any]] = {}
        with self.session_factory() as session:
            for start in range(0, len(ids), POLL_CHUNK):
                chunk = ids[start : start + POLL_CHUNK]
                query = select(
                    Job.id,
                    Job.status,
                    Job.stage,
                    Job.progress,
                    Job.attempts,
                    Job.progress_note,
                    Job.progress_detail,
                    Job.updated_at,
                ).where(Job.id.in_(chunk))
                for row in session.execute(query):
                    rows[row.id] = Snapshot.of(row, row.updated_at)
            for job_id, snapshot in rows.items():
                job = session.get(Job, job_id) if snapshot.terminal else None
                if job is not None:
                    whole = JobOut.model_validate(job)
                    finals[job_id] = whole.model_dump(mode="json")
                    rows[job_id] = Snapshot.of(whole, job.updated_at)
        return rows, finals


def already_ended(snapshot_stamp: int, last_seen: tuple[int, int] | None) -> bool:
    """The client's Last-Event-ID is this terminal state's `end` event (or later): nothing is left to send."""
    return last_seen is not None and (snapshot_stamp, END) <= last_seen


def _resume(snapshot: Snapshot, last_seen: tuple[int, int] | None) -> tuple[Snapshot | None, int]:
    """(what the client already has, the last event kind it got of `snapshot`) from its Last-Event-ID."""
    if last_seen is None or snapshot.stamp > last_seen[0]:
        return None, -1  # a fresh stream, or the job moved on since: send its whole state
    if snapshot.stamp == last_seen[0]:
        return None, last_seen[1]  # the kinds of this state it has not had yet
    return snapshot, -1  # the client is ahead of this read: nothing to repeat


def _events(sent: Snapshot | None, current: Snapshot, after: int) -> Iterator[bytes]:
    """`status` and `progress` events for what changed from `sent` to `current`, minus kinds <= `after`."""
    if (sent is None or sent.event.status != current.event.status) and after < STATUS:
        yield _sse(STATUS, current)
    if (sent is None or sent.progress_key() != current.progress_key()) and after < PROGRESS:
        yield _sse(PROGRESS, current)


def _sse(kind: int, snapshot: Snapshot, data: dict[str, Any] | None = None) -> bytes:
    """The encoded event (`data` for `end`: the whole job; else the snapshot's JobEvent), cached on the snapshot."""
    found = snapshot.encoded.get(kind)
    if found is None:
        payload = data if data is not None else snapshot.event.model_dump(mode="json")
        found = snapshot.encoded[kind] = ServerSentEvent(
            data=json.dumps(payload, separators=(",", ":")),
            event=("status", "progress", "end")[kind],
            id=f"{snapshot.stamp}.{kind}",
            retry=RETRY_MS,
        ).encode()
    return found

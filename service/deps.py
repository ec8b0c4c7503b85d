"""Request dependencies as `Annotated` aliases. The session dependency owns the transaction."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import anyio.to_thread
from fastapi import Depends, Request
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service.errors import Unavailable
from service.queue import JobQueue
from service.settings import Settings
from service.storage import Storage

log = logging.getLogger(__name__)


# The dependencies that only read app.state are `async def`: FastAPI runs a plain `def` dependency on the
# thread pool, one trip per dependency per request.
async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _session(request: Request) -> AsyncIterator[Session]:
    """One session per request, committed when the endpoint returns.

    Commit and close run on a thread limiter of their own (`app.state.db_limiter`), never on the
    endpoints' thread pool: a request that is done must always be able to hand its connection back,
    even while every endpoint thread waits for a connection (with one shared pool, 64 concurrent
    pollers deadlocked until the pool timed out)."""
    session: Session = request.app.state.session_factory()
    limiter: anyio.CapacityLimiter = request.app.state.db_limiter
    try:
        yield session
        await anyio.to_thread.run_sync(_commit_and_close, session, limiter=limiter)
    except OperationalError as exc:
        await anyio.to_thread.run_sync(_rollback_and_close, session, limiter=limiter)
        # The driver's text names the database host and user: the log has it, the caller does not.
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc.orig)
        raise Unavailable("The database is unreachable; retry in a few seconds.") from exc
    except BaseException:
        await anyio.to_thread.run_sync(_rollback_and_close, session, limiter=limiter)
        raise


def _commit_and_close(session: Session) -> None:
    """One trip to a thread for both (each trip costs a polled job a noticeable share of its time). A commit
    that fails rolls back before the close, so the session's rollback hooks run (stored files go)."""
    try:
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _rollback_and_close(session: Session) -> None:
    try:
        session.rollback()
    finally:
        session.close()


async def _storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


async def _queue(request: Request) -> JobQueue:
    queue: JobQueue = request.app.state.queue
    return queue


SettingsDep = Annotated[Settings, Depends(_settings)]
# scope="function": commit before the response is sent, so a commit that fails (the database went
# away) answers 503 instead of a success the database never recorded.
SessionDep = Annotated[Session, Depends(_session, scope="function")]
StorageDep = Annotated[Storage, Depends(_storage)]
QueueDep = Annotated[JobQueue, Depends(_queue)]

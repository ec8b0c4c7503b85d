"""Request dependencies as `Annotated` aliases. The session dependency owns the transaction."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service.errors import Unavailable
from service.queue import JobQueue
from service.settings import Settings
from service.storage import LocalStorage


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _session(request: Request) -> Iterator[Session]:
    session: Session = request.app.state.session_factory()
    try:
        yield session
        session.commit()
    except OperationalError as exc:
        session.rollback()
        raise Unavailable(
            "The database is unreachable; retry in a few seconds.", detail={"reason": str(exc.orig)[:200]}
        ) from exc
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _storage(request: Request) -> LocalStorage:
    storage: LocalStorage = request.app.state.storage
    return storage


def _queue(request: Request) -> JobQueue:
    queue: JobQueue = request.app.state.queue
    return queue


SettingsDep = Annotated[Settings, Depends(_settings)]
SessionDep = Annotated[Session, Depends(_session)]
StorageDep = Annotated[LocalStorage, Depends(_storage)]
QueueDep = Annotated[JobQueue, Depends(_queue)]

"""An attempt's database writes that outlive an outage, retried for up to a lease.

Every write of an attempt is conditional on the attempt still owning the job (`service/jobs/state.py`),
so a retried write that lands after the sweep took the job back changes nothing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.database import transaction

log = logging.getLogger(__name__)
T = TypeVar("T")


def transient(exc: BaseException) -> bool:
    """A database error worth retrying: the server went away or restarts, or SQLite is busy."""
    return isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


def write(session_factory: sessionmaker[Session], lease_s: float, what: str, fn: Callable[[Session], T]) -> T | None:
    """`fn` in one transaction, retried for up to a lease (`lease_s`) while the database is unreachable.
    None when it never got through: the job then stays `running` until its lease runs out and the
    sweep takes it back, which is safe because nothing was recorded."""
    deadline = time.monotonic() + lease_s
    delay = 0.2
    while True:
        try:
            with transaction(session_factory) as session:
                return fn(session)
        except DBAPIError as exc:
            if not transient(exc):
                raise
            if time.monotonic() + delay > deadline:
                log.error("could not %s: the database stayed unreachable (%s)", what, exc.orig)
                return None
            log.warning("could not %s yet, the database is unreachable (%s); retrying", what, exc.orig)
            time.sleep(delay)
            delay = min(2 * delay, 2.0)

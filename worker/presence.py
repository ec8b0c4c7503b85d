"""What this worker advertises (its class, pool, int8 instructions and cores), the queues that follow from
them, and the heartbeat that keeps its row in `workers` fresh with the tasks it runs."""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from core.cpu import architecture, cpu, normalise, usable_cores
from core.placement import Placement, class_features, class_name
from service.database import transaction
from service.queue import QUEUE, class_queue, pool_queue
from service.settings import Settings, get_settings
from service.targets import workers
from service.targets.workers import Advert

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Presence:
    """This worker process as others see it."""

    advert: Advert

    @property
    def queues(self) -> list[str]:
        """Any worker's queue (jobs that target `any`), its class's, and its pool's when it has one."""
        own = [class_queue(self.advert.worker_class)]
        if self.advert.pool:
            own.append(pool_queue(self.advert.pool))
        return [QUEUE, *own]

    @property
    def placement(self) -> Placement:
        return Placement(self.advert.worker_class, self.advert.pool)


def detect(settings: Settings) -> Presence:
    """The class is derived from the CPU's architecture and int8 instructions (`core.placement.class_name`),
    from QAAS_WORKER_FEATURES instead of the detected flags when set, or is QAAS_WORKER_CLASS when set."""
    flags = cpu().flags if settings.worker_features is None else normalise(settings.worker_features.split(","))
    arch = architecture()
    return Presence(
        Advert(
            id=str(uuid.uuid4()),
            hostname=socket.gethostname(),
            pid=os.getpid(),
            worker_class=settings.worker_class or class_name(arch, flags),
            pool=settings.worker_pool,
            architecture=arch,
            features=class_features(flags),
            cores=usable_cores(),
            concurrency=settings.worker_concurrency,
        )
    )


@functools.lru_cache(maxsize=1)
def this_worker() -> Presence:
    """This worker's presence, made once (its pool processes inherit it)."""
    return detect(get_settings())


class Heartbeat:
    """Writes the worker's row now and every `interval_s` (with `running()`, the tasks it runs), and marks it
    stopped when the worker stops taking tasks. A database that does not answer costs a warning per beat."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        presence: Presence,
        interval_s: float,
        running: Callable[[], int] = lambda: 0,
    ) -> None:
        self.factory = factory
        self.presence = presence
        self.interval_s = interval_s
        self.running = running
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="qaas-heartbeat", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def beat(self) -> bool:
        try:
            with transaction(self.factory) as session:
                workers.beat(session, self.presence.advert, self.running())
            return True
        except DBAPIError as exc:
            log.warning("heartbeat not recorded (%s); next in %g s", exc.orig, self.interval_s)
            return False

    def stop(self) -> None:
        """From now on this worker is not live (it takes no new task); best effort."""
        self.stopping.set()
        self.thread.join(timeout=5)
        try:
            with transaction(self.factory) as session:
                workers.stopped(session, self.presence.advert.id)
        except DBAPIError as exc:
            log.warning("could not record that this worker stops (%s); its heartbeat ages out", exc.orig)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.beat()
            except Exception:  # never let the heartbeat die: a worker without one cannot be targeted
                log.exception("heartbeat failed; next in %g s", self.interval_s)
            self.stopping.wait(self.interval_s)

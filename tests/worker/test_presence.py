"""What a worker advertises (worker/presence.py): its class from its CPU or its settings, its pool, the queues
it consumes, and a heartbeat that keeps it live in `workers` with its load until it stops, on both databases."""

from __future__ import annotations

import time

from sqlalchemy.orm import Session, sessionmaker

from core.cpu import architecture, cpu
from core.placement import Placement, class_name
from service.database import make_engine, make_session_factory, utcnow
from service.queue import QUEUE, class_queue, pool_queue
from service.settings import Settings
from service.tables import Worker
from service.targets import workers
from worker.presence import Heartbeat, detect

Factory = sessionmaker[Session]


def test_the_class_is_derived_from_the_cpu_or_from_the_settings() -> None:
    detected = detect(Settings())
    assert detected.advert.worker_class == class_name(architecture(), cpu().flags)
    assert detected.queues == [QUEUE, class_queue(detected.advert.worker_class)]  # no pool: no pool queue
    assert detected.advert.cores >= 1 and detected.advert.concurrency == 1

    featured = detect(Settings(worker_features="AVX2, fma,avx512f,avx512bw,avx512vnni", worker_concurrency=2))
    assert featured.advert.worker_class == class_name(architecture(), ["avx2", "avx512f", "avx512bw", "avx512_vnni"])
    assert featured.advert.features == ("avx2", "avx512f", "avx512bw", "avx512_vnni")
    assert featured.advert.concurrency == 2

    named = detect(Settings(worker_class="x86_64-amx", worker_features="avx2", worker_pool="edge"))
    assert named.placement == Placement("x86_64-amx", "edge")
    assert named.queues == [QUEUE, class_queue("x86_64-amx"), pool_queue("edge")]
    assert named.advert.features == ("avx2",)
    assert detect(Settings()).advert.id != detected.advert.id  # a new identity at every start


def _live(factory: Factory, worker_id: str, live_s: float = 90) -> tuple[bool, int]:
    with factory() as session:
        row = session.get(Worker, worker_id)
        assert row is not None
        return workers.is_live(row, utcnow(), live_s), row.running


def test_the_heartbeat_keeps_the_worker_live_with_its_load_until_it_stops(session_factory: Factory) -> None:
    presence = detect(Settings(worker_class="x86_64-avx2", worker_pool="edge"))
    load = [0]
    heartbeat = Heartbeat(session_factory, presence, 0.05, lambda: load[0])
    heartbeat.start()
    deadline = time.monotonic() + 10
    with session_factory() as session:
        while session.get(Worker, presence.advert.id) is None and time.monotonic() < deadline:
            time.sleep(0.02)
    assert _live(session_factory, presence.advert.id) == (True, 0)
    load[0] = 2
    while _live(session_factory, presence.advert.id)[1] != 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _live(session_factory, presence.advert.id) == (True, 2)
    heartbeat.stop()
    assert not heartbeat.thread.is_alive()
    assert _live(session_factory, presence.advert.id)[0] is False  # stopped: not live, though just seen
    assert heartbeat.beat()  # started again (a new heartbeat of the same process): live again
    assert _live(session_factory, presence.advert.id)[0] is True


def test_a_heartbeat_without_a_database_is_a_warning_not_a_dead_thread() -> None:
    missing = Settings(database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    factory = make_session_factory(make_engine(missing))
    heartbeat = Heartbeat(factory, detect(missing), 0.05)
    assert heartbeat.beat() is False
    heartbeat.start()
    time.sleep(0.2)
    assert heartbeat.thread.is_alive()
    heartbeat.stop()

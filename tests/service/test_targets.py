"""GET /v1/targets and a job's `target`, on both deployments: the classes and pools with live workers are
listed with their load; a job that names one is sent to that class's or pool's queue, and one that names a
class or pool without a live worker is refused with 422 `invalid_target` and the list of the live ones."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.auth import create_key
from service.database import transaction, utcnow
from service.jobs.schemas import JobCreate
from service.jobs.service import request_digest
from service.queue import QUEUE, RUN_JOB_TASK, class_queue, pool_queue
from service.settings import Settings
from service.tables import Job, Worker
from service.targets import workers
from service.targets.service import queue_of
from service.targets.workers import Advert
from tests.service.helpers import assert_error, mlp_model

AVX2 = "x86_64-avx2"
AMX = "x86_64-amx"


def _factory(client: TestClient) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = client.app.state.session_factory  # type: ignore[attr-defined]
    return factory


def advertise(
    client: TestClient, worker_class: str, *, pool: str | None = None, running: int = 0, seen_s_ago: float = 0
) -> str:
    """A worker's heartbeat, as worker/presence.py writes it, `seen_s_ago` seconds ago."""
    advert = Advert(
        id=f"{worker_class}-{pool}-{running}-{seen_s_ago}",
        hostname="host",
        pid=1,
        worker_class=worker_class,
        pool=pool,
        architecture="x86_64",
        features=("avx2",),
        cores=4,
        concurrency=2,
    )
    with transaction(_factory(client)) as session:
        workers.beat(session, advert, running)
        if seen_s_ago:
            past = utcnow() - timedelta(seconds=seen_s_ago)
            session.execute(update(Worker).where(Worker.id == advert.id).values(last_seen_at=past))
    return advert.id


def queued(settings: Settings, queue: str) -> list[list[Any]]:
    """The task and arguments of every message waiting in `queue` of the broker."""
    if settings.is_embedded:
        raw = [p.read_text() for p in (settings.broker_dir / "queue").iterdir() if p.name.endswith(f".{queue}.msg")]
    else:
        client = redis.Redis.from_url(settings.resolved_broker_url)
        try:
            raw = [m.decode() for m in client.lrange(f"{settings.broker_key_prefix}{queue}", 0, -1)]
        finally:
            client.close()
    messages = [json.loads(m) for m in raw]
    return [[m["headers"]["task"], *json.loads(base64.b64decode(m["body"]))[0]] for m in messages]


def test_targets_lists_each_class_with_its_live_workers_pools_and_load(client: TestClient) -> None:
    advertise(client, "x86_64-avx512", seen_s_ago=2 * 86400)  # forgotten by the next heartbeat
    advertise(client, AMX, pool="edge", running=1)
    advertise(client, AMX, running=2)
    advertise(client, AMX, pool="gone", seen_s_ago=600)  # seen recently, not live
    advertise(client, AVX2)
    listed = client.get("/v1/targets")
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert body["live_within_s"] == 90 and body["seen_within_s"] == 3600
    assert [c["name"] for c in body["classes"]] == [AMX, AVX2]
    amx = body["classes"][0]
    assert (amx["live_workers"], amx["running"], amx["capacity"], amx["pools"]) == (2, 3, 4, ["edge"])
    assert sorted(w["live"] for w in amx["workers"]) == [False, True, True]
    assert amx["architecture"] == "x86_64" and amx["features"] == ["avx2"]
    pools = {p["name"]: p for p in body["pools"]}
    assert pools["edge"]["classes"] == [AMX] and pools["edge"]["live_workers"] == 1
    assert pools["gone"]["live_workers"] == 0
    with _factory(client)() as session:  # a day without a heartbeat: the row is gone
        assert session.scalar(select(func.count()).select_from(Worker)) == 4


def test_a_job_that_targets_a_class_or_a_pool_is_sent_to_its_queue(client: TestClient, tmp_path: Path) -> None:
    settings: Settings = client.app.state.settings  # type: ignore[attr-defined]
    advertise(client, AVX2)
    advertise(client, AMX, pool="edge")
    model = mlp_model(client, tmp_path)
    sent = {}
    for target in ("any", AVX2, "edge", [AMX, AVX2]):
        response = client.post(
            "/v1/jobs", json={"model_id": model["id"], "recipe": {"mode": "dynamic"}, "target": target}
        )
        assert response.status_code == 202, response.text
        assert response.json()["target"] == target
        assert response.json()["measurements_pending"] is isinstance(target, list)  # until measured on the others
        sent[json.dumps(target)] = response.json()["id"]
    assert queued(settings, QUEUE) == [[RUN_JOB_TASK, sent['"any"']]]
    # A job that lists several runs where the first is; the others measure it once it has succeeded.
    assert sorted(queued(settings, class_queue(AVX2))) == sorted([[RUN_JOB_TASK, sent[f'"{AVX2}"']]])
    assert queued(settings, pool_queue("edge")) == [[RUN_JOB_TASK, sent['"edge"']]]
    assert queued(settings, class_queue(AMX)) == [[RUN_JOB_TASK, sent[json.dumps([AMX, AVX2])]]]
    with _factory(client)() as session:
        several = session.get(Job, sent[json.dumps([AMX, AVX2])])
        assert several is not None
        assert several.queues == [class_queue(AMX), class_queue(AVX2)] and several.measurements_pending
        anywhere = session.get(Job, sent['"any"'])
        assert anywhere is not None and anywhere.target is None and not anywhere.measurements_pending
        # What a hand-back or the sweep sends again goes where the job's first message went.
        assert queue_of(session, sent['"edge"']) == pool_queue("edge") and queue_of(session, anywhere.id) is None


def test_a_target_without_a_live_worker_is_refused_with_the_live_ones(client: TestClient, tmp_path: Path) -> None:
    model = mlp_model(client, tmp_path)

    def create(target: Any) -> Any:
        return client.post("/v1/jobs", json={"model_id": model["id"], "recipe": {"mode": "dynamic"}, "target": target})

    error = assert_error(create(AMX), 422, "invalid_target")  # no worker at all
    assert error["detail"] == {"field": "target", "unknown": [AMX], "classes": [], "pools": [], "not_live": []}
    advertise(client, AVX2, pool="edge")
    amx = advertise(client, AMX, seen_s_ago=120)  # its last heartbeat is older than QAAS_WORKER_LIVE_S
    error = assert_error(create([AVX2, AMX]), 422, "invalid_target")
    assert error["detail"]["unknown"] == [AMX] and error["detail"]["not_live"] == [AMX]
    assert (error["detail"]["classes"], error["detail"]["pools"]) == ([AVX2], ["edge"])
    assert AMX in error["message"] and f"{AVX2}, edge" in error["message"]
    with transaction(_factory(client)) as session:  # a worker that shut down is not live either
        session.execute(update(Worker).values(last_seen_at=utcnow()))
        workers.stopped(session, amx)
    assert assert_error(create(AMX), 422, "invalid_target")["detail"]["not_live"] == [AMX]
    assert client.get("/v1/jobs").json()["items"] == []


def test_a_target_no_worker_could_have_is_refused_as_invalid_target(client: TestClient, tmp_path: Path) -> None:
    model = mlp_model(client, tmp_path)
    for target, words in (("X86 AMX", "lower-case"), ([], "empty list"), (["any", AMX], "alone"), (7, "")):
        response = client.post(
            "/v1/jobs", json={"model_id": model["id"], "recipe": {"mode": "dynamic"}, "target": target}
        )
        error = assert_error(response, 422, "invalid_target")
        assert words in error["message"] and error["detail"]["field"].startswith("target"), error
    assert client.get("/v1/jobs").json()["items"] == []


def test_a_job_without_a_target_keeps_the_idempotency_digest_it_had_before_targets() -> None:
    body = JobCreate.model_validate({"model_id": "m", "recipe": {"mode": "dynamic"}})
    before = {k: v for k, v in body.model_dump(mode="json").items() if k != "target"}
    assert request_digest(body) == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert request_digest(body) != request_digest(body.model_copy(update={"target": AMX}))


def test_targets_needs_a_key_like_every_route_and_is_documented(auth_settings: Settings) -> None:
    with TestClient(create_app(auth_settings), raise_server_exceptions=False) as api:
        assert_error(api.get("/v1/targets"), 401, "unauthorized")
        with transaction(api.app.state.session_factory) as session:  # type: ignore[attr-defined]
            key = create_key(session, "acme").key
        assert api.get("/v1/targets", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        spec = api.get("/openapi.json").json()
    operation = spec["paths"]["/v1/targets"]["get"]
    assert operation["operationId"] == "list_targets" and operation["summary"]
    assert {"401", "429", "503"} <= set(operation["responses"])
    schemas = spec["components"]["schemas"]
    assert schemas["Targets"]["examples"] and schemas["TargetWorker"]["examples"]
    assert schemas["JobCreate"]["properties"]["target"]["examples"]
    assert "target" in schemas["JobOut"]["properties"] and {"worker_class", "pool"} <= set(
        schemas["Machine"]["properties"]
    )
    assert "measured_on" in schemas["JobResult"]["properties"] and "chosen" in schemas["MeasuredOn"]["properties"]
    examples = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert isinstance(examples["targets"]["value"]["target"], list)

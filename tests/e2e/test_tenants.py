"""Tenant isolation against the real processes, the way an operator runs them: `QAAS_AUTH=on`, keys
made with `python -m service.admin`, two tenants, and every operation the API documents.

The operations are read from the running API's own /openapi.json, so an endpoint added later is
checked too, or fails here until this test knows how to call it."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, text

from tests.e2e.conftest import Deployment, deploy, upload, wait_for_job
from tests.onnx_models import matmul_mlp
from tests.service.helpers import npz_bytes

pytestmark = pytest.mark.e2e

NOBODY = "00000000-0000-0000-0000-000000000000"
PUBLIC = {("GET", "/healthz"), ("GET", "/readyz")}


@dataclass
class World:
    dep: Deployment
    alice: str  # API keys
    bob: str
    ids: dict[str, str]  # alice's path parameters: model_id, dataset_id, job_id, name (an artifact)
    artifact_sha256: str
    operations: list[tuple[str, str, dict[str, Any]]]  # (method, path, OpenAPI operation)


def _admin(dep: Deployment, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "service.admin", *args], env=dep.env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module", params=["embedded", pytest.param("production", marks=pytest.mark.services)])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp(f"tenants-{request.param}")
    env = {"QAAS_AUTH": "on"}
    if request.param == "production":
        from tests.conftest import redis_prefix

        env |= {
            "QAAS_DATABASE_URL": request.getfixturevalue("postgres_url"),
            "QAAS_BROKER_URL": request.getfixturevalue("redis_url"),
            "QAAS_BROKER_KEY_PREFIX": f"{redis_prefix()}tenants:",
        }
    for dep in deploy(f"tenants-{request.param}", root, **env):
        run = uuid.uuid4().hex[:6]
        alice = _admin(dep, "create-key", "--tenant", f"alice-{run}").strip().splitlines()[-1]
        bob = _admin(dep, "create-key", "--tenant", f"bob-{run}").strip().splitlines()[-1]
        listed = _admin(dep, "list-keys", "--tenant", f"alice-{run}")
        assert alice[:13] in listed and alice not in listed  # the key itself is never shown again
        with dep.client(_as(alice)) as http:
            model_id = upload(http, "/v1/models", "m.onnx", matmul_mlp(root / "m.onnx").read_bytes())
            samples = np.random.default_rng(0).random((4, 1, 16), dtype=np.float32)
            dataset_id = upload(http, "/v1/datasets", "d.npz", npz_bytes(x=samples))
            quick = {"latency_runs": 3, "warmup_runs": 1}
            body = {"model_id": model_id, "calibration_dataset_id": dataset_id, "evaluation": quick}
            created = http.post("/v1/jobs", json=body)
            assert created.status_code == 202, created.text
            job, _ = wait_for_job(http, created.json()["id"])
            assert job["status"] == "succeeded", (job["error"], dep.log_tail())
            artifacts = {a["name"]: a for a in http.get(f"/v1/jobs/{job['id']}/artifacts").json()}
        spec = httpx.get(f"{dep.base_url}/openapi.json", timeout=30).json()
        operations = [(m.upper(), path, op) for path, ops in spec["paths"].items() for m, op in ops.items()]
        yield World(
            dep,
            alice,
            bob,
            {
                "model_id": model_id,
                "dataset_id": dataset_id,
                "job_id": job["id"],
                "name": "quantized.onnx",
                # No direct upload without S3 storage (these deployments store locally): alice has none, so
                # her id is one that does not exist. tests/service/test_direct_uploads.py checks another
                # tenant's upload on S3.
                "upload_id": str(uuid.uuid4()),
            },
            artifacts["quantized.onnx"]["sha256"],
            operations,
        )


def _path_params(op: dict[str, Any]) -> list[str]:
    return [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]


def _call(world: World, method: str, path: str, op: dict[str, Any], key: str | None, **values: str) -> httpx.Response:
    headers = _as(key) if key else {}
    body = {"json": {}} if "requestBody" in op and method != "GET" else {}
    with world.dep.client(headers) as http:
        return http.request(method, path.format(**values), **body)


def _alice_still_has_everything(world: World) -> None:
    with world.dep.client(_as(world.alice)) as http:
        assert http.get(f"/v1/models/{world.ids['model_id']}").status_code == 200
        assert http.get(f"/v1/datasets/{world.ids['dataset_id']}").status_code == 200
        job = http.get(f"/v1/jobs/{world.ids['job_id']}")
        assert job.status_code == 200 and job.json()["status"] == "succeeded", job.text
        download = http.get(f"/v1/jobs/{world.ids['job_id']}/artifacts/quantized.onnx")
        assert hashlib.sha256(download.content).hexdigest() == world.artifact_sha256


def test_every_operation_needs_a_valid_key(world: World) -> None:
    wrong = "qaas_00000000_" + "x" * 43
    for method, path, op in world.operations:
        values = {name: world.ids.get(name, NOBODY) for name in _path_params(op)}
        if (method, path) in PUBLIC:
            assert _call(world, method, path, op, None, **values).status_code == 200, path
            continue
        assert op.get("security"), f"{method} {path} is not marked as needing a key in the OpenAPI document"
        for key in (None, wrong, world.alice[:-1] + "?"):
            answer = _call(world, method, path, op, key, **values)
            assert answer.status_code == 401, (method, path, answer.status_code, answer.text)
            assert answer.json()["error"]["code"] == "unauthorized"
    _alice_still_has_everything(world)


def test_another_tenants_ids_answer_like_ids_that_do_not_exist(world: World) -> None:
    """Bob, on every operation that takes an id, with alice's ids and with ids nobody has: the same
    404, word for word (the id aside). Deletes and cancels included; alice loses nothing."""
    checked = 0
    for method, path, op in world.operations:
        params = _path_params(op)
        if not params:
            continue
        unknown = set(params) - set(world.ids)
        assert not unknown, f"{method} {path}: teach this test a value of alice's for {unknown}"
        theirs = _call(world, method, path, op, world.bob, **world.ids)
        missing_ids = {name: (NOBODY if name != "name" else world.ids["name"]) for name in params}
        missing = _call(world, method, path, op, world.bob, **missing_ids)
        assert theirs.status_code == missing.status_code == 404, (method, path, theirs.text, missing.text)
        shown = theirs.text
        for name in params:
            shown = shown.replace(world.ids[name], missing_ids[name])
        assert shown == missing.text, (method, path, theirs.text, missing.text)
        checked += 1
    assert checked >= 10  # the contract's id routes, at least
    _alice_still_has_everything(world)


def test_collections_and_new_jobs_stay_within_the_tenant(world: World, tmp_path: Path) -> None:
    """Every operation without an id, as bob: nothing of alice's shows, and what bob creates cannot
    reach alice's model or dataset (404, as for ids that do not exist)."""
    alice_ids = [world.ids["model_id"], world.ids["dataset_id"], world.ids["job_id"]]
    with world.dep.client(_as(world.bob)) as bob:
        for method, path, op in world.operations:
            if _path_params(op) or (method, path) in PUBLIC:
                continue
            if (method, path) == ("GET", "/metrics"):
                # It spans every tenant, so no tenant's key reads it (the operator token does).
                refused = bob.get(path)
                assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden", refused.text
            elif method == "GET":
                answer = bob.get(path)
                assert answer.status_code == 200, (path, answer.text)
                leaked = [i for i in alice_ids if i in answer.text]
                assert not leaked, f"GET {path} shows bob alice's {leaked}"
                if path == "/v1/usage":  # bob's own counts: alice's succeeded job is not among them
                    usage = answer.json()
                    assert usage["tenant"].startswith("bob-") and usage["jobs"]["succeeded"] == 0, usage
            elif (method, path) == ("POST", "/v1/jobs"):
                for body in (
                    {"model_id": world.ids["model_id"], "recipe": {"mode": "dynamic"}},
                    {"model_id": NOBODY, "recipe": {"mode": "dynamic"}},
                ):
                    refused = bob.post(path, json=body)
                    assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found", refused.text
            elif (method, path) == ("POST", "/v1/models"):
                own = bob.post(path, files={"file": ("m.onnx", matmul_mlp(tmp_path / "b.onnx").read_bytes())})
                assert own.status_code == 201, own.text
                body = {"model_id": own.json()["id"], "calibration_dataset_id": world.ids["dataset_id"]}
                refused = bob.post("/v1/jobs", json=body)
                assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found", refused.text
                with world.dep.client(_as(world.alice)) as alice:
                    alice_models = alice.get(path).json()
                assert own.json()["id"] not in str(alice_models)
            elif (method, path) == ("POST", "/v1/uploads"):
                body = {"files": [{"name": "w.bin", "size_bytes": 16}]}
                answer = bob.post(path, json=body)  # local storage: the service says to upload through it
                assert answer.status_code == 409, answer.text
                assert answer.json()["error"]["code"] == "direct_uploads_unavailable", answer.text
            elif (method, path) == ("POST", "/v1/datasets"):
                samples = np.random.default_rng(1).random((2, 1, 16), dtype=np.float32)
                own = bob.post(path, files={"file": ("d.npz", npz_bytes(x=samples))})
                assert own.status_code == 201, own.text
                with world.dep.client(_as(world.alice)) as alice:
                    alice_data = alice.get(path).json()
                assert own.json()["id"] not in str(alice_data)
            else:
                pytest.fail(f"{method} {path}: teach this test how bob calls it and what he must not see")
    with world.dep.client(_as(world.alice)) as alice:
        for path, key in (("/v1/models", "model_id"), ("/v1/datasets", "dataset_id"), ("/v1/jobs", "job_id")):
            assert world.ids[key] in [item["id"] for item in alice.get(path).json()["items"]]
    _alice_still_has_everything(world)


def test_a_revoked_key_is_refused_at_once(world: World) -> None:
    carol = _admin(world.dep, "create-key", "--tenant", f"carol-{uuid.uuid4().hex[:6]}").strip().splitlines()[-1]
    with world.dep.client(_as(carol)) as http:
        assert http.get("/v1/models").status_code == 200
        assert carol[:13] in _admin(world.dep, "revoke-key", carol[:13])
        refused = http.get("/v1/models")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"


def test_keys_are_stored_only_as_their_sha256(world: World) -> None:
    url = world.dep.env.get("QAAS_DATABASE_URL") or f"sqlite:///{world.dep.data_dir / 'qaas.db'}"
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = [dict(row._mapping) for row in conn.execute(text("SELECT * FROM api_keys"))]
    finally:
        engine.dispose()
    for key in (world.alice, world.bob):
        assert [r["key_sha256"] for r in rows].count(hashlib.sha256(key.encode()).hexdigest()) == 1
        assert key[14:] not in str(rows)  # the secret part is in no column of any row

"""The Python client against the real app: uploads, jobs, typed errors, auth and `Retry-After`."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from qaas_client import (
    AuthenticationError,
    Client,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    RateLimitedError,
)
from service.app import create_app
from service.auth import create_key
from service.database import transaction
from service.settings import Settings
from tests.client.conftest import AppTransport
from tests.onnx_models import conv_classifier
from tests.service.helpers import npz_bytes


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    model = conv_classifier(tmp_path / "classifier.onnx")
    calib = tmp_path / "calib.npz"
    calib.write_bytes(npz_bytes(input=np.random.default_rng(0).random((4, 1, 3, 8, 8), dtype=np.float32)))
    return model, calib


def test_quantize_uploads_what_is_local_and_queues_the_job(client: Client, files: tuple[Path, Path]) -> None:
    model_path, calib_path = files
    job = client.quantize(model_path, calibration=calib_path, mode="static", evaluation_settings={"latency_runs": 3})
    assert job.status == "queued" and job.recipe["mode"] == "static"
    models, datasets = list(client.list_models()), list(client.list_datasets())
    assert [m.id for m in models] == [job.raw["model_id"]] and models[0].name == "classifier"
    assert [d.id for d in datasets] == [job.raw["calibration_dataset_id"]] and datasets[0].num_samples == 4
    assert [j.id for j in client.list_jobs()] == [job.id]

    # Ids of what is already uploaded are used as they are; nothing is uploaded twice.
    again = client.quantize(models[0].id, calibration=datasets[0].id)
    assert again.raw["model_id"] == models[0].id and again.recipe["mode"] == "auto"
    assert len(list(client.list_models())) == 1
    assert client.quantize(models[0]).recipe["mode"] == "dynamic"  # no data: dynamic needs none


def test_the_same_idempotency_key_gives_the_same_job(client: Client, files: tuple[Path, Path]) -> None:
    model = client.upload_model(files[0])
    key = str(uuid.uuid4())
    first = client.create_job(model.id, recipe={"mode": "dynamic"}, idempotency_key=key)
    second = client.create_job(model.id, recipe={"mode": "dynamic"}, idempotency_key=key)
    third = client.create_job(model.id, recipe={"mode": "dynamic"})
    assert first.id == second.id != third.id


def test_failures_raise_typed_errors_with_the_service_code(
    client: Client, files: tuple[Path, Path], tmp_path: Path
) -> None:
    with pytest.raises(NotFoundError) as missing:
        client.get_job("no-such-job")
    assert (missing.value.code, missing.value.status) == ("not_found", 404)

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    with pytest.raises(InvalidInputError) as invalid:
        client.upload_model(garbage)
    assert invalid.value.code == "invalid_model" and invalid.value.status == 422

    model = client.upload_model(files[0])
    with pytest.raises(InvalidInputError) as recipe:
        client.quantize(model, mode="static")
    assert recipe.value.code == "invalid_recipe" and "calibration" in recipe.value.message

    client.quantize(model, mode="dynamic")  # queued: nobody runs it here
    with pytest.raises(ConflictError) as busy:
        client.delete_model(model.id)
    assert busy.value.code == "conflict"

    with pytest.raises(FileNotFoundError):
        client.quantize(tmp_path / "typo.onnx")


def test_a_deleted_dataset_is_gone(client: Client, files: tuple[Path, Path]) -> None:
    """Deleting through the client really deletes: the id answers 404 afterwards."""
    dataset = client.upload_dataset(files[1], name="calibration")
    assert client.get_dataset(dataset.id).name == "calibration"
    client.delete_dataset(dataset.id)
    with pytest.raises(NotFoundError):
        client.get_dataset(dataset.id)


@pytest.fixture
def auth_app(sqlite_settings: Settings) -> Iterator[TestClient]:
    settings = sqlite_settings.model_copy(update={"auth": "on", "rate_limit_per_minute": 60})
    with TestClient(create_app(settings), raise_server_exceptions=False) as app:
        yield app


def _key(app: TestClient, tenant: str) -> str:
    with transaction(app.app.state.session_factory) as session:  # type: ignore[attr-defined]
        return create_key(session, tenant).key


def test_the_api_key_is_sent_and_a_bad_one_is_an_authentication_error(auth_app: TestClient) -> None:
    with Client("http://127.0.0.1", api_key=_key(auth_app, "acme"), transport=AppTransport(auth_app)) as good:
        assert list(good.list_jobs()) == []
    bad = Client("http://127.0.0.1", api_key="qaas_00000000_wrong", transport=AppTransport(auth_app))
    with bad, pytest.raises(AuthenticationError) as refused:
        list(bad.list_models())
    assert refused.value.code == "unauthorized" and refused.value.status == 401


def test_rate_limited_requests_wait_what_retry_after_says_then_succeed(auth_app: TestClient) -> None:
    """60 requests a minute per key: once they are spent the service answers 429 with `Retry-After`;
    the client sleeps that long (really, so the bucket refills) and its retry goes through."""
    waits: list[tuple[str, float]] = []
    with Client(
        "http://127.0.0.1",
        api_key=_key(auth_app, "acme"),
        transport=AppTransport(auth_app),
        on_retry=lambda why, wait, _n: waits.append((why, wait)),
    ) as client:
        for _ in range(64):
            assert list(client.list_jobs()) == []
    assert waits, "the rate limit never answered 429"
    assert all(why.startswith("429 rate_limited") and wait >= 1 for why, wait in waits), waits


def test_giving_up_on_the_rate_limit_raises_it(auth_app: TestClient) -> None:
    with (
        Client(
            "http://127.0.0.1", api_key=_key(auth_app, "acme"), transport=AppTransport(auth_app), max_retries=0
        ) as client,
        pytest.raises(RateLimitedError) as limited,
    ):
        for _ in range(70):
            list(client.list_jobs())
    assert limited.value.code == "rate_limited" and "per minute" in limited.value.message

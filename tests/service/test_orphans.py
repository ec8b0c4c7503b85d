"""Stored objects no row points at are swept at the API's start once older than the grace; objects a row
points at, or that a queued or running job may still record, stay, and so does every young object."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.database import transaction, utcnow
from service.orphans import sweep_orphans
from service.settings import Settings
from service.storage import LocalStorage, Storage, open_storage
from service.storage.s3 import S3Storage
from service.tables import Artifact, Dataset, Job, Upload
from tests.service.helpers import model_row

Factory = sessionmaker[Session]
HOUR = 3600.0


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(Settings(data_dir=tmp_path))
    request.getfixturevalue("s3_env")
    s3 = open_storage(Settings(data_dir=tmp_path))
    assert isinstance(s3, S3Storage)
    return s3


def _dataset(dataset_id: str, deleted: bool = False) -> Dataset:
    return Dataset(
        id=dataset_id,
        name="d",
        storage_key=f"datasets/{dataset_id}/data",
        format="npz",
        num_samples=1,
        size_bytes=1,
        sha256="0" * 64,
        tensors={},
        has_labels=False,
        deleted_at=utcnow() if deleted else None,
    )


def _rows(factory: Factory) -> dict[str, str]:
    """A row of every kind that points at stored objects; the ids the keys below use."""
    with transaction(factory) as s:
        live, gone = model_row("models/live", ["weights.bin"]), model_row("models/deleted", deleted=True)
        s.add_all([live, gone, _dataset("live"), _dataset("deleted", deleted=True), _dataset("busy", deleted=True)])
        s.flush()
        done = Job(model_id=live.id, recipe={}, evaluation={}, status="succeeded")
        running = Job(model_id=gone.id, recipe={}, evaluation={}, status="running", calibration_dataset_id="busy")
        s.add_all([done, running])
        s.flush()
        s.add(
            Artifact(
                job_id=done.id,
                name="quantized.onnx",
                storage_key=f"jobs/{done.id}/2/quantized.onnx",
                size_bytes=1,
                sha256="0" * 64,
                media_type="application/octet-stream",
            )
        )
        s.add(  # an upload straight to the store, completed there, whose model's row has not landed yet
            Upload(
                model_id="uploading",
                files=[{"name": "w.bin", "size_bytes": 1, "sha256": None, "key": "models/uploading/w.bin"}],
                size_bytes=1,
                expires_at=utcnow() + timedelta(days=1),
            )
        )
        return {"done": done.id, "running": running.id}


def _store(storage: Storage, keys: list[str]) -> None:
    for key in keys:
        writer = storage.writer(key)
        writer.write(b"x")
        writer.commit()


def test_old_objects_no_row_points_at_go_and_the_rest_stays(storage: Storage, session_factory: Factory) -> None:
    ids = _rows(session_factory)
    kept = [
        "models/live/model.onnx",
        "models/live/weights.bin",
        "models/deleted/model.onnx",  # its row is deleted, but a running job reads it
        "models/uploading/w.bin",
        "datasets/live/data",
        "datasets/busy/data",  # deleted too, and a running job's calibration data
        f"jobs/{ids['done']}/2/quantized.onnx",
        f"jobs/{ids['running']}/1/quantized.onnx",  # stored, not recorded yet: its attempt is still running
        "other/not-ours.bin",  # outside the service's folders: never touched
    ]
    orphans = [
        "models/live/stray.bin",  # in a live model's folder, but not one of its files
        "models/never-recorded/model.onnx",
        "datasets/deleted/data",
        "datasets/never-recorded/data",
        f"jobs/{ids['done']}/1/quantized.onnx",  # an earlier attempt's, whose deletion failed
        "jobs/no-such-job/1/quantized.onnx",
        "uploads/never-recorded/external.zip",
    ]
    _store(storage, kept + orphans)
    everything = sorted(kept + orphans)

    # Young, all of them: nothing goes, whatever points at it.
    assert sweep_orphans(session_factory, storage, HOUR).objects == []
    assert sorted(obj.key for obj in storage.listing()) == everything

    # Two hours later they are old: what no row points at goes.
    later = utcnow() + timedelta(hours=2)
    assert sorted(sweep_orphans(session_factory, storage, HOUR, now=later).objects) == sorted(orphans)
    assert sorted(obj.key for obj in storage.listing()) == sorted(kept)


def test_unfinished_uploads_a_dead_process_left_are_aborted_and_those_in_progress_stay(
    s3_env: dict[str, str], session_factory: Factory, tmp_path: Path
) -> None:
    """An API that died while streaming a file into S3 left a multipart upload whose parts are billed and
    that no listing of objects shows. (moto starts every upload in 2010: only the parts' times are true.)"""
    storage = open_storage(Settings(data_dir=tmp_path))
    direct = storage.direct_uploads()
    assert direct is not None
    ids = _rows(session_factory)

    def started(key: str, parts: int = 1) -> str:
        upload_id = direct.start_upload(key)
        for number in range(1, parts + 1):
            url = direct.part_url(key, upload_id, number, 5, expires_s=60)
            assert httpx.put(url, content=b"part!").status_code == 200
        return upload_id

    kept = ["datasets/no-part-yet/data", f"jobs/{ids['running']}/1/quantized.onnx"]
    started(kept[0], parts=0)  # holds no bytes, and may have started a moment ago
    started(kept[1])  # a running job's attempt storing its artifact
    with transaction(session_factory) as s:  # a direct upload the client is still sending
        upload = s.scalars(select(Upload)).one()
        named = started("models/uploading/w.bin")
        upload.files = [{**upload.files[0], "upload_id": named}]
    orphans = ["datasets/api-died/data", "uploads/api-died/external.zip"]
    for key in orphans:
        started(key)
    everything = sorted([*kept, "models/uploading/w.bin", *orphans])

    # Their parts are young: all stay.
    assert sweep_orphans(session_factory, storage, HOUR).uploads == []
    assert sorted(u.key for u in direct.unfinished_uploads()) == everything
    later = sweep_orphans(session_factory, storage, HOUR, now=utcnow() + timedelta(hours=2))
    assert sorted(later.uploads) == orphans
    assert sorted(u.key for u in direct.unfinished_uploads()) == sorted([*kept, "models/uploading/w.bin"])


def test_listing_gives_each_object_its_size_and_when_it_was_written(storage: Storage) -> None:
    before = utcnow() - timedelta(seconds=2)  # S3 keeps whole seconds (moto: milliseconds)
    _store(storage, ["jobs/a/1/q.onnx", "jobs/ab/1/q.onnx", "models/m/model.onnx"])
    listed = {obj.key: obj for obj in storage.listing()}
    assert set(listed) >= {"jobs/a/1/q.onnx", "jobs/ab/1/q.onnx", "models/m/model.onnx"}
    assert all(before <= obj.modified_at <= utcnow() + timedelta(seconds=2) for obj in listed.values())
    assert listed["models/m/model.onnx"].size_bytes == 1
    assert [obj.key for obj in storage.listing("jobs/a")] == ["jobs/a/1/q.onnx"]  # a folder, not a string prefix
    assert list(storage.listing("nothing/here")) == []


def test_a_young_orphan_stays_beside_an_old_one_swept(session_factory: Factory, tmp_path: Path) -> None:
    """The real modification times (the local store's files), not a clock moved forward: a write in progress
    in `.tmp` and an object stored a minute ago stay; the same, two hours old, go."""
    storage = LocalStorage(tmp_path / "storage")
    storage.ensure()
    _store(storage, ["models/old/model.onnx", "models/young/model.onnx"])
    for name in ("old.part", "young.part"):
        (storage.tmp / name).write_bytes(b"x")
    two_hours_ago = time.time() - 2 * HOUR
    for path in (storage.root / "models/old/model.onnx", storage.tmp / "old.part"):
        os.utime(path, (two_hours_ago, two_hours_ago))
    swept = sweep_orphans(session_factory, storage, HOUR)
    assert sorted(swept.objects) == [".tmp/old.part", "models/old/model.onnx"]
    assert sorted(obj.key for obj in storage.listing()) == [".tmp/young.part", "models/young/model.onnx"]


def test_the_api_start_sweeps_orphans_in_the_background(sqlite_settings: Settings) -> None:
    storage = open_storage(sqlite_settings)
    _store(storage, ["models/never-recorded/model.onnx", "models/young/model.onnx"])
    old = time.time() - sqlite_settings.orphan_grace_s - HOUR
    path = sqlite_settings.resolved_storage_dir / "models/never-recorded/model.onnx"
    os.utime(path, (old, old))
    app = create_app(sqlite_settings)
    with TestClient(app):
        app.state.orphan_sweep.thread.join(timeout=30)
    assert [obj.key for obj in storage.listing()] == ["models/young/model.onnx"]

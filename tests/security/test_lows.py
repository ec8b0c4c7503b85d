"""The review's low findings: error texts that named the database, a cursor that made a 500, an API
that started open to the network, pages and downloads without real headers, a thread count taken at
its word, and a job's stderr that could forge log lines."""

from __future__ import annotations

import base64
import logging
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from core.errors import ErrorInfo
from core.evaluation import EvaluationSpec
from core.jobfile import ChildOutcome, JobFile, Limits
from core.lifecycle import AttemptStatus
from core.recipe import MAX_LISTED, MAX_NAME_CHARS, MAX_OP_TYPES, Recipe
from service.app import create_app
from service.run import API
from service.settings import Settings
from tests.e2e.conftest import clean_env, free_port
from tests.onnx_models import conv_classifier
from tests.service.helpers import assert_error, store_artifact
from tests.worker.engine.test_evaluate import FAST
from worker.engine.data import model_inputs
from worker.engine.evaluate import LatencyMeter, evaluate
from worker.engine.fidelity import FidelityEvaluator
from worker.engine.machine import usable_cores
from worker.engine.sensitivity import _session as sensitivity_session
from worker.supervise import read_outcome

# -- database errors say nothing about the database ---------------------------------------------

HIDDEN = "leaky"  # in the user, the database name and the socket path below


@pytest.fixture
def database_down(data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir, database_url=f"postgresql+psycopg://{HIDDEN}user@/{HIDDEN}db?host=/nonexistent/{HIDDEN}"
    )


def test_readiness_does_not_quote_the_database_error(database_down: Settings, caplog: pytest.LogCaptureFixture) -> None:
    with TestClient(create_app(database_down), raise_server_exceptions=False) as api:
        response = api.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"]["ok"] is False
    assert HIDDEN not in response.text
    assert HIDDEN in caplog.text  # the operator still learns what failed


@pytest.mark.parametrize("auth", ["off", "on"])
def test_requests_do_not_quote_the_database_error(database_down: Settings, auth: str) -> None:
    settings = database_down.model_copy(update={"auth": auth})
    key = "qaas_deadbeef_" + "x" * 43
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        response = api.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert_error(response, 503, "unavailable")
    assert HIDDEN not in response.text


# -- pagination ----------------------------------------------------------------------------------


def test_a_cursor_with_a_naive_timestamp_is_a_400(sqlite_settings: Settings) -> None:
    cursor = base64.urlsafe_b64encode(b"2024-01-01T00:00:00|x").decode().rstrip("=")
    with TestClient(create_app(sqlite_settings), raise_server_exceptions=False) as api:
        for path in ("/v1/models", "/v1/datasets", "/v1/jobs"):
            assert_error(api.get(path, params={"cursor": cursor}), 400, "invalid_request")


# -- no open API on the network by accident --------------------------------------------------------


def start_api(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    env = clean_env(QAAS_DATA_DIR=str(tmp_path / "var"), QAAS_HOST="0.0.0.0", QAAS_PORT=str(port), **env)
    return subprocess.Popen(API, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), port


def test_the_api_refuses_to_listen_on_the_network_with_auth_off(tmp_path: Path) -> None:
    proc, _ = start_api(tmp_path, QAAS_AUTH="off")
    try:
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, output
    assert "QAAS_ALLOW_INSECURE=1" in output and "QAAS_AUTH=on" in output


def test_the_operator_may_insist(tmp_path: Path) -> None:
    proc, port = start_api(tmp_path, QAAS_AUTH="off", QAAS_ALLOW_INSECURE="1")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


# -- headers of the report page and of downloads ----------------------------------------------------

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"


def test_report_page_and_downloads_carry_real_headers(client: TestClient, tmp_path: Path) -> None:
    model = client.post("/v1/models", files={"file": ("m.onnx", conv_classifier(tmp_path / "m.onnx").read_bytes())})
    job = client.post("/v1/jobs", json={"model_id": model.json()["id"], "recipe": {"mode": "dynamic"}}).json()
    # What a sniffing browser would render:
    store_artifact(client, job["id"], b"<html><script>alert(1)</script></html>", tmp_path)
    report = client.get(f"/v1/jobs/{job['id']}/report.html")
    assert report.status_code == 200
    assert report.headers["content-security-policy"] == CSP
    assert report.headers["x-content-type-options"] == "nosniff"
    for path in (f"/v1/jobs/{job['id']}/artifacts/quantized.onnx", f"/v1/models/{model.json()['id']}/file"):
        download = client.get(path)
        assert download.status_code == 200, path
        assert download.headers["content-disposition"].startswith("attachment;"), path
        assert download.headers["x-content-type-options"] == "nosniff", path
        assert download.headers["content-security-policy"] == CSP, path


# -- lists in a recipe are capped, and so is each name in them ---------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [
        ("nodes_to_exclude", ["conv"] * (MAX_LISTED + 1), "too_long"),
        ("nodes_to_exclude", ["n" * (MAX_NAME_CHARS + 1)], "string_too_long"),
        ("op_types_to_quantize", ["Conv"] * (MAX_OP_TYPES + 1), "too_long"),
        ("op_types_to_quantize", ["C" * (MAX_NAME_CHARS + 1)], "string_too_long"),
    ],
    ids=["nodes_to_exclude-list", "nodes_to_exclude-item", "op_types_to_quantize-list", "op_types_to_quantize-item"],
)
def test_recipe_lists_and_their_items_are_capped(
    client: TestClient, tmp_path: Path, field: str, value: list[str], kind: str
) -> None:
    """The lists repeat a real node ("conv") or operator ("Conv") of the model: only the caps refuse them."""
    model = client.post("/v1/models", files={"file": ("m.onnx", conv_classifier(tmp_path / "m.onnx").read_bytes())})
    body = {"model_id": model.json()["id"], "recipe": {"mode": "dynamic", field: value}}
    error = assert_error(client.post("/v1/jobs", json=body), 422, "invalid_recipe")
    assert error["detail"]["field"].startswith(f"recipe.{field}"), error
    assert [e["type"] for e in error["detail"]["errors"]] == [kind], error
    assert client.get("/v1/jobs").json()["items"] == []


# -- the worker, not the client, decides how many threads a job gets -----------------------------------


def test_threads_are_clamped_to_the_cores_and_the_clamp_is_recorded(tmp_path: Path) -> None:
    model = conv_classifier(tmp_path / "m.onnx")
    asked = usable_cores() + 62
    spec = FAST.__class__(**{**FAST.__dict__, "threads": asked})
    result = evaluate(model, model, spec, data=None)
    assert result.facts.threads == usable_cores()
    assert result.facts.threads_requested == asked
    assert result.facts.threads_clamped is True
    assert result.machine.threads == usable_cores()
    assert any(f"asked for {asked} threads" in w for w in result.warnings)


def test_mode_auto_and_compare_sessions_are_clamped_too(tmp_path: Path) -> None:
    """Mode auto's search times candidates (LatencyMeter), and auto and compare score them
    (FidelityEvaluator) and rank tensors (sensitivity) in sessions of their own, with the job's `threads`."""
    model = conv_classifier(tmp_path / "m.onnx")
    asked = usable_cores() + 62
    feed = {"input": np.zeros((1, 3, 8, 8), np.float32)}
    meter = LatencyMeter(model, feed, threads=asked, warmup_runs=0)
    meter.compare(model, 1)
    sessions = {
        "latency": meter._reference,
        "fidelity": FidelityEvaluator(model, None, model_inputs(model), None, 0.0, threads=asked)._reference(),
        "sensitivity": sensitivity_session(model, asked),
    }
    threads = {name: s.get_session_options().intra_op_num_threads for name, s in sessions.items() if s is not None}
    assert threads == dict.fromkeys(sessions, usable_cores())


# -- a job's stderr cannot forge the worker's log ---------------------------------------------------


def test_the_job_process_stderr_is_logged_on_one_escaped_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    JobFile("j", Path("model.onnx"), (), Recipe(), EvaluationSpec(1, 0, None, 1, None, 1.0), Limits()).write(workdir)
    forged = "2030-01-01 00:00:00 INFO worker.runner: job 42: attempt 1 finished\r\nadmin logged in"
    (workdir / "stderr.log").write_text(f"Traceback (most recent call last):\nboom\n{forged}\n")
    caplog.set_level(logging.WARNING, logger="worker.supervise")
    outcome = read_outcome(1, workdir)
    assert outcome.status == "failed"
    lines = [r.getMessage() for r in caplog.records if r.name == "worker.supervise"]
    assert len(lines) == 1
    assert "\n" not in lines[0] and "\r" not in lines[0]
    assert "\\nboom\\n2030-01-01" in lines[0]  # the text is there, escaped


def test_a_job_that_failed_in_the_engine_leaves_its_traceback_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The job process catches the error, answers `failed` and exits 0; its scratch folder, with the
    traceback in stderr.log, is deleted after this read: the worker's log is the only copy left."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    error = ErrorInfo("quantization_failed", "ValueError during quantizing: bad", {"stage": "quantizing"})
    ChildOutcome(AttemptStatus.FAILED, error=error).write(workdir)
    (workdir / "stderr.log").write_text('Traceback (most recent call last):\n  File "x.py"\nValueError: bad\n')
    caplog.set_level(logging.WARNING, logger="worker.supervise")
    outcome = read_outcome(0, workdir)
    assert outcome.status == "failed" and outcome.error == error
    lines = [r.getMessage() for r in caplog.records if r.name == "worker.supervise"]
    assert len(lines) == 1 and "(quantization_failed)" in lines[0]
    assert "\\nValueError: bad" in lines[0] and "\n" not in lines[0]
    # A job that succeeded, or failed without a word on stderr, logs nothing here.
    caplog.clear()
    (workdir / "stderr.log").write_text("")
    assert read_outcome(0, workdir).status == "failed"
    assert not [r for r in caplog.records if r.name == "worker.supervise"]

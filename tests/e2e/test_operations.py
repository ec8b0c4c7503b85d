"""A deployment as an operator runs it: auth on, JSON logs, a metrics token. Swagger UI and ReDoc in
a real browser with the network cut off; /metrics and the log lines of a real job."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.browser import Browser, poll
from tests.e2e.conftest import Deployment, deploy
from tests.onnx_models import conv_classifier
from tests.service.helpers import npz_bytes
from tests.sse import EventReader

pytestmark = pytest.mark.e2e
METRICS_TOKEN = "operator-token-for-the-tests"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    yield from deploy(
        "secured",
        tmp_path_factory.mktemp("secured"),
        QAAS_AUTH="on",
        QAAS_LOG_FORMAT="json",
        QAAS_METRICS_TOKEN=METRICS_TOKEN,
    )


@pytest.fixture(scope="module")
def api_key(secured: Deployment) -> str:
    made = subprocess.run(
        [sys.executable, "-m", "service.admin", "create-key", "--tenant", "acme", "--name", "browser"],
        env=secured.env,
        check=True,
        capture_output=True,
        text=True,
    )
    return made.stdout.strip().splitlines()[-1]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    page = Browser(tmp_path / "profile")
    try:
        yield page
    finally:
        page.close()


def _open(browser: Browser, operation: str) -> str:
    """Expand an operation in Swagger UI and press "Try it out"; returns its block's CSS selector."""
    block = f'[id$="-{operation}"].opblock'
    browser.click(f"{block} .opblock-summary-control")
    browser.wait_for(f"!!document.querySelector('{block} .try-out__btn')", f"{operation} to expand")
    browser.click(f"{block} .try-out__btn")
    browser.wait_for(f"!!document.querySelector('{block} .execute')", f"{operation}'s Execute button")
    return block


def _execute(browser: Browser, block: str) -> tuple[int, Any]:
    """Press Execute and read the status and the JSON body Swagger UI shows."""
    if browser.evaluate(f"!!document.querySelector('{block} .btn-clear')"):
        browser.click(f"{block} .btn-clear")  # the previous answer goes
        browser.wait_for(f"!document.querySelector('{block} .live-responses-table')", "the old answer to clear")
    browser.click(f"{block} .execute")
    status = browser.wait_for(
        f"(() => {{ const e = document.querySelector('{block} .live-responses-table tbody .response-col_status');"
        " return e && e.textContent.trim(); })()",
        "the response",
    )
    body = browser.evaluate(
        f"(() => {{ const e = document.querySelector('{block} .live-responses-table tbody .highlight-code pre');"
        " return e && e.textContent; })()"
    )
    try:
        return int(status), json.loads(body) if body else None
    except ValueError:
        html = browser.evaluate(f"document.querySelector('{block} .live-responses-table').outerHTML")
        raise AssertionError(f"unreadable answer {status!r} {body!r}: {html[:3000]}") from None


def test_swagger_ui_works_offline_end_to_end(
    secured: Deployment, api_key: str, browser: Browser, tmp_path: Path
) -> None:
    model_path = conv_classifier(tmp_path / "classifier.onnx", hidden=8)
    data_path = tmp_path / "calib.npz"
    data_path.write_bytes(npz_bytes(input=np.random.default_rng(0).random((4, 1, 3, 8, 8), dtype=np.float32)))
    browser.goto(f"{secured.base_url}/docs")
    spec = json.loads(subprocess.run(["curl", "-s", f"{secured.base_url}/openapi.json"], capture_output=True).stdout)
    expected = {(m.upper(), p) for p, methods in spec["paths"].items() for m in methods}
    count = len(expected)
    browser.wait_for(f"document.querySelectorAll('.opblock').length >= {count}", "every operation to be listed")
    listed = browser.evaluate(
        "[...document.querySelectorAll('.opblock')].map(b => [b.querySelector('.opblock-summary-method')"
        ".textContent.trim(), b.querySelector('.opblock-summary-path').getAttribute('data-path')])"
    )
    assert {(m, p) for m, p in listed} == expected

    # Authorize with the API key.
    browser.click(".btn.authorize")
    browser.wait_for("!!document.querySelector('.auth-container input')", "the Authorize dialog")
    browser.type_into(".auth-container input", api_key)
    browser.click(".auth-btn-wrapper .btn.authorize")
    browser.wait_for("!!document.querySelector('.auth-btn-wrapper .btn-done')", "the key to be accepted")
    browser.click(".auth-btn-wrapper .btn-done")

    # Upload a model and a dataset through the file picker.
    block = _open(browser, "upload_model")
    browser.set_file(f"{block} input[type=file]", model_path)
    status, model = _execute(browser, block)
    assert status == 201, model
    assert model["name"] == "classifier" and model["external_data"] == []  # nothing made up by the form
    block = _open(browser, "upload_dataset")
    browser.set_file(f"{block} input[type=file]", data_path)
    status, dataset = _execute(browser, block)
    assert status == 201, dataset
    assert dataset["name"] == "calib" and dataset["format"] == "npz"

    # Create a job by editing the example body.
    block = _open(browser, "create_job")
    body = {
        "model_id": model["id"],
        "calibration_dataset_id": dataset["id"],
        "recipe": {"mode": "static", "per_channel": True},
        "evaluation": {"latency_runs": 5, "warmup_runs": 1},
    }
    browser.type_into(f"{block} textarea.body-param__text", json.dumps(body))
    status, job = _execute(browser, block)
    assert status == 202, job

    # Get the job until it succeeded, then read its report.
    block = _open(browser, "get_job")
    browser.type_into(f'{block} tr[data-param-name="job_id"] input', job["id"])

    def finished() -> Any:
        status, found = _execute(browser, block)
        assert status == 200, found
        return found if found["status"] in ("succeeded", "failed", "cancelled") else None

    done = poll(finished, "the job to finish")
    assert done["status"] == "succeeded", done["error"]
    block = _open(browser, "get_report")
    browser.type_into(f'{block} tr[data-param-name="job_id"] input', job["id"])
    status, report = _execute(browser, block)
    assert status == 200 and report["quantized"]["size_bytes"] > 0, report
    browser.screenshot(tmp_path / "swagger.png")

    # Nothing left the machine, nothing failed to load, and the key went with every API call.
    requests = browser.network("Network.requestWillBeSent")
    urls = [r["request"]["url"] for r in requests]
    assert all(u.startswith((secured.base_url, "data:", "blob:", "about:")) for u in urls), urls
    assert browser.network("Network.loadingFailed") == []
    api_calls = [r for r in requests if "/v1/" in r["request"]["url"]]
    assert len(api_calls) >= 5
    assert all(r["request"]["headers"].get("Authorization") == f"Bearer {api_key}" for r in api_calls)


def test_redoc_works_offline(secured: Deployment, browser: Browser) -> None:
    browser.goto(f"{secured.base_url}/redoc")
    browser.wait_for("document.querySelectorAll('[data-section-id^=\"operation/\"]').length > 0", "ReDoc to render")
    sections = browser.evaluate(
        "[...new Set([...document.querySelectorAll('[data-section-id^=\"operation/\"]')]"
        ".map(e => e.getAttribute('data-section-id')))]"
    )
    assert {"operation/create_job", "operation/get_job", "operation/job_events"} <= set(sections)
    # ReDoc's bundle links its logo on a CDN; the page's policy blocks it before any network is tried.
    blocked = {f["requestId"] for f in browser.network("Network.loadingFailed") if f.get("blockedReason") == "csp"}
    outside = [
        r["request"]["url"]
        for r in browser.network("Network.requestWillBeSent")
        if not r["request"]["url"].startswith((secured.base_url, "data:", "blob:", "about:"))
        and r["requestId"] not in blocked
    ]
    assert outside == []
    assert all(f["requestId"] in blocked for f in browser.network("Network.loadingFailed"))


def test_metrics_and_json_logs_follow_a_real_job(secured: Deployment, api_key: str, tmp_path: Path) -> None:
    key = {"Authorization": f"Bearer {api_key}"}
    model_path = conv_classifier(tmp_path / "m.onnx", hidden=8)
    with secured.client() as http:
        model = http.post("/v1/models", headers=key, files={"file": ("m.onnx", model_path.read_bytes())}).json()
        created = http.post(
            "/v1/jobs",
            headers={**key, "X-Request-ID": "e2e-request-1"},
            json={"model_id": model["id"], "recipe": {"mode": "dynamic"}, "evaluation": {"latency_runs": 3}},
        )
        assert created.status_code == 202 and created.headers["x-request-id"] == "e2e-request-1"
        with http.stream("GET", f"/v1/jobs/{created.json()['id']}/events", headers=key) as response:
            job = EventReader(response).until_end()[-1].data
        assert job["status"] == "succeeded", job["error"]
        assert http.get("/metrics", headers=key).status_code == 403
        metrics = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert metrics.status_code == 200
    text = metrics.text
    assert 'qaas_job_duration_seconds_count{mode="dynamic",status="succeeded"}' in text
    assert 'qaas_http_request_duration_seconds_count{method="POST",route="/v1/jobs",status="202"}' in text
    assert "qaas_queue_depth" in text and 'qaas_jobs{status="succeeded"}' in text

    def lines(name: str) -> list[dict[str, Any]]:
        raw = [line for line in (secured.logs / f"{name}.log").read_text().splitlines() if line.strip()]
        return [json.loads(line) for line in raw]  # every line is one JSON object

    api = [line for line in lines("api") if line.get("request_id") == "e2e-request-1"]
    assert api and all(line["tenant"] == "acme" for line in api), api
    ours = [line for line in lines("worker") if line.get("job_id") == job["id"]]
    assert ours, "no worker log line names the job"
    assert all(
        (line["attempt"], line["request_id"], line["tenant"]) == (1, "e2e-request-1", "acme") for line in ours
    ), ours

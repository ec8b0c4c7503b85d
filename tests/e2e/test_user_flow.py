"""The walking skeleton end to end: upload, quantize, poll, download, over HTTP to real processes."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.reports.html import fmt_bytes, fmt_db, fmt_float, fmt_ms, fmt_pct, fmt_points, fmt_value, fmt_x
from tests.browser import chromium, rendered_dom, visible_text
from tests.e2e.conftest import Deployment, follow_job, wait_for_job
from tests.onnx_models import conv_classifier, matmul_mlp
from tests.service.helpers import npz_bytes

pytestmark = pytest.mark.e2e


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_static_quantization_from_upload_to_download(any_storage: Deployment, tmp_path: Path) -> None:
    deployment = any_storage
    model_path = conv_classifier(tmp_path / "classifier.onnx", hidden=16)
    samples = np.random.default_rng(1).random((16, 1, 3, 8, 8), dtype=np.float32)
    with deployment.client() as http:
        model = http.post("/v1/models", files={"file": ("classifier.onnx", model_path.read_bytes())})
        assert model.status_code == 201, model.text
        dataset = http.post("/v1/datasets", files={"file": ("calib.npz", npz_bytes(input=samples))})
        assert dataset.status_code == 201, dataset.text
        created = http.post(
            "/v1/jobs",
            json={
                "model_id": model.json()["id"],
                "calibration_dataset_id": dataset.json()["id"],
                "recipe": {"mode": "static", "format": "qdq", "calibration_method": "minmax"},
                "evaluation": {"latency_runs": 10, "warmup_runs": 2},
            },
        )
        assert created.status_code == 202, created.text
        assert created.headers["location"] == f"/v1/jobs/{created.json()['id']}"
        # Followed live over Server-Sent Events: status changes, progress, then the whole job.
        job, events = follow_job(http, created.json()["id"])
        assert job["status"] == "succeeded", (job["error"], deployment.log_tail())
        assert job == http.get(f"/v1/jobs/{job['id']}").json()
        assert job["stage"] == "done" and job["progress"] == 1.0 and job["attempts"] == 1
        statuses = [e.data["status"] for e in events if e.event == "status"]
        assert statuses[-1] == "succeeded" and "running" in statuses, statuses
        progress = [e.data["progress"] for e in events if e.event == "progress"]
        assert progress == sorted(progress) and progress[-1] == 1.0, f"progress went backwards: {progress}"
        assert job["started_at"] and job["finished_at"] and job["finished_at"] >= job["started_at"]

        result = job["result"]
        assert result["original"]["size_bytes"] == model_path.stat().st_size
        assert result["quantized"]["size_bytes"] > 0

        artifacts = {a["name"]: a for a in http.get(f"/v1/jobs/{job['id']}/artifacts").json()}
        assert {"quantized.onnx", "report.json"} <= set(artifacts)
        download = http.get(artifacts["quantized.onnx"]["url"])
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == artifacts["quantized.onnx"]["sha256"]
        assert len(download.content) == artifacts["quantized.onnx"]["size_bytes"] == result["quantized"]["size_bytes"]

        report = http.get(f"/v1/jobs/{job['id']}/report")
        assert report.status_code == 200
        assert report.json()["quantized"]["size_bytes"] == result["quantized"]["size_bytes"]
        assert http.get(f"/v1/jobs/{job['id']}/report.html").status_code == 200
    if "QAAS_STORAGE_URL" in deployment.env:  # every file went to the object store, none to a disk
        assert not (deployment.data_dir / "storage").exists() or not any((deployment.data_dir / "storage").rglob("*.*"))

    quantized = onnx.load_from_string(download.content)
    onnx.checker.check_model(quantized)
    ops = {n.op_type for n in quantized.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    feed = {"input": samples[0]}
    expected = ort.InferenceSession(str(model_path)).run(None, feed)[0]
    got = ort.InferenceSession(download.content).run(None, feed)[0]
    assert _cosine(expected, got) > 0.98


def test_dynamic_quantization_without_data(deployment: Deployment, tmp_path: Path) -> None:
    model_path = matmul_mlp(tmp_path / "mlp.onnx", features=32, hidden=64)
    with deployment.client() as http:
        model = http.post("/v1/models", files={"file": ("mlp.onnx", model_path.read_bytes())}).json()
        created = http.post(
            "/v1/jobs",
            json={"model_id": model["id"], "recipe": {"mode": "dynamic"}, "evaluation": {"latency_runs": 5}},
        )
        assert created.status_code == 202, created.text
        job, _ = wait_for_job(http, created.json()["id"])
        assert job["status"] == "succeeded", (job["error"], deployment.log_tail())
        assert job["calibration_dataset_id"] is None
        content = http.get(f"/v1/jobs/{job['id']}/artifacts/quantized.onnx").content
        # The model that produced the job can be deleted once the job has ended; the job stays.
        assert http.delete(f"/v1/models/{model['id']}").status_code == 204
        assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
    ops = {n.op_type for n in onnx.load_from_string(content).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops, ops


def test_a_failed_job_says_why_and_the_worker_goes_on(deployment: Deployment, tmp_path: Path) -> None:
    # The graph declares 4 input channels but its Conv weights expect 3: the checker accepts it,
    # ONNX Runtime fails when calibration runs it.
    broken = onnx.load(str(conv_classifier(tmp_path / "c.onnx")))
    broken.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 4
    broken_path = tmp_path / "broken.onnx"
    onnx.save(broken, str(broken_path))
    samples = np.random.default_rng(0).random((4, 1, 4, 8, 8), dtype=np.float32)
    with deployment.client() as http:
        model = http.post("/v1/models", files={"file": ("broken.onnx", broken_path.read_bytes())})
        assert model.status_code == 201, model.text
        data = http.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(input=samples))}).json()
        failed = http.post("/v1/jobs", json={"model_id": model.json()["id"], "calibration_dataset_id": data["id"]})
        assert failed.status_code == 202, failed.text
        mlp = http.post("/v1/models", files={"file": ("mlp.onnx", matmul_mlp(tmp_path / "m.onnx").read_bytes())})
        ok = http.post(
            "/v1/jobs",
            json={
                "model_id": mlp.json()["id"],
                "recipe": {"mode": "dynamic"},
                "evaluation": {"latency_runs": 3},
            },
        ).json()
        first, _ = wait_for_job(http, failed.json()["id"])
        second, _ = wait_for_job(http, ok["id"])
        assert http.get(f"/v1/jobs/{first['id']}/artifacts").json() == []
    assert first["status"] == "failed", first
    assert first["error"]["code"] == "quantization_failed", first["error"]
    assert "Traceback" not in first["error"]["message"]
    assert first["result"] is None
    assert second["status"] == "succeeded", second["error"]


@dataclass
class LabelledJob:
    """A finished static job on a labelled dataset: the job as the API returns it and its report.html."""

    job: dict[str, Any]
    page: str


@pytest.fixture(scope="module")
def labelled_job(embedded: Deployment, tmp_path_factory: pytest.TempPathFactory) -> LabelledJob:
    """Labels agree with the float model on 12 of 16 samples, so its top-1 must be exactly 0.75."""
    model_path = conv_classifier(tmp_path_factory.mktemp("labelled") / "classifier.onnx", hidden=16)
    samples = np.random.default_rng(7).random((16, 1, 3, 8, 8), dtype=np.float32)
    session = ort.InferenceSession(str(model_path))
    predicted = np.array([int(np.argmax(session.run(None, {"input": s})[0])) for s in samples])
    labels = predicted.copy()
    labels[12:] = (labels[12:] + 1) % 4
    with embedded.client() as http:
        model = http.post("/v1/models", files={"file": ("c.onnx", model_path.read_bytes())}).json()
        data = http.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(input=samples, __labels__=labels))}).json()
        assert data["has_labels"] is True
        created = http.post(
            "/v1/jobs",
            json={
                "model_id": model["id"],
                "calibration_dataset_id": data["id"],
                "recipe": {"mode": "static", "calibration_method": "percentile", "per_channel": True},
                "evaluation": {"latency_runs": 5},
            },
        ).json()
        job, _ = wait_for_job(http, created["id"])
        page = http.get(f"/v1/jobs/{job['id']}/report.html")
    assert job["status"] == "succeeded", job["error"]
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    return LabelledJob(job, page.text)


def test_accuracy_over_http_matches_a_direct_onnx_runtime_run(labelled_job: LabelledJob) -> None:
    result = labelled_job.job["result"]
    assert result["original"]["accuracy"] == 0.75
    accuracy = result["comparison"]["accuracy"]
    assert accuracy["metric"] == "top1" and accuracy["original"] == 0.75
    assert accuracy["delta"] == accuracy["quantized"] - accuracy["original"]
    assert any("calibration" in w for w in result["warnings"])  # evaluation reused the calibration samples
    assert {o["name"] for o in result["comparison"]["outputs"]} == {"logits"}
    assert result["machine"]["onnxruntime"] and result["peak_memory_bytes"] > 0


def _sections(dom: str) -> dict[str, str]:
    """The page's sections as a browser shows them: heading (or class, for the cards) -> DOM."""
    found = {}
    for attrs, body in re.findall(r"<section([^>]*)>(.*?)</section>", dom, re.DOTALL):
        heading = re.search(r"<h2>(.*?)</h2>", body, re.DOTALL)
        name = visible_text(heading.group(1)).strip() if heading else re.sub(r'.*class="([^"]*)".*', r"\1", attrs)
        found[name] = body
    return found


def test_the_report_of_a_real_job_shows_its_numbers_in_a_browser(labelled_job: LabelledJob, tmp_path: Path) -> None:
    """The report.html the API served for a real job, as Chromium lays it out: every section shows
    this job's own values, as the JSON API gives them."""
    exe = chromium()
    page = tmp_path / "report.html"
    page.write_text(labelled_job.page, encoding="utf-8")
    dom = rendered_dom(exe, page, tmp_path)
    sections = _sections(dom)
    job, result = labelled_job.job, labelled_job.job["result"]
    original, quantized, comparison = result["original"], result["quantized"], result["comparison"]

    cards = visible_text(sections["cards"])
    for shown in (
        f"Size on disk {fmt_bytes(quantized['size_bytes'])} from {fmt_bytes(original['size_bytes'])}",
        f"Median latency (p50) {fmt_ms(quantized['latency_ms']['p50'])} from {fmt_ms(original['latency_ms']['p50'])}",
        f"speedup {fmt_x(comparison['speedup_p50'])}",
        f"Accuracy (top1) {fmt_pct(comparison['accuracy']['quantized'], 2)} from 75.00%",
        f"delta {fmt_points(comparison['accuracy']['delta'])}",
        "Fidelity within budget" if comparison["fidelity"]["within_budget"] else "Fidelity outside budget",
    ):
        assert shown in cards, (shown, cards)

    latency = sections["Latency"]
    plot = re.search(r'<svg[^>]*aria-label="Latency distribution of both models".*?</svg>', latency, re.DOTALL)
    assert plot, "no latency plot"
    assert re.findall(r"<text[^>]*>(original|quantized)</text>", plot.group(0)) == ["original", "quantized"]
    assert plot.group(0).count("<rect") == 2  # one p50-p90 box per model
    table = visible_text(latency)
    for key, name in (("p50", "p50 (median)"), ("p90", "p90"), ("p99", "p99")):
        row = f"{name} {fmt_ms(original['latency_ms'][key])} {fmt_ms(quantized['latency_ms'][key])}"
        assert row in table, (row, table)

    fidelity = visible_text(sections["Fidelity per output"])
    [logits] = comparison["outputs"]
    row = (
        f"{fmt_float(logits['cosine'], 6)} {fmt_db(logits['sqnr_db'])} {fmt_float(logits['max_abs_error'])} "
        f"{fmt_float(logits['mean_abs_error'])} {fmt_pct(logits['top1_agreement'], 2)}"
    )
    assert fidelity.index("logits") < fidelity.index(row), (row, fidelity)
    # Labels and no fidelity floor: the top-1 drop is the budget, and the page says the output is not counted.
    assert not logits["budgeted"] and "not budgeted" in fidelity

    recipe = visible_text(sections["Recipe"])
    assert "mode static" in recipe and "calibration method percentile" in recipe and "per channel yes" in recipe
    for key, value in job["recipe"].items():
        assert f"{key.replace('_', ' ')} {visible_text(fmt_value(value)).strip()}" in recipe, (key, recipe)

"""Every mode and data form through HTTP at least once, on the embedded default."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from PIL import Image

from tests.e2e.conftest import Deployment, follow_job, upload, wait_for_job
from tests.onnx_models import (
    INTEGER_QUANTIZED_OPS,
    cancelling_matmuls,
    conv_classifier,
    labelled_by_the_model,
    matmul_mlp,
)
from tests.service.helpers import npz_bytes

pytestmark = pytest.mark.e2e


def _images_zip() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(buf, "w") as archive:
        for label in ("cat", "dog"):
            for i in range(3):
                image = Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8))
                data = io.BytesIO()
                image.save(data, format="PNG" if i % 2 else "JPEG")
                archive.writestr(f"{label}/{i}.{'png' if i % 2 else 'jpg'}", data.getvalue())
    return buf.getvalue()


def _send_jobs(http: Any, jobs: dict[Any, tuple[str, str | None, dict[str, Any]]], **evaluation: int) -> dict[Any, str]:
    """Send every (model, calibration dataset, recipe) job, in order; their ids by key."""
    ids = {}
    for key, (model_id, data_id, recipe) in jobs.items():
        response = http.post(
            "/v1/jobs",
            json={"model_id": model_id, "calibration_dataset_id": data_id, "recipe": recipe, "evaluation": evaluation},
        )
        assert response.status_code == 202, (key, response.text)
        ids[key] = response.json()["id"]
    return ids


def _run_jobs(http: Any, jobs: dict[Any, tuple[str, str | None, dict[str, Any]]], **evaluation: int) -> dict[Any, Any]:
    """Send every job, then wait for them all; the jobs by key."""
    return {key: wait_for_job(http, job_id)[0] for key, job_id in _send_jobs(http, jobs, **evaluation).items()}


def test_every_mode_through_http(embedded: Deployment, tmp_path: Path) -> None:
    conv = conv_classifier(tmp_path / "conv.onnx", hidden=16, size=8)
    cancelling = cancelling_matmuls(tmp_path / "cancelling.onnx")
    rows = np.random.default_rng(2).normal(0, 1, (32, 1, 64)).astype(np.float32)
    mlp = matmul_mlp(tmp_path / "mlp.onnx", features=32, hidden=64)
    samples = np.random.default_rng(0).random((8, 1, 3, 8, 8), dtype=np.float32)
    labelled = npz_bytes(input=samples, __labels__=np.arange(8) % 4)
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(1).random((8, 32), dtype=np.float32))  # batched rows for a one-input model
    preprocess = '{"input": "input", "size": [8, 8], "layout": "NCHW", "color": "RGB"}'
    with embedded.client() as http:
        conv_id = upload(http, "/v1/models", "conv.onnx", conv.read_bytes())
        mlp_id = upload(http, "/v1/models", "mlp.onnx", mlp.read_bytes())
        npz_id = upload(http, "/v1/datasets", "calib.npz", labelled)
        npy_id = upload(http, "/v1/datasets", "rows.npy", buf.getvalue())
        images_id = upload(http, "/v1/datasets", "images.zip", _images_zip(), preprocess=preprocess)
        cancelling_id = upload(http, "/v1/models", "cancelling.onnx", cancelling.read_bytes())
        labelled_rows = npz_bytes(x=rows, __labels__=labelled_by_the_model(cancelling, rows, "x"))
        rows_id = upload(http, "/v1/datasets", "rows.npz", labelled_rows)
        assert http.get(f"/v1/datasets/{images_id}").json()["has_labels"] is True
        jobs = {
            "qoperator": (conv_id, npz_id, {"mode": "static", "format": "qoperator", "per_channel": True}),
            "percentile": (
                conv_id,
                npz_id,
                {"calibration_method": "percentile", "per_channel": True, "activation_type": "int8"},
            ),
            "int16": (conv_id, npz_id, {"activation_type": "uint16", "weight_type": "int16"}),
            "images": (conv_id, images_id, {"calibration_method": "entropy"}),
            "npy_batched": (mlp_id, npy_id, {"calibration_batch_size": 4, "reduce_range": True}),
            "weight_only": (mlp_id, None, {"mode": "weight_only", "block_size": 16}),
            "fp16": (mlp_id, None, {"mode": "fp16"}),
            # int8 cannot stay within 5 points on this model: see tests/worker/engine/test_auto.py.
            "auto": (cancelling_id, rows_id, {"mode": "auto", "accuracy_tolerance": 0.05}),
        }
        ids = _send_jobs(http, jobs, latency_runs=3, warmup_runs=1)
        done = {name: wait_for_job(http, job_id)[0] for name, job_id in ids.items() if name != "auto"}
        done["auto"], auto_events = follow_job(http, ids["auto"])  # queued last, so followed from its start
        models = {
            name: onnx.load_from_string(http.get(f"/v1/jobs/{job['id']}/artifacts/quantized.onnx").content)
            for name, job in done.items()
            if job["status"] == "succeeded"
        }
    failed = {name: job["error"] for name, job in done.items() if job["status"] != "succeeded"}
    assert not failed, failed

    def ops(name: str) -> set[str]:
        return {n.op_type for n in models[name].graph.node}

    assert "QLinearConv" in ops("qoperator")
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops("percentile")
    assert "MatMulNBits" in ops("weight_only")
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in models["fp16"].graph.initializer)
    assert models["fp16"].graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 I/O kept
    assert not ops("auto") & INTEGER_QUANTIZED_OPS, ops("auto")  # the weights stay in float
    auto_accuracy = done["auto"]["result"]["comparison"]["accuracy"]
    assert auto_accuracy["original"] == 1.0 and auto_accuracy["delta"] >= -0.05, auto_accuracy
    auto = done["auto"]["result"]["quantization"]["auto"]
    # Every candidate was measured, or left out by the pre-flight with its reason (on some CPUs int8 of this
    # small CNN is predicted slower than float and the search does not spend time on it).
    pruned = (auto["preflight"] or {}).get("pruned", [])
    assert auto["chosen"] and len(auto["candidates"]) + len(pruned) >= 4, auto
    assert all(p["reason"] for p in pruned), pruned
    # The event stream named the candidates as the search tried them (a quick one may pass between polls),
    # its note in words and typed, from the same note of the engine; none is left once the job ended.
    progress = [e.data for e in auto_events if e.event == "progress"]
    tried = [p for p in progress if p["candidate"]]
    assert tried or len(auto["candidates"]) < 2, progress  # one quick candidate can pass between two polls
    assert [p["candidate"]["index"] for p in tried] == sorted(p["candidate"]["index"] for p in tried)
    candidates = [c["name"] for c in auto["candidates"]]
    for p in tried:
        c = p["candidate"]
        assert c["total"] == len(candidates) and c["name"] == candidates[c["index"] - 1], tried
        assert p["progress_note"] == f"candidate {c['index']} of {c['total']}: {c['name']}", p
    assert done["auto"]["candidate"] is None and done["auto"]["progress_note"] is None
    assert auto["verdict"] in ("quantized", "keep_float")
    # The pick's verdict is the evaluation's own (one judge): labelled data and no fidelity floor, so the
    # top-1 drop decides, for the float model handed back as for a quantized pick.
    verdict = done["auto"]["result"]["comparison"]["fidelity"]
    assert verdict["metric"] == "top1_drop", verdict
    if auto["effective_recipe"] is None:  # keep_float with nothing in budget as fast as float: the float model
        assert auto["verdict"] == "keep_float" and verdict["within_budget"] and verdict["accuracy_drop"] == 0, auto
    with embedded.client() as http:
        names = {a["name"] for a in http.get(f"/v1/jobs/{done['auto']['id']}/artifacts").json()}
        assert {"quantized.onnx", "report.json"} <= names
        # The ranking is written when the mixed-precision search made one (its steps start from it).
        assert ("sensitivity.json" in names) == bool(auto["sensitivity"]) and (
            bool(auto["sensitivity"]) or not auto["steps"]
        )
        # A model quantized elsewhere, compared with its float reference: nothing is quantized.
        qdq_id = upload(http, "/v1/models", "qdq.onnx", models["percentile"].SerializeToString())
        response = http.post(
            "/v1/jobs",
            json={
                "model_id": qdq_id,
                "calibration_dataset_id": npz_id,
                "recipe": {"mode": "compare", "reference_model_id": conv_id},
                "evaluation": {"latency_runs": 3, "warmup_runs": 1},
            },
        )
        assert response.status_code == 202, response.text
        compared, _ = wait_for_job(http, response.json()["id"])
        assert compared["status"] == "succeeded", compared["error"]
        assert compared["result"]["quantization"]["mode"] == "compare"
        assert compared["result"]["comparison"]["fidelity"]["samples"] == 8
        assert [a["name"] for a in http.get(f"/v1/jobs/{compared['id']}/artifacts").json()] == ["report.json"]
        assert 'id="verdict"' in http.get(f"/v1/jobs/{compared['id']}/report.html").text
    labelled_result = done["percentile"]["result"]
    assert labelled_result["comparison"]["accuracy"]["metric"] == "top1"
    assert done["images"]["result"]["comparison"]["accuracy"] is not None  # labels from class folders
    assert (
        done["weight_only"]["result"]["quantized"]["size_bytes"]
        < done["weight_only"]["result"]["original"]["size_bytes"]
    )
    assert any("opset" in step for step in done["int16"]["result"]["preprocessing_steps"])
    assert not any("not smaller" in w for w in done["weight_only"]["result"]["warnings"])


def test_if_and_loop_models_through_http(embedded: Deployment, tmp_path: Path) -> None:
    """A streaming audio export whose body sits in If branches (three inputs: audio, a state with
    batch on axis 1, an int64 sample rate) and a Loop model: every mode succeeds, each served model
    passes onnx.checker and runs in ONNX Runtime (both If branches), each job comes back with its
    result, and the result names the subgraph nodes left in float (dynamic) and quantized (static)."""
    import onnxruntime as ort

    from tests.worker.engine import pitfall_models as pm

    rng = np.random.default_rng(1)
    audio = npz_bytes(
        audio=rng.normal(0, 0.3, (6, 2, 64)).astype(np.float32),
        state=rng.normal(0, 0.3, (6, 2, 2, 16)).astype(np.float32),
        sr=np.array([16000, 8000] * 3, np.int64),
    )
    loop = npz_bytes(x=rng.normal(0, 1, (6, 2, 8)).astype(np.float32))
    recipes = {
        "static": {},
        "qoperator": {"format": "qoperator"},
        "dynamic": {"mode": "dynamic"},
        "weight_only": {"mode": "weight_only", "block_size": 16},
        "fp16": {"mode": "fp16"},
        "auto": {"mode": "auto"},
    }
    with embedded.client() as http:
        cases = {
            "if": (
                upload(http, "/v1/models", "audio.onnx", pm.streaming_audio(tmp_path / "a.onnx").read_bytes()),
                upload(http, "/v1/datasets", "audio.npz", audio),
            ),
            "loop": (
                upload(http, "/v1/models", "loop.onnx", pm.loop_body(tmp_path / "l.onnx").read_bytes()),
                upload(http, "/v1/datasets", "loop.npz", loop),
            ),
        }
        jobs = {
            (model, name): (model_id, data_id, recipe)
            for model, (model_id, data_id) in cases.items()
            for name, recipe in recipes.items()
        }
        done = _run_jobs(http, jobs, latency_runs=1, warmup_runs=0)
        failed = {key: job["error"] for key, job in done.items() if job["status"] != "succeeded"}
        assert not failed, failed
        feeds = {
            "if": [
                {
                    "audio": np.ones((1, 64), np.float32),
                    "state": np.ones((2, 1, 16), np.float32),
                    "sr": np.array(rate, np.int64),
                }
                for rate in (16000, 8000)
            ],
            "loop": [{"x": np.ones((1, 8), np.float32)}],
        }
        for (model, name), job in done.items():
            served = http.get(f"/v1/jobs/{job['id']}/artifacts/quantized.onnx").content
            onnx.checker.check_model(onnx.load_from_string(served))
            session = ort.InferenceSession(served, providers=["CPUExecutionProvider"])
            for feed in feeds[model]:
                assert all(np.isfinite(out).all() for out in session.run(None, feed)), (model, name)
            result = job["result"]
            assert result["quantized"]["size_bytes"] > 0 and result["comparison"]["outputs"], (model, name)
    left = done["if", "dynamic"]["result"]["quantization"]["float_in_subgraphs"]
    assert {(n["name"], n["subgraph"]) for n in left} >= {("/_model/sr16k/Conv", "/If.then_branch")}
    # Static int8 reaches into both branches (the data takes both).
    inside = done["if", "static"]["result"]["quantization"]["quantized_in_subgraphs"]
    assert {(n["name"], n["subgraph"]) for n in inside} == {
        (f"/_model/{tag}/{op}", branch)
        for tag, branch in (("sr16k", "/If.then_branch"), ("sr8k", "/If.else_branch"))
        for op in ("Conv", "MatMul")
    }
    assert not done["if", "static"]["result"]["quantization"]["float_in_subgraphs"]


def test_unknown_dims_through_http(embedded: Deployment, tmp_path: Path) -> None:
    """A Paddle2ONNX-style classifier whose input is [-1, 3, 0, -1], fed by stacked, batched and
    image datasets, for calibration and for labelled evaluation: every mode succeeds, each served
    model passes onnx.checker and runs in ONNX Runtime on real data, and accuracy is measured."""
    import onnxruntime as ort

    from tests.onnx_models import paddle_classifier

    rng = np.random.default_rng(2)
    labels = np.arange(6) % 4
    stacked = npz_bytes(input=rng.random((6, 1, 3, 10, 12), dtype=np.float32), __labels__=labels)
    batched = npz_bytes(input=rng.random((6, 3, 10, 12), dtype=np.float32), __labels__=labels)
    preprocess = '{"input": "input", "size": [10, 12]}'
    with embedded.client() as http:
        model_id = upload(http, "/v1/models", "paddle.onnx", paddle_classifier(tmp_path / "p.onnx").read_bytes())
        assert http.get(f"/v1/models/{model_id}").json()["inputs"][0]["shape"] == [None, 3, None, None]
        data = {
            "stacked": upload(http, "/v1/datasets", "s.npz", stacked),
            "batched": upload(http, "/v1/datasets", "b.npz", batched),
            "images": upload(http, "/v1/datasets", "i.zip", _images_zip(), preprocess=preprocess),
        }
        jobs = {
            **{f"static-{form}": (data[form], None, {}) for form in data},
            "qoperator": (data["images"], data["stacked"], {"format": "qoperator"}),
            "dynamic": (data["stacked"], data["images"], {"mode": "dynamic"}),
            "weight_only": (None, data["batched"], {"mode": "weight_only", "weight_type": "int8", "block_size": 16}),
            "fp16": (None, data["stacked"], {"mode": "fp16"}),
            "auto": (data["batched"], data["images"], {"mode": "auto"}),
        }
        ids = {}
        for key, (calibration, evaluation, recipe) in jobs.items():
            body = {
                "model_id": model_id,
                "calibration_dataset_id": calibration,
                "evaluation_dataset_id": evaluation,
                "recipe": recipe,
                "evaluation": {"latency_runs": 1, "warmup_runs": 0, "batch_size": 2},
            }
            response = http.post("/v1/jobs", json=body)
            assert response.status_code == 202, (key, response.text)
            ids[key] = response.json()["id"]
        done = {key: wait_for_job(http, job_id)[0] for key, job_id in ids.items()}
        failed = {key: job["error"] for key, job in done.items() if job["status"] != "succeeded"}
        assert not failed, failed
        feed = {"input": rng.random((2, 3, 10, 12), dtype=np.float32)}
        for key, job in done.items():
            served = http.get(f"/v1/jobs/{job['id']}/artifacts/quantized.onnx").content
            onnx.checker.check_model(onnx.load_from_string(served))
            logits = ort.InferenceSession(served, providers=["CPUExecutionProvider"]).run(None, feed)[0]
            assert logits.shape == (2, 4), key
            assert job["result"]["comparison"]["accuracy"] is not None, key  # labelled evaluation
            assert any("-1 or 0" in step for step in job["result"]["preprocessing_steps"]), key

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

from tests.e2e.conftest import Deployment, follow_job, wait_for_job
from tests.onnx_models import conv_classifier, matmul_mlp
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


def _upload(http: Any, path: str, name: str, content: bytes, **data: str) -> str:
    response = http.post(path, files={"file": (name, content)}, data=data)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_every_mode_through_http(embedded: Deployment, tmp_path: Path) -> None:
    conv = conv_classifier(tmp_path / "conv.onnx", hidden=16, size=8)
    mlp = matmul_mlp(tmp_path / "mlp.onnx", features=32, hidden=64)
    samples = np.random.default_rng(0).random((8, 1, 3, 8, 8), dtype=np.float32)
    labelled = npz_bytes(input=samples, __labels__=np.arange(8) % 4)
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(1).random((8, 32), dtype=np.float32))  # batched rows for a one-input model
    preprocess = '{"input": "input", "size": [8, 8], "layout": "NCHW", "color": "RGB"}'
    quick = {"latency_runs": 3, "warmup_runs": 1}
    with embedded.client() as http:
        conv_id = _upload(http, "/v1/models", "conv.onnx", conv.read_bytes())
        mlp_id = _upload(http, "/v1/models", "mlp.onnx", mlp.read_bytes())
        npz_id = _upload(http, "/v1/datasets", "calib.npz", labelled)
        npy_id = _upload(http, "/v1/datasets", "rows.npy", buf.getvalue())
        images_id = _upload(http, "/v1/datasets", "images.zip", _images_zip(), preprocess=preprocess)
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
            "auto": (conv_id, npz_id, {"mode": "auto", "accuracy_tolerance": 0.5}),
        }
        ids = {}
        for name, (model_id, data_id, recipe) in jobs.items():
            response = http.post(
                "/v1/jobs",
                json={
                    "model_id": model_id,
                    "calibration_dataset_id": data_id,
                    "recipe": recipe,
                    "evaluation": quick,
                },
            )
            assert response.status_code == 202, (name, response.text)
            ids[name] = response.json()["id"]
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
    auto = done["auto"]["result"]["quantization"]["auto"]
    assert auto["chosen"] and len(auto["candidates"]) >= 4
    # The event stream named the candidates as the search tried them (a quick one may pass between polls).
    tried = [e.data["candidate"] for e in auto_events if e.event == "progress" and e.data["candidate"]]
    assert tried, [e.data for e in auto_events]
    assert [c["index"] for c in tried] == sorted(c["index"] for c in tried)
    names = [c["name"] for c in auto["candidates"]]
    assert all(c["total"] == len(names) and c["name"] == names[c["index"] - 1] for c in tried), tried
    labelled_result = done["percentile"]["result"]
    assert labelled_result["comparison"]["accuracy"]["metric"] == "top1"
    assert done["images"]["result"]["comparison"]["accuracy"] is not None  # labels from class folders
    assert (
        done["weight_only"]["result"]["quantized"]["size_bytes"]
        < done["weight_only"]["result"]["original"]["size_bytes"]
    )
    assert any("opset" in step for step in done["int16"]["result"]["preprocessing_steps"])
    assert not any("not smaller" in w for w in done["weight_only"]["result"]["warnings"])

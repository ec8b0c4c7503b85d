"""The API accepts a job if and only if the engine can run it.

Hypothesis draws recipes over every field (valid and invalid values, node names, op types and
outputs the model has and lacks), the test models (symbolic, -1 and 0 dims; the opset-15 If model
with three inputs; a Loop), datasets in every form (fitting or not) and evaluation batch sizes. Each is sent to
`POST /v1/jobs` on the real app, and given to the engine's own validation (`validate_job`, what
the job process runs before any work) on the same files. Both must refuse together, with the
same code: no job may fail with `invalid_recipe`, `invalid_dataset` or `dataset_model_mismatch`
after a 202.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from core.errors import RuleError
from core.jobfile import DatasetSource
from core.model import ModelFacts, model_facts
from core.recipe import parse_recipe
from service.app import create_app
from service.migrate import upgrade
from service.settings import Settings
from tests.onnx_models import conv_classifier, matmul_mlp, paddle_classifier
from tests.service.helpers import npz_bytes
from tests.worker.engine import pitfall_models as pm
from worker.engine.validate import validate_job

RULE_CODES = ("invalid_recipe", "invalid_dataset", "dataset_model_mismatch")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _images_zip(n: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            zf.writestr(f"class{i % 2}/{i}.png", _png())
    return buf.getvalue()


class World:
    """Models and datasets uploaded once; local copies of the same bytes for the engine."""

    def __init__(self, client: TestClient, folder: Path) -> None:
        self.client = client
        rng = np.random.default_rng(0)
        self.models: dict[str, tuple[str, Path]] = {}
        self.facts: dict[str, ModelFacts] = {}
        for key, build in (
            ("conv", lambda p: conv_classifier(p)),
            ("paddle", lambda p: paddle_classifier(p)),
            ("mlp", lambda p: matmul_mlp(p)),
            ("audio", lambda p: pm.streaming_audio(p)),  # If branches, opset 15, three inputs
            ("loop", lambda p: pm.loop_body(p)),
        ):
            path = build(folder / f"{key}.onnx")
            response = client.post("/v1/models", files={"file": (path.name, path.read_bytes())})
            assert response.status_code == 201, response.text
            self.models[key] = (response.json()["id"], path)
            self.facts[key] = model_facts(onnx.load(str(path)))
        labels = np.arange(12, dtype=np.int64) % 4
        contents: dict[str, tuple[str, bytes, dict[str, Any] | None]] = {
            "conv_stacked": ("a.npz", npz_bytes(input=rng.random((12, 1, 3, 8, 8), dtype=np.float32)), None),
            "conv_batched": ("b.npz", npz_bytes(input=rng.random((12, 3, 8, 8), dtype=np.float32)), None),
            "paddle_stacked": (
                "c.npz",
                npz_bytes(input=rng.random((12, 1, 3, 48, 192), dtype=np.float32), __labels__=labels),
                None,
            ),
            "paddle_batched": ("d.npz", npz_bytes(input=rng.random((12, 3, 10, 12), dtype=np.float32)), None),
            "mlp": ("e.npz", npz_bytes(x=rng.random((12, 16), dtype=np.float32), __labels__=labels), None),
            "mlp_npy": ("f.npy", _npy(rng.random((12, 1, 16), dtype=np.float32)), None),
            "wrong_dtype": ("g.npz", npz_bytes(input=np.zeros((12, 3, 8, 8), dtype=np.int64)), None),
            "images": ("h.zip", _images_zip(12), {"input": "input", "size": [10, 12]}),
            "images_8": ("i.zip", _images_zip(12), {"input": "input", "size": [8, 8], "layout": "NHWC"}),
            "audio": (
                "j.npz",
                npz_bytes(
                    audio=rng.random((12, 2, 64), dtype=np.float32),
                    state=rng.random((12, 2, 2, 16), dtype=np.float32),  # batch on axis 1
                    sr=np.array([16000, 8000] * 6, np.int64),
                    __labels__=labels,
                ),
                None,
            ),
            "audio_one_rate": (
                "k.npz",
                npz_bytes(
                    audio=rng.random((12, 64), dtype=np.float32),
                    state=rng.random((12, 2, 2, 16), dtype=np.float32),
                    sr=np.array(16000, np.int64),  # rank 0: fed with every sample
                ),
                None,
            ),
            "loop": ("l.npz", npz_bytes(x=rng.random((12, 8), dtype=np.float32), __labels__=labels), None),
        }
        self.datasets: dict[str, tuple[str, DatasetSource]] = {}
        for key, (name, content, preprocess) in contents.items():
            data = {"preprocess": _json(preprocess)} if preprocess else {}
            response = client.post("/v1/datasets", files={"file": (name, content)}, data=data)
            assert response.status_code == 201, response.text
            body = response.json()
            local = folder / name
            local.write_bytes(content)
            stored_preprocess = client.get(f"/v1/datasets/{body['id']}").json().get("preprocess") or preprocess
            self.datasets[key] = (body["id"], DatasetSource(local, body["format"], stored_preprocess))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("contract")
    app_settings = Settings(data_dir=folder / "data", quota_active_jobs=1_000_000, rate_limit_per_minute=1_000_000)
    upgrade(app_settings)
    with TestClient(create_app(app_settings), raise_server_exceptions=False) as client:
        yield World(client, folder)


TENSORS = ["relu_out", "flat", "hr", "/Pad_output_0", "b"]
MODELS = ["conv", "paddle", "mlp", "audio", "loop"]
DATASETS = {  # the datasets made for each model (the others mostly do not fit it)
    "conv": ["conv_stacked", "conv_batched", "wrong_dtype", "images_8"],
    "paddle": ["paddle_stacked", "paddle_batched", "images"],
    "mlp": ["mlp", "mlp_npy"],
    "audio": ["audio", "audio_one_rate"],
    "loop": ["loop"],
}
ALL_DATASETS = [d for ds in DATASETS.values() for d in ds]
EVALUATION_DATASETS = ["paddle_stacked", "conv_stacked", "mlp", "images_8", "audio", "loop"]


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


def _fidelity(outputs: list[str], metrics: list[str], floors: st.SearchStrategy[float]) -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {},
        optional={
            "outputs": _maybe(st.lists(st.sampled_from(outputs), max_size=2)),
            "metric": st.sampled_from(metrics),
            "min": _maybe(floors),
        },
    )


def _recipes(facts: ModelFacts) -> st.SearchStrategy[dict[str, Any]]:
    """Recipes over every field: half with any value (in range or not), half with values each field
    accepts on its own (names from the model, and some it lacks), which reach the rules that combine
    fields and those that need the model and the data."""
    names = [*facts.node_names[:12], "conv", "mm1", "loop/MatMul", "nope"]
    ops = [*facts.op_counts, "Conv", "MatMul", "Gemm", "Gather", "Bogus"]
    outputs = [*(o.name for o in facts.outputs), "logits", "nope"]
    any_value = {
        "mode": st.sampled_from(["static", "dynamic", "weight_only", "fp16", "auto", "compare", "int2"]),
        "format": st.sampled_from(["qdq", "qoperator", "onnx"]),
        "activation_type": st.sampled_from(["uint8", "int8", "uint16", "int16", "int4"]),
        "weight_type": _maybe(st.sampled_from(["int8", "uint8", "int16", "uint16", "int4", "uint4", "fp8"])),
        "calibration_method": st.sampled_from(["minmax", "entropy", "percentile", "distribution", "magic"]),
        "percentile": st.one_of(st.floats(-5, 110, allow_nan=False), st.sampled_from([10.0, 49.9, 50.0, 99.99])),
        "per_channel": st.booleans(),
        "reduce_range": st.booleans(),
        "symmetric_activations": st.booleans(),
        "symmetric_weights": _maybe(st.booleans()),
        "op_types_to_quantize": _maybe(st.lists(st.sampled_from(ops), max_size=3)),
        "nodes_to_exclude": _maybe(st.lists(st.sampled_from(names), max_size=3)),
        "calibration_batch_size": st.integers(-1, 5000),
        "max_calibration_samples": _maybe(st.integers(-1, 20)),
        "block_size": st.sampled_from([8, 16, 24, 32, 128, 4096, 8192]),
        "accuracy_tolerance": st.floats(-0.5, 1.5, allow_nan=False),
        "sixteen_bit_tensors": _maybe(st.lists(st.sampled_from(TENSORS), max_size=2)),
        "transformer_fusion": st.booleans(),
        "dynamic_op_types": _maybe(st.lists(st.sampled_from(["MatMul", "Gemm", "Conv", "LSTM"]), max_size=2)),
        "objective": st.sampled_from(["latency", "size", "speed"]),
        "fidelity": _maybe(
            _fidelity(outputs, ["auto", "cosine", "sqnr", "agreement", "l2"], st.floats(-300, 300, allow_nan=False))
        ),
        "max_search_seconds": st.floats(0, 100_000, allow_nan=False),
        # Mode compare's reference (an id the API looks up) is left to tests/service/test_jobs_api.py:
        # the engine is given the reference's file, it never sees the id.
        "reference_model_id": _maybe(st.just("a-reference")),
    }
    in_range = {
        **any_value,
        "mode": st.sampled_from(["static", "static", "dynamic", "weight_only", "fp16", "auto"]),
        "format": st.sampled_from(["qdq", "qoperator"]),
        "activation_type": st.sampled_from(["uint8", "uint8", "int8", "uint16", "int16"]),
        "weight_type": _maybe(st.sampled_from(["int8", "uint8", "int16", "uint16", "int4", "uint4"])),
        "calibration_method": st.sampled_from(["minmax", "entropy", "percentile", "distribution"]),
        "percentile": st.sampled_from([10.0, 50.0, 99.99, 99.999]),
        "op_types_to_quantize": _maybe(st.lists(st.sampled_from(ops), min_size=1, max_size=2)),
        "nodes_to_exclude": _maybe(st.lists(st.sampled_from(names), max_size=2)),
        "calibration_batch_size": st.integers(1, 8),
        "max_calibration_samples": _maybe(st.integers(1, 20)),
        "block_size": st.sampled_from([16, 32, 128]),
        "accuracy_tolerance": st.floats(0, 1, allow_nan=False),
        "sixteen_bit_tensors": st.one_of(st.none(), st.none(), st.lists(st.sampled_from(TENSORS), max_size=1)),
        "dynamic_op_types": st.one_of(st.none(), st.none(), st.just(["MatMul"])),
        "objective": st.sampled_from(["latency", "size"]),
        "fidelity": _maybe(_fidelity(outputs, ["auto", "cosine", "sqnr", "agreement"], st.floats(0.5, 1.0))),
        "max_search_seconds": st.floats(1, 1000, allow_nan=False),
        "reference_model_id": st.none(),
    }
    return st.one_of(st.fixed_dictionaries({}, optional=in_range), st.fixed_dictionaries({}, optional=any_value))


def _engine_refusal(
    world: World, model: str, recipe: dict[str, Any], calibration: str | None, evaluation: str | None, batch: int
) -> str | None:
    try:
        parsed = parse_recipe(recipe)
        validate_job(
            world.models[model][1],
            parsed,
            calibration=world.datasets[calibration][1] if calibration else None,
            evaluation_data=world.datasets[evaluation][1] if evaluation else None,
            evaluation_batch_size=batch,
        )
    except RuleError as exc:
        return exc.code
    return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=st.sampled_from(MODELS), data=st.data(), batch=st.integers(1, 8))
def test_accepted_exactly_when_the_engine_can_run_it(world: World, model: str, data: st.DataObject, batch: int) -> None:
    recipe = data.draw(_recipes(world.facts[model]), label="recipe")
    own, any_dataset = st.sampled_from(DATASETS[model]), st.sampled_from(ALL_DATASETS)
    calibration = data.draw(st.one_of(own, any_dataset, st.none()), label="calibration")
    evaluation = data.draw(st.one_of(st.none(), own, st.sampled_from(EVALUATION_DATASETS)), label="evaluation")
    assume(not (recipe.get("mode") == "compare" and recipe.get("reference_model_id")))
    body: dict[str, Any] = {"model_id": world.models[model][0], "recipe": recipe, "evaluation": {"batch_size": batch}}
    if calibration:
        body["calibration_dataset_id"] = world.datasets[calibration][0]
    if evaluation:
        body["evaluation_dataset_id"] = world.datasets[evaluation][0]
    response = world.client.post("/v1/jobs", json=body)
    refused = _engine_refusal(world, model, recipe, calibration, evaluation or calibration, batch)
    if refused is None:
        assert response.status_code == 202, response.text
    else:
        assert response.status_code == 422, (refused, response.text)
        assert response.json()["error"]["code"] == refused


def test_the_bugs_of_the_issue_are_refused_at_the_door(world: World) -> None:
    """The recipes that the API used to accept and the engine refused, and the 8-bit weight-only
    recipe that went the other way."""
    conv, mlp = world.models["conv"][0], world.models["mlp"][0]
    calib = world.datasets["conv_stacked"][0]
    for recipe, field in (
        ({"mode": "dynamic", "activation_type": "int8"}, "activation_type"),
        ({"activation_type": "int8", "weight_type": "uint8"}, "weight_type"),
        ({"calibration_method": "percentile", "percentile": 10}, "percentile"),
    ):
        response = world.client.post(
            "/v1/jobs", json={"model_id": conv, "calibration_dataset_id": calib, "recipe": recipe}
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_recipe" and error["detail"]["field"] == f"recipe.{field}", error
    response = world.client.post(
        "/v1/jobs", json={"model_id": mlp, "recipe": {"mode": "weight_only", "weight_type": "int8"}}
    )
    assert response.status_code == 202, response.text


def test_minus_one_dims_fit_stacked_and_labelled_data(world: World) -> None:
    """The Paddle2ONNX classifier [-1, 3, 0, -1] with a stacked (N, 1, 3, 48, 192) .npz, for
    calibration and as labelled evaluation data: accepted, and the engine agrees."""
    model = world.models["paddle"][0]
    data = world.datasets["paddle_stacked"][0]
    body = {"model_id": model, "calibration_dataset_id": data, "evaluation_dataset_id": data, "recipe": {}}
    response = world.client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    assert _engine_refusal(world, "paddle", {}, "paddle_stacked", "paddle_stacked", 1) is None

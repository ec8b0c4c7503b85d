"""The facts the recipe rules read at job creation (node names, op counts, opset, inputs) are the
ones stored at upload: job creation never parses the model file again. A model stored before
revision 0003 recorded its node names has them read from its file once, then recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from fastapi.testclient import TestClient

from service.app import create_app
from service.database import make_engine, transaction
from service.migrate import alembic_config, upgrade
from service.settings import Settings
from service.tables import OnnxModel
from tests.onnx_models import conv_classifier
from tests.service.helpers import assert_error, upload_model

CONV_NODES = ["conv", "relu", "pool", "flatten", "fc"]


def _job(client: TestClient, model_id: str, **recipe: Any) -> Any:
    return client.post("/v1/jobs", json={"model_id": model_id, "recipe": {"mode": "dynamic", **recipe}})


def _spoil_model_file(client: TestClient, model_id: str, tmp_path: Path) -> None:
    """Replace the stored model file by bytes no ONNX parser reads."""
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx model")
    client.app.state.storage.put_file(f"models/{model_id}/model.onnx", junk)  # type: ignore[attr-defined]


def _node_names(client: TestClient, model_id: str) -> list[str] | None:
    with transaction(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        row = session.get(OnnxModel, model_id)
        assert row is not None
        return row.node_names


def _migrate(settings: Settings, revision: str, *, down: bool = False) -> None:
    engine = make_engine(settings)
    try:
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            config.attributes["configure_logging"] = False
            (command.downgrade if down else command.upgrade)(config, revision)
    finally:
        engine.dispose()


def test_job_creation_checks_the_facts_stored_at_upload_not_the_model_file(client: TestClient, tmp_path: Path) -> None:
    model = upload_model(client, conv_classifier(tmp_path / "conv.onnx"))
    assert _node_names(client, model["id"]) == CONV_NODES
    _spoil_model_file(client, model["id"], tmp_path)

    accepted = _job(client, model["id"], nodes_to_exclude=["conv"], op_types_to_quantize=["Gemm"])
    assert accepted.status_code == 202, accepted.text
    for recipe, field in (
        ({"nodes_to_exclude": ["conv", "nope"]}, "nodes_to_exclude"),
        ({"op_types_to_quantize": ["LSTM"]}, "op_types_to_quantize"),
        ({"mode": "weight_only"}, "mode"),  # no MatMul in the stored op counts
    ):
        error = assert_error(_job(client, model["id"], **recipe), 422, "invalid_recipe")
        assert error["detail"]["field"] == f"recipe.{field}", error  # as request validation names it


def test_a_model_stored_before_node_names_were_recorded_has_them_read_once(
    app_settings: Settings, tmp_path: Path
) -> None:
    with TestClient(create_app(app_settings), raise_server_exceptions=False) as client:
        model_id = upload_model(client, conv_classifier(tmp_path / "conv.onnx"))["id"]
    _migrate(app_settings, "0002", down=True)  # the schema before revision 0003, with the model in it
    upgrade(app_settings)  # 0003 adds the column: null for the models already there

    with TestClient(create_app(app_settings), raise_server_exceptions=False) as client:
        assert _node_names(client, model_id) is None
        error = assert_error(_job(client, model_id, nodes_to_exclude=["nope"]), 422, "invalid_recipe")
        assert error["detail"]["unknown"] == ["nope"], error
        accepted = _job(client, model_id, nodes_to_exclude=["fc"])
        assert accepted.status_code == 202, accepted.text
        assert _node_names(client, model_id) == CONV_NODES  # recorded with the job

        _spoil_model_file(client, model_id, tmp_path)
        again = _job(client, model_id, nodes_to_exclude=["relu"])
        assert again.status_code == 202, again.text
        assert_error(_job(client, model_id, nodes_to_exclude=["nope"]), 422, "invalid_recipe")

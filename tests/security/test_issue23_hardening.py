"""Issue #23's low hardening items: docs pages that cannot be framed, node names stored clipped,
quota checks atomic per tenant, and uploads orphaned by a dying API swept."""

from __future__ import annotations

import re
from pathlib import Path

import onnx
from fastapi.testclient import TestClient

from core.recipe import MAX_NAME_CHARS
from service.database import transaction
from service.tables import OnnxModel
from tests.onnx_models import conv_classifier
from tests.service.helpers import assert_error, upload_model

# -- the docs pages cannot be framed ---------------------------------------------------------------


def test_docs_pages_refuse_to_be_framed_and_still_load_their_assets(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        response = client.get(page)
        assert response.status_code == 200, page
        assert response.headers["x-frame-options"] == "DENY", page
        policy = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy, (page, policy)
        assert "script-src 'self'" in policy  # the offline Swagger UI / ReDoc bundles still run
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", response.text)
        assert urls, page
        for url in urls:
            assert client.get(url).status_code == 200, url


# -- node names are stored clipped -----------------------------------------------------------------


def test_a_node_name_of_100k_characters_is_stored_clipped(client: TestClient, tmp_path: Path) -> None:
    path = conv_classifier(tmp_path / "conv.onnx")
    model = onnx.load(str(path))
    long_name = "n" * 100_000
    model.graph.node[0].name = long_name
    onnx.save(model, str(path))

    uploaded = upload_model(client, path)
    with transaction(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        row = session.get(OnnxModel, uploaded["id"])
        assert row is not None and row.node_names is not None
        stored = list(row.node_names)
    assert stored[0] == long_name[:MAX_NAME_CHARS]
    assert max(len(name) for name in stored) == MAX_NAME_CHARS

    recipe = {"mode": "dynamic"}
    too_long = client.post(
        "/v1/jobs", json={"model_id": uploaded["id"], "recipe": {**recipe, "nodes_to_exclude": [long_name]}}
    )
    assert too_long.status_code == 422, too_long.text
    unknown = client.post(
        "/v1/jobs", json={"model_id": uploaded["id"], "recipe": {**recipe, "nodes_to_exclude": ["nope"]}}
    )
    assert_error(unknown, 422, "invalid_recipe")
    known = client.post(
        "/v1/jobs", json={"model_id": uploaded["id"], "recipe": {**recipe, "nodes_to_exclude": [stored[1]]}}
    )
    assert known.status_code == 202, known.text

"""Issue #23's low hardening items: docs pages that cannot be framed, node names stored clipped,
quota checks atomic per tenant, and uploads orphaned by a dying API swept."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

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

"""Hostile ONNX uploads over HTTP: the external-data CVE patterns, custom operators, tiny models that
ask for petabytes, and protobufs built to hurt the parser or the checker. Each answers a clear 4xx,
reads and writes nothing outside the data dir, and leaves the service serving."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.errors import ExternalDataEscape
from service.inspection.model import inspect_model
from tests.onnx_models import conv_classifier
from tests.security import hostile as h
from tests.security.conftest import Hostile, PeakMemory, assert_contained, assert_serving, normal_job, start
from tests.service.helpers import assert_error

pytestmark = pytest.mark.e2e

Files = list[tuple[str, tuple[str, bytes]]]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    yield from start(tmp_path_factory, "hostile-models")


@dataclass(frozen=True)
class Case:
    files: Callable[[Hostile], Files]
    status: int
    code: str
    says: str  # a phrase the message must hold, so the user knows what to fix


def model(data: bytes, *extra: tuple[str, bytes]) -> Files:
    return [("file", ("model.onnx", data)), *(("external_data", e) for e in extra)]


def external(
    location: str,
    *extra: tuple[str, bytes],
    offset: int | None = None,
    length: int | None = 16,
    elements: int = 4,
) -> Callable[[Hostile], Files]:
    data = h.external_data_model(location, offset=offset, length=length, elements=elements)
    return lambda _s: model(data, *extra)


WEIGHTS = ("weights.bin", h.weights())

CASES = {
    # CVE-2022-25882 / CVE-2024-27318: locations that leave the model's folder.
    "absolute-etc-passwd": Case(external("/etc/passwd"), 422, "external_data_escape", "absolute path"),
    "absolute-canary": Case(
        lambda s: model(h.external_data_model(str(s.canary))), 422, "external_data_escape", "absolute path"
    ),
    "dotdot-canary": Case(
        external("../../../outside/canary.txt"), 422, "external_data_escape", "outside the model's folder"
    ),
    "dotdot-etc-passwd": Case(
        external("../../../../../../../../etc/passwd"),
        422,
        "external_data_escape",
        "outside the model's folder",
    ),
    "dotdot-after-folder": Case(
        external("sub/../../weights.bin", WEIGHTS), 422, "external_data_escape", "outside the model's folder"
    ),
    "backslash-traversal": Case(external("..\\..\\outside\\canary.txt"), 422, "external_data_escape", "backslash"),
    "nul-byte": Case(external("weights.bin\x00.png", WEIGHTS), 422, "external_data_escape", "NUL"),
    "not-uploaded": Case(external("weights.bin"), 422, "external_data_escape", "not uploaded"),
    # CVE-2024-27319: offset and length outside the file.
    "offset-beyond-file": Case(
        external("weights.bin", WEIGHTS, offset=8, length=16),
        422,
        "external_data_escape",
        "has only 16 bytes",
    ),
    "length-beyond-file": Case(
        external("weights.bin", WEIGHTS, offset=0, length=10**18),
        422,
        "external_data_escape",
        "has only 16 bytes",
    ),
    "negative-offset": Case(
        external("weights.bin", WEIGHTS, offset=-16, length=16), 422, "external_data_escape", "reads bytes"
    ),
    "declares-more-than-stored": Case(
        external("weights.bin", WEIGHTS, length=None, elements=1 << 20),
        422,
        "external_data_escape",
        "needs 4194304 bytes",
    ),
    # The symlink follow-ups: links smuggled in an external-data zip never reach the disk.
    "zip-symlink-etc-passwd": Case(
        lambda _s: model(
            h.external_data_model("weights.bin"), ("weights.zip", h.symlink_zip("weights.bin", "/etc/passwd"))
        ),
        422,
        "invalid_model",
        "symbolic link",
    ),
    "zip-symlink-canary": Case(
        lambda s: model(
            h.external_data_model("weights.bin"), ("weights.zip", h.symlink_zip("weights.bin", str(s.canary)))
        ),
        422,
        "invalid_model",
        "symbolic link",
    ),
    "zip-symlinked-folder": Case(
        lambda s: model(h.external_data_model("sub/canary.txt"), ("weights.zip", h.symlink_zip("sub", str(s.outside)))),
        422,
        "invalid_model",
        "symbolic link",
    ),
    "zip-dotdot-entry": Case(
        lambda _s: model(
            h.external_data_model("weights.bin"),
            ("weights.zip", h.zip_of([("../../../outside/weights.bin", h.weights())])),
        ),
        422,
        "invalid_model",
        "unsafe",
    ),
    "zip-absolute-entry": Case(
        lambda s: model(
            h.external_data_model("weights.bin"),
            ("weights.zip", h.zip_of([(str(s.outside / "weights.bin"), h.weights())])),
        ),
        422,
        "invalid_model",
        "unsafe",
    ),
    "zip-bomb-external-data": Case(
        lambda _s: model(
            h.external_data_model("weights.bin"), ("weights.zip", h.zeros_npz_member("weights.bin", 64 << 20))
        ),
        413,
        "payload_too_large",
        "compression ratio",
    ),
    # Issue #23, point 2: every entry of every tensor, wherever the tensor stands, is checked; the upload's
    # check kept the last `location` of a tensor, the engine linked each one, absolute or `../`, as the
    # worker's user. onnx.checker never visits training_info nor the defaults of function attributes.
    "training-info-absolute-then-relative": Case(
        lambda s: model(
            h.training_info_model([("location", str(s.canary)), ("location", "weights.bin"), ("length", "16")]),
            WEIGHTS,
        ),
        422,
        "external_data_escape",
        "gives the key 'location' 2 times",
    ),
    "training-info-dotdot-then-relative": Case(
        lambda _s: model(
            h.training_info_model([("location", "../../../outside/x"), ("location", "weights.bin")]), WEIGHTS
        ),
        422,
        "external_data_escape",
        "initialization graph of training_info[0]",
    ),
    "location-given-three-times": Case(
        lambda _s: model(
            h.external_entries_model(
                [("location", "weights.bin"), ("location", "../../../outside/x"), ("location", "weights.bin")]
            ),
            WEIGHTS,
        ),
        422,
        "external_data_escape",
        "gives the key 'location' 3 times",
    ),
    "offset-given-twice": Case(
        lambda _s: model(
            h.external_entries_model([("location", "weights.bin"), ("offset", "0"), ("offset", "0")]), WEIGHTS
        ),
        422,
        "external_data_escape",
        "each key once",
    ),
    "function-default-absolute": Case(
        lambda s: model(h.function_default_model(str(s.canary)), WEIGHTS),
        422,
        "external_data_escape",
        "the default of attribute 'value' of function 'Offset' names the absolute path",
    ),
    "function-default-dotdot": Case(
        lambda _s: model(h.function_default_model("../../../outside/canary.txt"), WEIGHTS),
        422,
        "external_data_escape",
        "outside the model's folder",
    ),
    "location-in-a-folder": Case(
        external("sub/weights.bin", WEIGHTS), 422, "external_data_escape", "not a plain file name"
    ),
    # Operators: nothing outside the standard domains, and no custom-op library is ever loaded.
    "custom-domain": Case(
        lambda _s: model(h.custom_op_model("com.evil", "Backdoor")),
        422,
        "unsupported_operator",
        "Backdoor (com.evil)",
    ),
    "onnxruntime-extensions-op": Case(
        lambda _s: model(h.custom_op_model("ai.onnx.contrib", "GaussianBlur")),
        422,
        "unsupported_operator",
        "GaussianBlur (ai.onnx.contrib)",
    ),
    "unknown-standard-op": Case(
        lambda _s: model(h.custom_op_model("", "NotAnOperator")), 422, "unsupported_operator", "NotAnOperator"
    ),
    # Tiny models that ask for petabytes, and structural caps.
    "constant-of-shape-petabytes": Case(
        lambda _s: model(h.constant_of_shape_model([1 << 25, 1 << 25])),
        422,
        "resource_limit",
        "would create a tensor",
    ),
    "expand-petabytes": Case(
        lambda _s: model(h.expand_model([1 << 24, 1 << 24, 16])),
        422,
        "resource_limit",
        "would create a tensor",
    ),
    "initializer-declares-terabytes": Case(
        lambda _s: model(h.declared_huge_initializer()), 422, "resource_limit", "declares 4398046511104 bytes"
    ),
    "too-many-nodes": Case(
        lambda _s: model(h.many_nodes_model(200_001)), 422, "resource_limit", "more than 200000 nodes"
    ),
    "deep-subgraphs": Case(
        lambda _s: model(h.deep_subgraph_model(17)), 422, "resource_limit", "nested more than 16 levels"
    ),
    # Zip members that inflate past what they declare (#23): only stored and deflate members are read.
    "external-zip-bzip2-bomb": Case(
        lambda _s: model(h.external_data_model("w.bin"), ("weights.zip", h.bzip2_bomb_zip("w.bin", h.weights()))),
        422,
        "invalid_model",
        "re-create the archive with np.savez_compressed or zip -Z deflate",
    ),
    "external-zip-lzma-member": Case(
        lambda _s: model(
            h.external_data_model("w.bin"), ("weights.zip", h.members_zip({"w.bin": h.weights()}, h.zipfile.ZIP_LZMA))
        ),
        422,
        "invalid_model",
        "compressed with LZMA",
    ),
    # Protobufs that hurt parsers and checkers.
    "garbage": Case(
        lambda _s: model(b"\xff\xfe garbage that is not a protobuf \x00" * 64),
        422,
        "invalid_model",
        "not an ONNX model",
    ),
    "truncated": Case(lambda s: model(h.constant_of_shape_model([4])[:-25]), 422, "invalid_model", "not an ONNX model"),
    "empty": Case(lambda _s: model(b""), 422, "invalid_model", "empty"),
    "nested-beyond-parser-limit": Case(
        lambda _s: model(h.nested_beyond_parser_limit()), 422, "invalid_model", "could not be parsed"
    ),
    "cyclic-graph": Case(lambda _s: model(h.cyclic_model()), 422, "invalid_model", "checker"),
    "unknown-tensor-type": Case(
        lambda _s: model(h.unknown_type_model()), 422, "invalid_model", "unknown data type 999"
    ),
    "raw-data-shorter-than-dims": Case(
        lambda _s: model(h.short_raw_data_model()), 422, "invalid_model", "too small for the declared shape"
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_model_is_refused(service: Hostile, name: str) -> None:
    case = CASES[name]
    before = service.tree()
    with service.client() as http:
        response = http.post("/v1/models", files=case.files(service))
        error = assert_error(response, case.status, case.code)
        assert case.says in error["message"], error
        assert http.get("/v1/models").json()["items"] == []
    assert str(service.dep.data_dir) not in response.text, "the answer leaks the server's folders"
    assert_contained(service, before)
    assert_serving(service)


def test_a_bzip2_bomb_of_external_data_leaves_the_api_memory_flat(service: Hostile) -> None:
    """Issue #23: a zip of external data whose one bzip2 member declares 16 bytes and inflates to 1 GiB
    made the API allocate 1 GiB while extracting it."""
    weights = ("weights.zip", h.bzip2_bomb_zip("w.bin", h.weights()))
    with service.client() as http:
        with PeakMemory(service.api_process().pid) as peak:
            response = http.post("/v1/models", files=model(h.external_data_model("w.bin"), weights))
        assert_error(response, 422, "invalid_model")
    assert peak.growth < 100 << 20, f"the API's peak memory grew by {peak.growth >> 20} MiB"
    assert_serving(service)


def test_client_file_names_are_metadata(service: Hostile, tmp_path: Path) -> None:
    """Traversal in the multipart file names changes nothing: the server names what it stores."""
    before = service.tree()
    path = conv_classifier(tmp_path / "c.onnx")
    with service.client() as http:
        created = http.post(
            "/v1/models",
            files=[
                ("file", ("../../../outside/evil.onnx", path.read_bytes())),
            ],
        )
        assert created.status_code == 201, created.text
        with_data = http.post(
            "/v1/models",
            files=[
                ("file", ("/etc/evil.onnx", h.external_data_model("weights.bin"))),
                ("external_data", ("../../../outside/weights.bin", h.weights())),
            ],
        )
        assert with_data.status_code == 201, with_data.text
        for body in (created.json(), with_data.json()):
            assert http.delete(f"/v1/models/{body['id']}").status_code == 204
    stored = [p.name for p in (service.dep.data_dir / "storage").rglob("*") if p.is_file()]
    assert not any("evil" in name for name in stored), stored
    assert_contained(service, before)


def test_hardlinked_external_data_is_refused(tmp_path: Path) -> None:
    """A hard link cannot travel over HTTP (zip has no hard-link entries and uploads are plain files),
    so the check is exercised where it runs: on the upload folder the service inspects."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(h.weights())
    folder = tmp_path / "upload"
    folder.mkdir()
    os.link(outside / "secret.bin", folder / "weights.bin")
    (folder / "model.onnx").write_bytes(h.external_data_model("weights.bin"))
    with pytest.raises(ExternalDataEscape, match="hard link"):
        inspect_model(folder / "model.onnx")


def test_a_normal_job_still_completes(service: Hostile, tmp_path: Path) -> None:
    normal_job(service, tmp_path)
    assert_serving(service)


INLINE_BYTES = 256 << 20


def test_an_inline_model_costs_the_api_less_than_its_size(service: Hostile) -> None:
    """Issue #23, point 7: a 256 MB model held in the protobuf itself made the API's memory peak 775 MB above
    where it stood (the model parsed once by onnx.load and once more by the C++ checker)."""
    data = h.inline_model(INLINE_BYTES)
    with service.client() as http:
        with PeakMemory(service.api_process().pid) as peak:
            response = http.post("/v1/models", files=model(data))
        del data
        assert response.status_code == 201, response.text
        assert http.delete(f"/v1/models/{response.json()['id']}").status_code == 204
    print(f"API peak growth for a {INLINE_BYTES >> 20} MiB inline model: {peak.growth >> 20} MiB")
    assert peak.growth < 1.3 * INLINE_BYTES, f"the API's peak memory grew by {peak.growth >> 20} MiB"
    assert_serving(service)

"""Issue #23, point 2, on the worker's side: a job whose model names external data outside its folder
makes the engine refuse it before any folder or link is made (it made both, as the worker's user,
wherever the location pointed), and a folder planted in the worker's input cache no longer makes every
later eviction fail."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from core.errors import RuleError
from core.model import external_locations
from service.storage import LocalStorage
from tests.security import hostile as h
from worker.engine.preprocess import runnable_original
from worker.inputs import InputCache


def _job(tmp_path: Path, entries: list[tuple[str, str]]) -> tuple[Path, Path]:
    """A job folder as the worker lays it out: the model and its uploaded weights in inputs/model/. The
    model declares an unknown dim as -1, so that the engine makes its runnable copy (and links)."""
    folder = tmp_path / "job" / "inputs" / "model"
    folder.mkdir(parents=True)
    model = onnx.load_from_string(h.external_entries_model(entries))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    (folder / "weights.bin").write_bytes(h.weights())
    return folder / "model.onnx", tmp_path / "job" / "original"


def _everything(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


ESCAPES: dict[str, Callable[[Path], list[tuple[str, str]]]] = {
    "absolute": lambda outside: [("location", str(outside / "planted" / "weights.bin"))],
    "dotdot": lambda _o: [("location", "../../../outside/planted/weights.bin")],
    "dotdot-behind-a-good-one": lambda _o: [("location", "weights.bin"), ("location", "../../../outside/w.bin")],
    "a-folder": lambda _o: [("location", "planted/weights.bin")],
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_the_engine_refuses_a_model_that_names_a_location_outside_its_folder(tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    model_path, workdir = _job(tmp_path, ESCAPES[name](outside))
    before = _everything(tmp_path)
    with pytest.raises(RuleError) as err:
        runnable_original(model_path, workdir)
    assert err.value.code == "external_data_escape"
    assert "plain file name" in err.value.message
    assert _everything(tmp_path) == before, "the engine made folders or links"


def test_the_engine_links_only_files_uploaded_beside_the_model(tmp_path: Path) -> None:
    """A plain name that the upload did not record (no such file beside the model) is not linked either."""
    model_path, workdir = _job(tmp_path, [("location", "missing.bin")])
    with pytest.raises(RuleError, match="not a file uploaded with it") as err:
        runnable_original(model_path, workdir)
    assert err.value.code == "external_data_escape"
    assert not os.path.lexists(workdir / "missing.bin")


def test_the_engine_links_the_uploaded_weights_into_the_job_folder(tmp_path: Path) -> None:
    model_path, workdir = _job(tmp_path, [("location", "weights.bin"), ("length", "16")])
    runnable, steps = runnable_original(model_path, workdir)
    assert runnable == workdir / "model.onnx" and steps
    link = workdir / "weights.bin"
    assert link.is_symlink() and link.resolve() == (model_path.parent / "weights.bin").resolve()


def test_a_folder_planted_in_the_input_cache_does_not_stop_evictions(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "storage")
    cache = InputCache(storage, tmp_path / "cache", max_bytes=2500)
    digests = []
    for i in range(3):
        src = tmp_path / f"src{i}"
        src.write_bytes(bytes([i]) * 1000)
        digests.append(storage.put_file(f"models/{i}/model.onnx", src).sha256)
    planted = tmp_path / "cache" / ("0" * 64)
    (planted / "sub").mkdir(parents=True)  # what a model's location made in it, before the engine refused them
    (tmp_path / "cache" / ("1" * 64)).symlink_to(tmp_path / "storage")
    os.utime(planted, (0, 0))  # the oldest entry: the first an eviction would take
    for i, digest in enumerate(digests):
        cache.fetch(f"models/{i}/model.onnx", digest, 1000, tmp_path / f"job{i}" / "model.onnx", copy=True)
    cached = {p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")}
    assert digests[0] not in cached and {digests[1], digests[2]} <= cached  # the eviction went on past the folder
    assert planted.is_dir() and (planted / "sub").is_dir()  # left alone, not followed or removed
    assert (tmp_path / "storage").is_dir()


def test_the_one_walk_sees_training_graphs_function_defaults_and_mislabelled_attributes() -> None:
    """`core.model.tensor_sites`, which the upload and the engine both use, reaches the places the checker
    never visits, and reads an attribute by what it holds rather than the type it declares."""
    model = onnx.load_from_string(h.training_info_model([("location", "trained.bin")]))
    model.MergeFromString(h.function_default_model("default.bin"))  # adds the function and its default
    hidden = onnx.helper.make_graph([], "hidden", [], [], initializer=[h.external_tensor("h", [("location", "g.bin")])])
    attr = model.graph.node[0].attribute.add(name="note", type=onnx.AttributeProto.FLOAT, f=1.0)
    attr.g.CopyFrom(hidden)  # declared a float, holds a graph
    assert sorted(external_locations(model)) == ["default.bin", "g.bin", "trained.bin", "weights.bin"]

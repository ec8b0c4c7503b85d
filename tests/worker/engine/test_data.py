"""Datasets as feeds: every form of the contract, labels, images, and the mismatch errors."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from core.errors import RuleError
from core.jobfile import DatasetSource
from core.model import TensorSpec
from tests.onnx_models import conv_classifier, matmul_mlp
from tests.worker.engine.pitfall_models import multi_input
from worker.engine.data import Batch, count_batches, iter_batches, model_inputs


def _npz(path: Path, compressed: bool = False, **arrays: np.ndarray) -> DatasetSource:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return DatasetSource(path=path, format="npz")


def _run_all(model: Path, batches: list[Batch]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return [sess.run(None, b.feeds)[0] for b in batches]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        "conv": conv_classifier(d / "conv.onnx"),
        "mlp": matmul_mlp(d / "mlp.onnx"),
        "multi": multi_input(d / "multi.onnx"),
    }


def test_model_inputs(models: dict[str, Path]) -> None:
    assert model_inputs(models["conv"]) == [TensorSpec("input", "float32", ("batch", 3, 8, 8))]
    assert model_inputs(models["multi"]) == [
        TensorSpec("x", "float32", ("batch", 8)),
        TensorSpec("step", "int64", ()),
        TensorSpec("state", "float32", (2, "batch", 8)),
    ]


def test_model_inputs_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(RuleError) as err:
        model_inputs(bad)
    assert err.value.code == "invalid_model"


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_stacked_samples_fed_as_is(models: dict[str, Path], tmp_path: Path, compressed: bool) -> None:
    data = np.random.default_rng(0).random((5, 1, 3, 8, 8))  # float64: cast to float32
    src = _npz(tmp_path / "d.npz", compressed, input=data, __labels__=np.arange(5, dtype=np.int32))
    inputs = model_inputs(models["conv"])
    batches = list(iter_batches(src, inputs, batch_size=4))  # batch_size ignored for stacked samples
    assert len(batches) == 5 == count_batches(src, inputs, batch_size=4)
    for i, b in enumerate(batches):
        assert b.feeds["input"].dtype == np.float32 and b.feeds["input"].shape == (1, 3, 8, 8)
        np.testing.assert_allclose(b.feeds["input"], data[i].astype(np.float32))
        assert b.labels is not None and b.labels.dtype == np.int64 and b.labels.tolist() == [i]
    assert len(_run_all(models["conv"], batches)) == 5


def test_npz_batched_split_along_axis0(models: dict[str, Path], tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((10, 3, 8, 8), dtype=np.float32)
    src = _npz(tmp_path / "d.npz", True, input=data, __labels__=np.arange(10))
    inputs = model_inputs(models["conv"])
    batches = list(iter_batches(src, inputs, batch_size=4))
    assert [b.feeds["input"].shape[0] for b in batches] == [4, 4, 2]
    assert count_batches(src, inputs, batch_size=4) == 3
    assert [b.labels.tolist() for b in batches if b.labels is not None] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]
    np.testing.assert_array_equal(np.concatenate([b.feeds["input"] for b in batches]), data)
    assert [o.shape[0] for o in _run_all(models["conv"], batches)] == [4, 4, 2]
    # limit caps the number of feeds
    assert len(list(iter_batches(src, inputs, batch_size=4, limit=2))) == 2
    assert count_batches(src, inputs, batch_size=4, limit=2) == 2
    assert count_batches(src, inputs, batch_size=1) == 10


def test_stacked_samples_with_their_own_batch_and_labels(models: dict[str, Path], tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((3, 2, 3, 8, 8), dtype=np.float32)  # 3 samples of batch 2
    src = _npz(tmp_path / "d.npz", input=data, __labels__=np.arange(6))  # one label per row
    batches = list(iter_batches(src, model_inputs(models["conv"])))
    assert [b.labels.tolist() for b in batches if b.labels is not None] == [[0, 1], [2, 3], [4, 5]]
    assert all(b.num_samples == 1 for b in batches)


def test_npy_memory_mapped(models: dict[str, Path], tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((6, 16), dtype=np.float32)
    np.save(tmp_path / "d.npy", data)
    src = DatasetSource(path=tmp_path / "d.npy", format="npy")
    inputs = model_inputs(models["mlp"])
    batches = list(iter_batches(src, inputs, batch_size=4))
    assert [b.feeds["x"].shape for b in batches] == [(4, 16), (2, 16)]
    assert all(b.labels is None for b in batches)
    stacked = np.random.default_rng(1).random((3, 2, 16), dtype=np.float32)
    np.save(tmp_path / "s.npy", stacked)
    src = DatasetSource(path=tmp_path / "s.npy", format="npy")
    assert [b.feeds["x"].shape for b in iter_batches(src, inputs)] == [(2, 16)] * 3


def test_npy_fortran_order(models: dict[str, Path], tmp_path: Path) -> None:
    data = np.asfortranarray(np.random.default_rng(0).random((6, 16), dtype=np.float32))
    np.save(tmp_path / "f.npy", data)
    np.savez(tmp_path / "f.npz", x=data)
    inputs = model_inputs(models["mlp"])
    for src in (DatasetSource(tmp_path / "f.npy", "npy"), DatasetSource(tmp_path / "f.npz", "npz")):
        got = np.concatenate([b.feeds["x"] for b in iter_batches(src, inputs, batch_size=4)])
        np.testing.assert_array_equal(got, data)


def test_multi_input_scalar_and_state_with_batch_on_axis1(models: dict[str, Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 4
    x = rng.random((n, 3, 8), dtype=np.float32)  # stacked: 4 samples of batch 3
    state = rng.random((n, 2, 3, 8), dtype=np.float32)  # stacked: batch on axis 1 of each sample
    step = np.arange(n, dtype=np.int32)  # stacked scalars, int32 -> int64
    src = _npz(tmp_path / "m.npz", x=x, state=state, step=step)
    inputs = model_inputs(models["multi"])
    batches = list(iter_batches(src, inputs))
    assert len(batches) == n == count_batches(src, inputs)
    for i, b in enumerate(batches):
        assert b.feeds["step"].shape == () and b.feeds["step"].dtype == np.int64 and int(b.feeds["step"]) == i
        assert b.feeds["state"].shape == (2, 3, 8)
    outs = _run_all(models["multi"], batches)
    assert all(o.shape == (3, 4) for o in outs)


def test_rank0_array_fed_with_every_sample(models: dict[str, Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src = _npz(
        tmp_path / "m.npz",
        x=rng.random((6, 8), dtype=np.float32),  # batched
        state=rng.random((3, 2, 2, 8), dtype=np.float32),  # stacked, 3 samples of batch 2
        step=np.array(7, dtype=np.int64),
    )
    inputs = model_inputs(models["multi"])
    batches = list(iter_batches(src, inputs, batch_size=2))
    assert len(batches) == 3
    assert all(int(b.feeds["step"]) == 7 and b.feeds["x"].shape == (2, 8) for b in batches)
    _run_all(models["multi"], batches)


def test_mismatch_errors_name_the_input(models: dict[str, Path], tmp_path: Path) -> None:
    inputs = model_inputs(models["conv"])
    cases = {
        "wrong_channels": np.zeros((4, 1, 4, 8, 8), np.float32),
        "wrong_rank": np.zeros((4, 8, 8), np.float32),
        "wrong_kind": np.zeros((4, 3, 8, 8), np.int64),
        "rank0_for_tensor": np.array(1.0, np.float32),
    }
    for name, arr in cases.items():
        src = _npz(tmp_path / f"{name}.npz", input=arr)
        with pytest.raises(RuleError) as err:
            count_batches(src, inputs)
        assert err.value.code == "dataset_model_mismatch", name
        assert "'input'" in err.value.message
        assert err.value.detail["input"] == "input"
        assert err.value.detail["given"]["shape"] == list(arr.shape)
        assert err.value.detail["expected"]["shape"] == ["batch", 3, 8, 8]
    src = _npz(tmp_path / "missing.npz", other=np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(RuleError) as err:
        list(iter_batches(src, inputs))
    assert err.value.code == "dataset_model_mismatch" and "input" in err.value.detail["input"]
    # npy for a multi-input model
    np.save(tmp_path / "one.npy", np.zeros((2, 8), np.float32))
    with pytest.raises(RuleError) as err:
        count_batches(DatasetSource(tmp_path / "one.npy", "npy"), model_inputs(models["multi"]))
    assert err.value.code == "dataset_model_mismatch"
    # inconsistent sample counts between inputs
    src = _npz(
        tmp_path / "counts.npz",
        x=np.zeros((3, 2, 8), np.float32),
        state=np.zeros((4, 2, 2, 8), np.float32),
        step=np.array(1),
    )
    with pytest.raises(RuleError) as err:
        count_batches(src, model_inputs(models["multi"]))
    assert err.value.code == "dataset_model_mismatch"


def test_object_arrays_refused_and_labels_checked(models: dict[str, Path], tmp_path: Path) -> None:
    inputs = model_inputs(models["mlp"])
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(RuleError) as err:
        count_batches(DatasetSource(tmp_path / "obj.npz", "npz"), inputs)
    assert err.value.code == "invalid_dataset"
    np.save(tmp_path / "obj.npy", np.array([[1], [2]], dtype=object), allow_pickle=True)
    with pytest.raises(RuleError) as err:
        list(iter_batches(DatasetSource(tmp_path / "obj.npy", "npy"), inputs))
    assert err.value.code == "invalid_dataset"
    src = _npz(tmp_path / "lab.npz", x=np.zeros((4, 16), np.float32), __labels__=np.arange(3))
    with pytest.raises(RuleError) as err:
        count_batches(src, inputs)
    assert err.value.code == "invalid_dataset"
    src = _npz(tmp_path / "labf.npz", x=np.zeros((4, 16), np.float32), __labels__=np.zeros(4, np.float32))
    with pytest.raises(RuleError) as err:
        count_batches(src, inputs)
    assert err.value.code == "invalid_dataset"


def test_npz_is_streamed_not_loaded(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading one feed reads about one row from the zip member, not the whole array."""
    import worker.engine.data as data_mod

    data = np.zeros((200, 16), np.float32)
    src = _npz(tmp_path / "big.npz", True, x=data)
    reads: list[int] = []
    original = data_mod._ZipMemberReader.rows

    def spy(self, start, count):  # type: ignore[no-untyped-def]
        out = original(self, start, count)
        reads.append(out.nbytes)
        return out

    monkeypatch.setattr(data_mod._ZipMemberReader, "rows", spy)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load must not be used for npz"))
    it = iter_batches(src, model_inputs(models["mlp"]), batch_size=2)
    first = next(it)
    assert first.feeds["x"].shape == (2, 16)
    assert reads == [2 * 16 * 4]
    it.close()  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ images


def _png(color: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_images_from_class_folders(models: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "imgs.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data/dog/a.png", _png((0, 0, 255)))
        zf.writestr("data/cat/b.png", _png((255, 0, 0)))
        zf.writestr("data/cat/c.jpg", _jpeg((255, 0, 0)))
        zf.writestr("__MACOSX/data/cat/._b.png", b"junk")
    src = DatasetSource(path, "images", {"input": "input", "size": [8, 8], "mean": [0.5, 0.5, 0.5], "std": 0.5})
    inputs = model_inputs(models["conv"])
    batches = list(iter_batches(src, inputs, batch_size=2))
    assert count_batches(src, inputs, batch_size=2) == 2 == len(batches)
    assert batches[0].feeds["input"].shape == (2, 3, 8, 8) and batches[0].feeds["input"].dtype == np.float32
    assert batches[0].labels.tolist() == [0, 0] and batches[1].labels.tolist() == [1]  # cat=0, dog=1
    red = batches[0].feeds["input"][0]  # cat/b.png, RGB: (1 - .5)/.5 = 1 on R, -1 on G and B
    np.testing.assert_allclose(red[0], 1.0, atol=1e-6)
    np.testing.assert_allclose(red[1:], -1.0, atol=1e-6)
    _run_all(models["conv"], batches)


def test_images_labels_csv_bgr_nhwc(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    from tests.worker.engine.pitfall_models import _model, _save

    graph = helper.make_graph(
        [helper.make_node("Identity", ["img"], ["out"])],
        "nhwc",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 4, 4, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 4, 3])],
    )
    model = _save(_model(graph, 13), tmp_path / "nhwc.onnx")
    path = tmp_path / "imgs.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("labels.csv", "filename,label\nb.png,3\na.png,1\n")
        zf.writestr("a.png", _png((255, 0, 0)))
        zf.writestr("b.png", _png((0, 0, 255)))
    src = DatasetSource(path, "images", {"input": "img", "size": [4, 4], "layout": "NHWC", "color": "BGR"})
    inputs = model_inputs(model)
    batches = list(iter_batches(src, inputs, batch_size=8))  # fixed batch 1 wins
    assert len(batches) == 2
    assert [b.labels.tolist() for b in batches] == [[1], [3]]
    a = batches[0].feeds["img"]
    assert a.shape == (1, 4, 4, 3)
    np.testing.assert_allclose(a[0, :, :, 2], 1.0)  # red lands last in BGR
    np.testing.assert_allclose(a[0, :, :, :2], 0.0)


def test_images_errors(models: dict[str, Path], tmp_path: Path) -> None:
    inputs = model_inputs(models["conv"])
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.png", b"\x89PNG broken")
    with pytest.raises(RuleError) as err:
        list(iter_batches(DatasetSource(path, "images", {"input": "input", "size": [8, 8]}), inputs))
    assert err.value.code == "invalid_dataset" and "a.png" in err.value.message
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("a.png", _png((1, 2, 3)))
    with pytest.raises(RuleError) as err:
        count_batches(DatasetSource(good, "images", {"input": "input", "size": [16, 16]}), inputs)  # model wants 8x8
    assert err.value.code == "dataset_model_mismatch" and err.value.detail["input"] == "input"
    with pytest.raises(RuleError) as err:
        count_batches(DatasetSource(good, "images", {"input": "nope", "size": [8, 8]}), inputs)
    assert err.value.code == "dataset_model_mismatch"
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("__MACOSX/._a.png", "x")  # litter only: no image
    with pytest.raises(RuleError) as err:
        count_batches(DatasetSource(empty, "images", {"input": "input", "size": [8, 8]}), inputs)
    assert err.value.code == "invalid_dataset"


def test_decompression_bomb_guard(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 50)  # the 12x10 test image is "too large"
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.png", _png((1, 2, 3)))
    with pytest.raises(RuleError) as err:
        list(
            iter_batches(
                DatasetSource(path, "images", {"input": "input", "size": [8, 8]}), model_inputs(models["conv"])
            )
        )
    assert err.value.code == "invalid_dataset" and "too large" in err.value.message


def test_a_job_plans_each_dataset_once_and_every_step_reads_that_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation, quantization (its check and calibration), and the evaluation (its count and its pass) all
    read the dataset; the rules that plan it run once per dataset and batch size in the job."""
    from core.evaluation import EvaluationSpec
    from core.jobfile import JobFile, Limits
    from core.recipe import Recipe
    from tests.onnx_models import conv_classifier
    from worker.engine import data, job

    calls: list[int] = []
    real = data.plan_arrays
    monkeypatch.setattr(data, "plan_arrays", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = conv_classifier(tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", input=np.random.default_rng(0).random((6, 1, 3, 8, 8), dtype=np.float32))
    source = DatasetSource(tmp_path / "d.npz", "npz")
    spec = EvaluationSpec(latency_runs=2, warmup_runs=0)
    work = tmp_path / "work"
    work.mkdir()
    inputs = tuple(model_inputs(model))
    job.run_job(JobFile("j", model, inputs, Recipe(mode="static"), spec, Limits(), source, source, True), work)
    assert calls == [1]  # the calibration and evaluation batch sizes are both 1: one plan

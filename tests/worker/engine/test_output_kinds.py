"""Output kinds from the graph and the data (issue #22, point 1): each output's kind is read from the op that
produces it and the shape it has when run (never the declared one), or given by the recipe; the result says
which kind, whether given or inferred, and why. A detector's rows are judged by their detections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.errors import RuleError
from core.jobfile import DatasetSource
from core.recipe import parse_recipe
from core.result import OutputFidelity
from tests.output_kind_models import detector_images, kinds_zoo, row_detector, sequence_first_recognizer
from worker.engine.data import model_inputs
from worker.engine.fidelity import FidelityEvaluator, Score


def _data(folder: Path, **arrays: np.ndarray) -> DatasetSource:
    np.savez(folder / "data.npz", **arrays)
    return DatasetSource(folder / "data.npz", "npz")


def _score(model: Path, candidate: Path, data: DatasetSource, fidelity: dict[str, Any] | None = None) -> Score:
    spec = parse_recipe({"mode": "auto", "fidelity": fidelity}).fidelity if fidelity is not None else None
    return FidelityEvaluator(model, data, model_inputs(model), spec, 0.01, max_samples=16).score(candidate)


def _rows(score: Score) -> dict[str, OutputFidelity]:
    return {o.name: o for o in score.outputs}


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DatasetSource]:
    folder = tmp_path_factory.mktemp("detector")
    return row_detector(folder / "detector.onnx"), _data(folder, image=detector_images(8))


def test_every_kind_is_read_from_the_op_that_produces_it(tmp_path: Path) -> None:
    model = kinds_zoo(tmp_path / "zoo.onnx")
    data = _data(tmp_path, image=np.random.default_rng(0).random((4, 1, 3, 8, 8), dtype=np.float32))
    rows = _rows(_score(model, model, data))
    expected = {
        "probs": ("classification", "agreement", "produced by Softmax over the last axis of [1, 5]"),
        "class_id": ("classification", "agreement", "produced by ArgMax: class ids [1]"),
        "embedding": ("embedding", "cosine", "produced by GlobalAveragePool: a pooled vector per sample, [1, 8]"),
        "unit_embedding": (
            "embedding",
            "cosine",
            "produced by a Div by a norm: a normalised vector per sample, [1, 8]",
        ),
        "features": ("dense", "cosine", "produced by Conv: a map [1, 8, 8, 8]"),
        "segmentation": ("dense", "agreement", "produced by Softmax over axis 1 of [1, 5, 8, 8]"),
        "value": (
            "regression",
            "cosine",
            "produced by Gemm: nothing says what [1, 1] holds, so it is compared by cosine",
        ),
    }
    assert {name: (r.kind, r.metric, r.kind_reason) for name, r in rows.items()} == expected
    assert {r.kind_source for r in rows.values()} == {"inferred"}
    assert all(r.value == 1.0 and r.faithful for r in rows.values())


def test_a_detector_is_judged_by_its_detections_where_per_row_argmax_says_nothing(
    detector: tuple[Path, DatasetSource], tmp_path: Path
) -> None:
    """Rows (x, y, w, h, obj, cls): argmax over such a row is x or y whatever the scores do. A candidate whose
    scores sank (most detections lost) or whose boxes moved by 3 pixels (boxes are up to 8 wide) keeps per-row
    argmax agreement at 0.99 and more, and the whole tensor's cosine too; its detections say it is broken."""
    model, data = detector
    same = _rows(_score(model, model, data))["detections"]
    assert (same.kind, same.kind_source, same.metric, same.value, same.faithful) == (
        "detection",
        "inferred",
        "detection_f1",
        1.0,
        True,
    )
    assert same.kind_reason == (
        "produced by a Concat of box coordinates and scores, giving rows [1, 256, 6]: boxes in columns 0-3 as "
        "cxcywh, objectness in column 4, class scores in column 5"
    )
    assert same.detection is not None and same.detection.reference_rows == same.detection.matched > 100
    as_rows = {"per_output": {"detections": {"kind": "sequence"}}}  # per-row argmax: what was done before
    for name, damaged in {
        "scores sank": row_detector(tmp_path / "sank.onnx", score_bias=-1.5),
        "boxes moved": row_detector(tmp_path / "moved.onnx", x_shift=3.0),
    }.items():
        argmax = _rows(_score(model, damaged, data, as_rows))["detections"]
        assert argmax.kind == "sequence" and argmax.value is not None and argmax.value >= 0.99, name
        assert argmax.faithful and argmax.cosine is not None and argmax.cosine > 0.99, name  # both misjudge
        judged = _rows(_score(model, damaged, data))["detections"]
        assert judged.metric == "detection_f1" and judged.value is not None and judged.value < 0.3, name
        assert judged.faithful is False, name
    moved = _rows(_score(model, row_detector(tmp_path / "m.onnx", x_shift=3.0), data))["detections"].detection
    assert moved is not None and moved.box_error is not None and moved.box_error > 0.05


def test_yolov8_columns_are_detections_too(tmp_path: Path) -> None:
    model = row_detector(tmp_path / "v8.onnx", columns=True)
    data = _data(tmp_path, image=detector_images(4))
    row = _rows(_score(model, model, data))["detections"]
    assert row.kind == "detection" and row.metric == "detection_f1" and row.value == 1.0
    assert row.detection is not None and row.detection.layout == "columns" and row.detection.matched > 100
    assert row.kind_reason is not None and "columns [1, 5, 256]" in row.kind_reason
    assert "class scores in column 4" in row.kind_reason and "objectness" not in row.kind_reason
    sank = _rows(_score(model, row_detector(tmp_path / "sank.onnx", columns=True, score_bias=-3.0), data))
    assert sank["detections"].value is not None and sank["detections"].value < 0.9


def test_the_shape_a_run_returns_decides_not_the_declared_one(tmp_path: Path) -> None:
    """A recognizer declares [1, seqlen] and returns [T, 1, C]: the output holds scores per position."""
    model = sequence_first_recognizer(tmp_path / "rec.onnx")
    data = _data(tmp_path, x=np.random.default_rng(0).random((4, 1, 8, 16), dtype=np.float32))
    (row,) = _score(model, model, data).outputs
    assert (row.kind, row.kind_source, row.metric, row.value) == ("sequence", "inferred", "agreement", 1.0)
    assert row.kind_reason == (
        "produced by Softmax over the last axis of [8, 1, 10] (as run; the model declares [1, seqlen])"
    )


def test_a_kind_given_in_the_recipe_overrides_the_inferred_one_and_is_reported_as_given(
    detector: tuple[Path, DatasetSource], tmp_path: Path
) -> None:
    model, data = detector
    given = _rows(_score(model, model, data, {"per_output": {"detections": {"kind": "regression"}}}))["detections"]
    assert (given.kind, given.kind_source, given.metric) == ("regression", "given", "cosine")
    assert given.kind_reason == "given in the recipe (fidelity.per_output.detections.kind)"
    zoo = kinds_zoo(tmp_path / "zoo.onnx")
    zoo_data = _data(tmp_path, image=np.random.default_rng(0).random((2, 1, 3, 8, 8), dtype=np.float32))
    # The top-level kind applies to the outputs `outputs` names; the others keep their inferred kinds.
    rows = _rows(_score(zoo, zoo, zoo_data, {"outputs": ["value"], "kind": "embedding", "min": 0.95}))
    assert (rows["value"].kind, rows["value"].kind_source, rows["value"].min) == ("embedding", "given", 0.95)
    assert rows["value"].kind_reason == "given in the recipe (fidelity.kind)" and rows["value"].budgeted
    assert (rows["probs"].kind, rows["probs"].kind_source, rows["probs"].budgeted) == (
        "classification",
        "inferred",
        False,
    )


def test_detection_columns_given_in_the_recipe_are_the_ones_read(detector: tuple[Path, DatasetSource]) -> None:
    """Say the score is column 5 alone (no objectness) and the threshold 0.6: other rows count."""
    model, data = detector
    default = _rows(_score(model, model, data))["detections"].detection
    fidelity = {
        "kind": "detection",
        "detection": {"score_threshold": 0.6, "objectness_column": None, "class_columns": [5, 6]},
    }
    row = _rows(_score(model, model, data, fidelity))["detections"]
    assert row.kind_source == "given" and row.detection is not None and default is not None
    assert row.detection.score_threshold == 0.6 and row.detection.reference_rows != default.reference_rows
    assert row.kind_reason == (
        "given in the recipe (fidelity.kind): rows [1, 256, 6], boxes in columns 0-3 as cxcywh, class scores in "
        "column 5"
    )


@pytest.mark.parametrize(
    ("fidelity", "field", "said"),
    [
        (
            {"kind": "detection", "detection": {"box_columns": [0, 1, 2, 9]}},
            "fidelity.detection.box_columns",
            "column 9 is beyond the 6 columns of the rows of [1, 256, 6]",
        ),
        (
            {"per_output": {"detections": {"kind": "detection", "detection": {"class_id_column": 7}}}},
            "fidelity.per_output.detections.detection.class_id_column",
            "column 7 is beyond the 6 columns",
        ),
        (
            {"per_output": {"nope": {"kind": "sequence"}}},
            "fidelity.per_output",
            "fidelity.per_output names output(s) the model does not have: nope",
        ),
    ],
)
def test_a_given_kind_that_does_not_fit_the_output_is_refused_naming_the_field(
    detector: tuple[Path, DatasetSource], fidelity: dict[str, Any], field: str, said: str
) -> None:
    model, data = detector
    with pytest.raises(RuleError) as info:
        _score(model, model, data, fidelity)
    assert info.value.code == "invalid_recipe" and info.value.detail["field"] == field
    assert said in info.value.message


def test_a_detector_without_detections_is_judged_by_cosine_and_says_so(
    detector: tuple[Path, DatasetSource],
) -> None:
    model, data = detector
    row = _rows(_score(model, model, data, {"detection": {"score_threshold": 1.0}}))["detections"]
    assert row.kind == "detection" and row.metric == "cosine" and row.value == 1.0
    assert row.kind_reason is not None and row.kind_reason.endswith(
        "no row scored above 1 in either model, so it is judged by cosine"
    )

"""The detection metric on rows whose answers are known by hand: which rows are detections, how a float and a
quantized detection match (IoU, class), and the F1 of the two sets."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import RuleError
from core.recipe import DetectionSpec, OutputJudging
from worker.engine.fidelity import (
    DetectionReader,
    Detections,
    DetectionTally,
    OutputAccumulator,
    OutputKind,
    box_iou,
    choose_kind,
    match_detections,
)


def _rows(*rows: tuple[float, ...]) -> np.ndarray:
    """One sample's rows (x, y, w, h, obj, cls) as a [1, N, 6] output."""
    return np.asarray([rows], np.float32)


def _reader(reference: np.ndarray, **spec: object) -> DetectionReader:
    """Rows unless told: a handful of rows is no detector's output, and `auto` would read [1, 5, 6] as columns."""
    spec = {"layout": "rows", **spec}
    reader = DetectionReader.resolve(DetectionSpec(**spec), reference, field="fidelity.detection")  # type: ignore[arg-type]
    assert reader is not None
    return reader


def _tally(ref: np.ndarray, got: np.ndarray, **spec: object) -> DetectionTally:
    tally = DetectionTally(_reader(ref, **spec))
    tally.add(ref, got)
    return tally


def test_a_shifted_box_has_the_iou_of_its_overlap() -> None:
    box = np.array([[0.0, 0.0, 10.0, 10.0]])
    right = np.array([1.0, 0.0, 1.0, 0.0])  # moves a box right by one unit
    assert box_iou(box, box + 2 * right)[0, 0] == pytest.approx(80 / 120)  # 8x10 shared, 12x10 covered
    assert box_iou(box, box + 5 * right)[0, 0] == pytest.approx(50 / 150)
    assert box_iou(box, box + 10 * right)[0, 0] == 0.0
    assert box_iou(box, np.array([[2.5, 2.5, 7.5, 7.5]]))[0, 0] == pytest.approx(0.25)


def test_a_box_moved_by_a_fifth_of_its_width_matches_and_half_of_it_does_not() -> None:
    ref = _rows((50, 50, 10, 10, 0.9, 0.8))
    near = _tally(ref, _rows((52, 50, 10, 10, 0.9, 0.8)))  # IoU 2/3
    assert (near.matched, near.f1) == (1, 1.0)
    assert near.iou_sum == pytest.approx(2 / 3)
    assert near.error_sum == pytest.approx((0.2 + 0 + 0.2 + 0) / 4)  # both x corners moved by 2 of 10
    far = _tally(ref, _rows((55, 50, 10, 10, 0.9, 0.8)))  # IoU 1/3 < 0.5
    assert (far.matched, far.reference_rows, far.candidate_rows, far.f1) == (0, 1, 1, 0.0)
    assert _tally(ref, _rows((55, 50, 10, 10, 0.9, 0.8)), iou_threshold=0.3).f1 == 1.0


def test_a_dropped_detection_costs_its_share_of_the_f1() -> None:
    boxes = [(10, 10, 8, 8), (40, 10, 8, 8), (10, 40, 8, 8), (40, 40, 8, 8)]
    ref = _rows(*[(*b, 0.9, 0.9) for b in boxes])
    got = ref.copy()
    got[0, 3, 4] = 0.2  # the last one's score falls under 0.3: one detection lost
    tally = _tally(ref, got)
    assert (tally.reference_rows, tally.candidate_rows, tally.matched) == (4, 3, 3)
    assert tally.f1 == pytest.approx(2 * 3 / (4 + 3))
    got[0, 1, 4] = 0.2
    assert _tally(ref, got).f1 == pytest.approx(2 * 2 / (4 + 2))
    phantom = np.concatenate([ref, _rows((70, 70, 8, 8, 0.9, 0.9))], axis=1)
    assert _tally(np.concatenate([ref, _rows((70, 70, 8, 8, 0.1, 0.9))], axis=1), phantom).f1 == pytest.approx(8 / 9)


def test_rows_under_the_threshold_are_no_detections_and_the_score_is_objectness_times_class() -> None:
    ref = _rows((10, 10, 8, 8, 0.9, 0.3), (40, 40, 8, 8, 0.5, 0.9), (70, 70, 8, 8, 0.2, 1.0))
    (found,) = _reader(ref).detections(ref)
    assert found.index.tolist() == [1]  # 0.27, 0.45, 0.2
    assert found.scores.tolist() == pytest.approx([0.45])
    assert found.boxes.tolist() == [[36, 36, 44, 44]]


def test_detections_of_another_class_do_not_match() -> None:
    scores = np.array([[[10, 10, 8, 8, 0.9, 0.8, 0.1], [40, 40, 8, 8, 0.9, 0.1, 0.8]]], np.float32)
    swapped = scores.copy()
    swapped[0, 0, 5:] = [0.1, 0.8]  # the same box, now class 1
    tally = _tally(scores, swapped)
    assert (tally.matched, tally.reference_rows, tally.candidate_rows) == (1, 2, 2)
    ids = np.array([[[10, 10, 8, 8, 0.9, 3.0], [40, 40, 8, 8, 0.9, 1.0]]], np.float32)  # a class id column
    reader = _reader(ids)
    assert reader.class_id == 5 and reader.classes == ()
    other = ids.copy()
    other[0, 0, 5] = 2.0
    assert _tally(ids, other).matched == 1


def test_reordered_rows_are_matched_by_iou_and_each_detection_once() -> None:
    """After NMS the rows of two models need not be in the same order; each detection matches one at most."""
    ref = Detections(
        np.array([0, 1]), np.array([[0, 0, 10, 10], [20, 0, 30, 10.0]]), np.array([0.9, 0.8]), np.array([0, 0])
    )
    got = Detections(
        np.array([0, 1, 2]),
        np.array([[20, 0, 30, 10], [1, 0, 11, 10], [0, 0, 10, 10.0]]),
        np.array([0.9, 0.8, 0.7]),
        np.array([0, 0, 0]),
    )
    pr, pg = match_detections(ref, got, 0.5)
    assert sorted(zip(pr.tolist(), pg.tolist(), strict=True)) == [(0, 2), (1, 0)]  # the best IoU each, once


def test_layouts_and_box_formats() -> None:
    rows = np.array([[[10, 20, 4, 6, 0.9, 0.2, 0.7], [50, 50, 4, 4, 0.1, 0.9, 0.9]]], np.float32)
    reader = _reader(rows)
    assert (reader.layout, reader.objectness, reader.classes) == ("rows", 4, (5, 6))
    (found,) = reader.detections(rows)
    assert found.boxes.tolist() == [[8, 17, 12, 23]] and found.classes.tolist() == [1]
    columns = np.swapaxes(rows[..., [0, 1, 2, 3, 5, 6]], 1, 2)  # YOLOv8: [B, 4 + C, N], no objectness
    v8 = _reader(np.concatenate([columns] * 5, axis=2), layout="auto")  # [1, 6, 10]
    assert (v8.layout, v8.objectness, v8.classes) == ("columns", None, (4, 5))
    corners = _reader(rows, box_format="xyxy")
    assert corners.detections(rows)[0].boxes.tolist() == [[4, 6, 10, 20]]
    assert _reader(rows, box_format="xywh").detections(rows)[0].boxes.tolist() == [[10, 20, 14, 26]]


def test_columns_beyond_the_row_are_refused_for_a_given_kind_and_not_inferred() -> None:
    rows = np.zeros((1, 100, 6), np.float32)
    with pytest.raises(RuleError) as info:
        DetectionReader.resolve(DetectionSpec(class_columns=(5, 85)), rows, field="fidelity.detection")
    assert info.value.detail["field"] == "fidelity.detection.class_columns" and "beyond the 6 columns" in str(
        info.value.message
    )
    assert DetectionReader.resolve(DetectionSpec(), np.zeros((1, 100, 4), np.float32), field=None) is None
    assert choose_kind(np.zeros((1, 100, 4), np.float32)).kind == OutputKind.SEQUENCE  # no graph, no rows


def test_the_accumulator_scores_detections_across_batches() -> None:
    ref = _rows((10, 10, 8, 8, 0.9, 0.9), (40, 40, 8, 8, 0.9, 0.9))
    got = ref.copy()
    got[0, 1, 4] = 0.1
    choice = choose_kind(ref, None, judging=None)
    assert choice.kind != OutputKind.DETECTION  # nothing in a bare array says rows of boxes
    given = choose_kind(ref, judging=OutputJudging(kind="detection"), given="fidelity.kind")  # type: ignore[arg-type]
    acc = OutputAccumulator("boxes", given)
    acc.add(ref, got)
    acc.add(ref, ref)
    assert acc.detection_f1 == pytest.approx(2 * 3 / (4 + 3))
    row = acc.judged(None)
    assert row.metric == "detection_f1" and row.faithful is False and row.detection is not None
    assert (row.detection.reference_rows, row.detection.candidate_rows, row.detection.matched) == (4, 3, 3)

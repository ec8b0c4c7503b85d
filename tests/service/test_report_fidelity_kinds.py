"""The report's fidelity table says, per output, the kind it was judged as, whether the recipe gave it or it
was inferred and why, and for a detector its detections: read from the result, never decided again."""

from __future__ import annotations

import html

from service.reports import render_report_html
from tests.service.test_report_html import EVIL, _job, _result


def test_each_output_shows_its_kind_where_it_came_from_and_why() -> None:
    result = _result()
    reason = "produced by a Concat of box coordinates and scores, giving rows [1, 8400, 85]: boxes in columns 0-3"
    result["comparison"]["fidelity"] = {"within_budget": False, "metric": "detection_f1", "accuracy_tolerance": 0.01}
    result["comparison"]["outputs"] = [
        {
            "name": "output0",
            "kind": "detection",
            "kind_source": "inferred",
            "kind_reason": reason,
            "metric": "detection_f1",
            "value": 0.946,
            "min": 0.99,
            "budgeted": True,
            "faithful": False,
            "cosine": 0.991,
            "detection": {
                "score_threshold": 0.3,
                "iou_threshold": 0.5,
                "layout": "rows",
                "reference_rows": 120,
                "candidate_rows": 118,
                "matched": 113,
                "mean_iou": 0.912,
                "box_error": 0.031,
            },
        },
        {
            "name": "ctc",
            "kind": "sequence",
            "kind_source": "given",
            "kind_reason": f"given in the recipe (fidelity.per_output.{EVIL}.kind)",
            "metric": "agreement",
            "value": 0.995,
            "min": 0.99,
            "budgeted": True,
            "faithful": True,
        },
    ]
    page = render_report_html(_job(result=result))
    assert f'detection<br><span class="sub">inferred: {html.escape(reason)}</span>' in page
    assert (
        "120 detections above 0.3 in the original, 118 in the quantized model; 113 matched (IoU ≥ 0.5, same "
        "class), mean IoU 0.912, box error 3.1% of the box size"
    ) in page
    assert "detection_f1 ≥ 0.9900" in page and '<strong class="bad">outside budget</strong>' in page
    assert f"given: given in the recipe (fidelity.per_output.{html.escape(EVIL)}.kind)" in page
    assert "<script>alert" not in page


def test_a_result_stored_with_v2_kinds_shows_their_v3_names() -> None:
    result = _result()
    result["comparison"]["outputs"][0]["kind"] = "class_scores"
    page = render_report_html(_job(result=result))
    assert 'classification<br><span class="sub">inferred: read from its values by an earlier version' in page

"""The report page of a job measured on several worker classes: the classes side by side with the model to ship
on each, a pending or failed one said as such, and the class of the worker every figure came from."""

from __future__ import annotations

import re
from typing import Any

from core.errors import ErrorInfo
from core.result import JobResult, Machine, MeasuredOn
from service.reports.html import render_report_html
from tests.service.test_job_measurements import metrics, result


def _job(stored: JobResult, target: Any) -> dict[str, Any]:
    return {
        "id": "job-1",
        "status": "succeeded",
        "stage": "done",
        "progress": 1.0,
        "model_id": "m",
        "recipe": {"mode": "dynamic"},
        "target": target,
        "result": stored.model_dump(mode="json"),
    }


def _section(page: str) -> str:
    found = re.search(r'<section id="measured-on">.*?</section>', page, re.S)
    assert found, "no per-class section"
    return found.group(0)


def test_the_report_shows_each_class_side_by_side_with_the_model_to_ship_there() -> None:
    stored = result(2.0).model_copy(
        update={
            "machine": Machine(worker_class="x86_64-avx2", cpu_model="cpu"),
            "measured_on": [
                MeasuredOn.where_it_ran("x86_64-avx2", result(1.02), objective="latency", at=None),
                MeasuredOn.measured(
                    "edge",
                    Machine(worker_class="x86_64-amx", pool="edge"),
                    metrics(4.0),
                    metrics(1.0),
                    result(4.0).comparison,
                    objective="latency",
                ),
                MeasuredOn.pending("aarch64-i8mm"),
                MeasuredOn.failed("x86_64-avx512vnni", ErrorInfo("timeout", "No worker of <it> measured it.", {})),
            ],
        }
    )
    page = render_report_html(_job(stored, ["x86_64-avx2", "edge", "aarch64-i8mm", "x86_64-avx512vnni"]))
    section = _section(page)
    rows = re.findall(r"<tr><td>.*?</tr>", section, re.S)
    assert len(rows) == 4
    avx2, amx, pending, failed = rows
    assert "x86_64-avx2" in avx2 and "2.00 ms" in avx2 and "1.02x" in avx2 and "<strong>float</strong>" in avx2
    assert "x86_64-amx" in amx and "edge" in amx and "4.00x" in amx and "<strong>quantized</strong>" in amx
    assert "waiting for a worker of aarch64-i8mm" in pending
    assert "No worker of &lt;it&gt; measured it." in failed and "<it>" not in section
    assert section.count("<svg") == 1 and "x86_64-amx" in section.split("<table")[0]  # bars per measured class
    assert "target <code>x86_64-avx2, edge, aarch64-i8mm, x86_64-avx512vnni</code>" in page
    assert "<th>worker class</th><td>x86_64-avx2</td>" in page  # the Machine section says where


def test_a_job_on_one_target_has_no_per_class_section() -> None:
    page = render_report_html(_job(result(), "any"))
    assert 'id="measured-on"' not in page and "target <code>" not in page

"""The client's thin views of the result (client/qaas_client/types.py) held to the one result type
(core/result.py): every field the client reads is the server's, under the name the server gives it, and
the verdicts it shows are the server's."""

from __future__ import annotations

import ast
from pathlib import Path

from core.result import (
    AccuracyComparison,
    AutoSearch,
    Comparison,
    FidelityVerdict,
    JobResult,
    LatencyStats,
    ModelMetrics,
    OutputFidelity,
    QuantizationFacts,
)
from qaas_client.types import Report

LATENCY = {"p50": 2.0, "p90": 2.5, "p99": 3.0, "mean": 2.1, "std": 0.1, "min": 1.9, "max": 3.1}


def _result() -> JobResult:
    rows = [
        OutputFidelity(
            name="logits",
            metric="agreement",
            value=1.0,
            min=0.99,
            budgeted=True,
            faithful=True,
            cosine=0.985,
            sqnr_db=21.0,
            max_abs_error=0.3,
            top1_agreement=1.0,
        ),
        OutputFidelity(
            name="aux",
            metric="cosine",
            value=0.97,
            min=0.99,
            budgeted=True,
            faithful=False,
            cosine=0.97,
            sqnr_db=12.0,
            max_abs_error=1.5,
        ),
    ]
    return JobResult(
        original=ModelMetrics(size_bytes=4000, latency_ms=LatencyStats(**LATENCY)),
        quantized=ModelMetrics(size_bytes=1000, latency_ms=LatencyStats(**{**LATENCY, "p50": 1.0})),
        comparison=Comparison(
            size_ratio=0.25,
            speedup_p50=2.0,
            outputs=rows,
            fidelity=FidelityVerdict(within_budget=False, metric="cosine", fidelity=0.97, accuracy_tolerance=0.01),
            accuracy=AccuracyComparison(
                metric="top1", original=0.8, quantized=0.79, delta=-0.01, within_tolerance=True
            ),
        ),
        warnings=["w"],
        quantization=QuantizationFacts(mode="static", auto=AutoSearch(verdict="quantized", chosen="static QDQ")),
    )


def test_the_client_reads_the_servers_result_field_for_field() -> None:
    result = _result()
    report = Report.from_json(result.model_dump(mode="json"))
    assert (report.original_size_bytes, report.quantized_size_bytes) == (4000, 1000)
    assert (report.size_ratio, report.speedup_p50) == (0.25, 2.0)
    assert (report.original_p50_ms, report.quantized_p50_ms) == (2.0, 1.0)
    assert [(o.name, o.cosine, o.sqnr_db, o.max_abs_error, o.top1_agreement, o.faithful) for o in report.outputs] == [
        ("logits", 0.985, 21.0, 0.3, 1.0, True),
        ("aux", 0.97, 12.0, 1.5, None, False),
    ]
    assert report.accuracy is not None and report.accuracy.within_tolerance is True
    assert report.within_budget is False and report.warnings == ["w"]
    assert report.auto_verdict == "quantized" and report.auto_chosen == "static QDQ"  # a string, as served


def test_every_key_the_client_reads_is_a_field_of_the_result_type() -> None:
    """The keys `Report.from_json` reads with `.get` or `[...]`, against the fields of core's result
    models: a field renamed on the server fails here, not on a user's terminal."""
    fields: set[str] = set()
    for model in (
        JobResult,
        ModelMetrics,
        LatencyStats,
        Comparison,
        OutputFidelity,
        FidelityVerdict,
        AccuracyComparison,
        QuantizationFacts,
        AutoSearch,
    ):
        fields |= set(model.model_fields)
    source = Path(__file__).resolve().parents[2] / "client" / "qaas_client" / "types.py"
    tree = ast.parse(source.read_text())
    report = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Report")
    read = {
        node.args[0].value
        for node in ast.walk(report)
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", "") == "get"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    } | {
        node.slice.value
        for node in ast.walk(report)
        if isinstance(node, ast.Subscript)
        and isinstance(node.slice, ast.Constant)
        and isinstance(node.slice.value, str)
    }
    assert read and not read - fields, sorted(read - fields)

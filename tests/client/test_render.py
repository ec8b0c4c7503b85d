"""The summary `qaas quantize` and `qaas report` print, from a report in the contract's shape."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from qaas_client import Report
from qaas_client.render import summary

RESULT: dict[str, Any] = {
    "original": {"size_bytes": 10_000_000, "latency_ms": {"p50": 2.0}, "accuracy": 0.75},
    "quantized": {"size_bytes": 2_600_000, "latency_ms": {"p50": 1.0}, "accuracy": 0.74},
    "comparison": {
        "size_ratio": 0.26,
        "speedup_p50": 2.0,
        "outputs": [
            {"name": "logits", "cosine": 0.9995, "sqnr_db": 27.04, "max_abs_error": 0.1, "top1_agreement": 0.97}
        ],
        "accuracy": {"metric": "top1", "original": 0.75, "quantized": 0.74, "delta": -0.01},
    },
    "warnings": ["Percentile calibration clipped 2 outliers."],
    "quantization": {"auto": {"verdict": "quantized", "chosen": "static per-channel MinMax", "candidates": []}},
}


def printed(report: Report) -> str:
    console = Console(record=True, width=200)
    console.print(summary(report))
    return console.export_text()


def test_the_summary_names_every_figure_a_user_checks() -> None:
    text = printed(Report.from_json(RESULT))
    for expected in (
        "10.0 MB -> 2.6 MB (0.26x)",
        "p50 2.000 ms -> 1.000 ms, speedup 2.00x",
        "logits: cosine 0.99950, SQNR 27.0 dB, top-1 agreement 97.0%",
        "top1: 0.7500 -> 0.7400 (delta -0.0100)",
        "quantized; chose static per-channel MinMax",
        "- Percentile calibration clipped 2 outliers.",
    ):
        assert expected in text, text


def test_missing_figures_are_said_to_be_missing_not_invented() -> None:
    bare = {**RESULT, "comparison": {"size_ratio": 0.5, "outputs": []}, "warnings": [], "quantization": {}}
    bare["quantized"] = {"size_bytes": 5_000_000}
    text = printed(Report.from_json(bare))
    assert "latency" not in text and "auto" not in text
    assert "no labels in the evaluation data" in text and "warnings  none" in text

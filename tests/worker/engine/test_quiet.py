"""quiet_ort / fold_repeats: library warnings that repeat once per value become one line."""

from __future__ import annotations

import warnings
from pathlib import Path

from core.recipe import Recipe
from tests.worker.engine import pitfall_models as pm
from worker.engine.quantize import quantize
from worker.engine.quiet import fold_repeats, quiet_ort


def test_repeats_with_other_numbers_fold_into_one_line_with_count_and_extreme() -> None:
    messages = [
        "conv1.weight: 3 values clipped at 1.5",
        "an unrelated warning",
        "conv1.weight: 3 values clipped at 1.5",  # an exact repeat counts too
        "conv1.weight: 12 values clipped at -7.25",
        "conv1.weight: 1 values clipped at 0.5",
        "conv2.weight: 1 values clipped at 0.5",  # another name: another warning
    ]
    assert fold_repeats(messages) == [
        "conv1.weight: 3 values clipped at 1.5 (and 3 more like it; largest magnitude 12)",
        "an unrelated warning",
        "conv2.weight: 1 values clipped at 0.5",
    ]


def test_a_warning_that_comes_once_is_kept_as_it_is() -> None:
    assert fold_repeats(["the float32 number 20000.0 will be truncated to 10000.0"]) == [
        "the float32 number 20000.0 will be truncated to 10000.0"
    ]


def test_quiet_ort_collects_folded_warnings() -> None:
    collected: list[str] = ["already there"]
    with quiet_ort(collected):
        for v in (3e4, -5e5, 2e4):
            warnings.warn(f"the float32 number {v} will be truncated to {10000.0 if v > 0 else -10000.0}", stacklevel=1)
        warnings.warn("already there", stacklevel=1)
        warnings.warn("said twice", stacklevel=1)
        warnings.warn("said twice", stacklevel=1)
        warnings.warn("old API", DeprecationWarning, stacklevel=1)
    assert collected == [
        "already there",
        "The float16 conversion clipped float32 values beyond ±10000 to ±10000 (3 warnings, one per tensor and "
        "sign; largest magnitude 5e+05).",
        "said twice",
    ]


def test_fp16_job_shows_one_line_per_kind_of_truncation(tmp_path: Path) -> None:
    """Six weight tensors with values beyond ±1e4 and nearer zero than 1e-7: onnxconverter-common
    warns 24 times; the job shows two lines."""
    model = pm.fp16_truncated_weights(tmp_path / "big.onnx", tensors=6)
    out = quantize(model, Recipe(mode="fp16"), tmp_path / "fp16")
    assert not any("the float32 number" in w for w in out.warnings)
    clipped = [w for w in out.warnings if "clipped float32 values beyond ±10000" in w]
    raised = [w for w in out.warnings if "raised float32 values closer to zero than 1e-07" in w]
    assert clipped == [
        "The float16 conversion clipped float32 values beyond ±10000 to ±10000 (12 warnings, one per tensor and "
        "sign; largest magnitude 1.6e+04)."
    ]
    assert raised == [
        "The float16 conversion raised float32 values closer to zero than 1e-07 to ±1e-07 (12 warnings, one per "
        "tensor and sign; smallest magnitude 2e-10)."
    ]

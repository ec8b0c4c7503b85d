"""The engine's check of a job before any work: every rule the API applied at job creation
(`core`), on the files themselves."""

from __future__ import annotations

from pathlib import Path

from core.jobfile import DatasetSource
from core.recipe import Recipe, check_recipe_for_model
from worker.engine.checks import model_facts
from worker.engine.data import count_batches


def validate_job(
    model_path: Path,
    recipe: Recipe,
    *,
    calibration: DatasetSource | None,
    evaluation_data: DatasetSource | None,
    evaluation_batch_size: int,
) -> None:
    """Every rule the API checked at job creation, on the files themselves, before any work:
    the recipe against the model, and both datasets against its inputs at their batch sizes."""
    facts = model_facts(model_path)
    check_recipe_for_model(recipe, facts, has_calibration=calibration is not None)
    inputs = list(facts.inputs)
    if calibration is not None:
        count_batches(calibration, inputs, batch_size=recipe.calibration_batch_size)
    if evaluation_data is not None:
        count_batches(evaluation_data, inputs, batch_size=evaluation_batch_size)

"""The engine's side of the recipe rules: the same `check_recipe` / `check_recipe_for_model` the
API runs (`core.recipe`), over facts read from the model file itself."""

from __future__ import annotations

from pathlib import Path

import onnx

from core.errors import RuleError
from core.model import ModelFacts, default_opset, iter_graphs
from core.model import model_facts as facts_of
from core.recipe import FOUR_BIT, SIXTEEN_BIT, check_recipe, check_recipe_for_model

__all__ = [
    "FOUR_BIT",
    "SIXTEEN_BIT",
    "ModelFacts",
    "check_recipe",
    "check_recipe_for_model",
    "default_opset",
    "iter_graphs",
    "load_header",
    "model_facts",
    "model_size",
]


def load_header(model_path: Path) -> onnx.ModelProto:
    """The model without its external weights. Raises RuleError `invalid_model`."""
    try:
        return onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise RuleError("invalid_model", f"The model could not be read: {exc}", {}) from exc


def model_facts(model_path: Path) -> ModelFacts:
    return facts_of(load_header(model_path))


def model_size(model_path: Path, facts: ModelFacts) -> int:
    """The model file plus the external data files it names."""
    size = Path(model_path).stat().st_size
    for location in facts.external_files:
        path = Path(model_path).parent / location
        if path.is_file():
            size += path.stat().st_size
    return size

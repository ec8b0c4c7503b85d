"""The one exception the engine raises for a failure a user can act on.

It is the shared contract's RuleError: a recipe or dataset rule broken in the engine fails the
job with exactly the code and sentence the API would have answered with."""

from __future__ import annotations

from service.contract.errors import RuleError as EngineError

__all__ = ["EngineError"]

"""Where a job runs: the worker class a CPU makes (its architecture and best int8 instructions), the pools
operators group workers in, and the `target` a job names. The worker derives its class here, the API
checks a job's target here, and both name queues from them (`service.queue`)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from core.cpu import architecture, normalise
from core.errors import RuleError

ANY = "any"
MAX_TARGETS = 8
NAME_LENGTH = 63
# Class and pool names: lower case, digits, `_` and `-` (they name broker queues and files of the
# filesystem broker, so never a dot, a slash or a space).
NAME = re.compile(rf"[a-z0-9][a-z0-9_-]{{0,{NAME_LENGTH - 1}}}")

# Per architecture, its int8 tiers from the fastest to the plainest: (class suffix, flags all present).
# A CPU's class is its architecture and the first tier it has: x86_64-amx, aarch64-i8mm, x86_64-avx2...
TIERS: dict[str, tuple[tuple[str, frozenset[str]], ...]] = {
    "x86_64": (
        ("amx", frozenset({"amx_tile", "amx_int8"})),
        ("avx512vnni", frozenset({"avx512_vnni"})),
        ("avxvnni", frozenset({"avx_vnni"})),
        ("avx512", frozenset({"avx512f", "avx512bw"})),
        ("avx2", frozenset({"avx2"})),
    ),
    "aarch64": (
        ("i8mm", frozenset({"i8mm"})),
        ("dotprod", frozenset({"asimddp"})),
        ("neon", frozenset({"asimd"})),
    ),
}
# The instructions that decide int8 speed, as a worker advertises them (GET /v1/targets).
CLASS_FEATURES = (
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "asimd",
    "asimddp",
    "i8mm",
)


def class_name(machine: str, flags: Iterable[str]) -> str:
    """The worker class of a CPU: its architecture (`x86_64`, `aarch64`) and its best int8 tier, e.g.
    `x86_64-avx512vnni`; the architecture alone when it has none of the tiers. The same facts always give
    the same name."""
    arch = re.sub(r"[^a-z0-9_]", "_", architecture(machine))[:32] or "unknown"
    have = normalise(list(flags))
    for suffix, needed in TIERS.get(arch, ()):
        if needed <= have:
            return f"{arch}-{suffix}"
    return arch


def class_features(flags: Iterable[str]) -> tuple[str, ...]:
    """Those of CLASS_FEATURES the flags hold, in CLASS_FEATURES' order."""
    have = normalise(list(flags))
    return tuple(f for f in CLASS_FEATURES if f in have)


# How a worker hands its class and pool to the job processes it starts (worker/sandbox.py lets this through
# from the worker's environment, besides PATH and the locale): not a setting, nothing secret, no QAAS_ name.
PLACEMENT_VARIABLE = "WORKER_PLACEMENT"


@dataclass(frozen=True)
class Placement:
    """Where a measurement was made: the worker's class and, when its operator set one, its pool."""

    worker_class: str
    pool: str | None = None

    def environ(self) -> dict[str, str]:
        return {PLACEMENT_VARIABLE: f"{self.worker_class}/{self.pool or ''}"}

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Placement | None:
        """The placement `environ()` wrote, or None (a process not started by a worker, a name no worker has)."""
        worker_class, _, pool = environ.get(PLACEMENT_VARIABLE, "").partition("/")
        if not NAME.fullmatch(worker_class) or (pool and not NAME.fullmatch(pool)):
            return None
        return cls(worker_class, pool or None)


class TargetError(RuleError, ValueError):
    """A `target` that names nothing a worker could be: refused with 422 `invalid_target`."""

    def __init__(self, message: str, **detail: object) -> None:
        super().__init__("invalid_target", message, dict(detail))


def check_name(value: str, what: str = "target") -> str:
    """A class or pool name as given, or TargetError (ValueError) saying what a name may hold."""
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise TargetError(
            f"{what} {str(value)[:80]!r} is not a worker class or pool name: use lower-case letters, digits, "
            f"'_' and '-', at most {NAME_LENGTH} characters, as GET /v1/targets lists them.",
            name=str(value)[:80],
        )
    return value


def parse_target(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """A job's `target` as the names it lists: () for `any` (any worker), one name (a class or a pool), or
    several (the job runs where the first is, and is timed on each of the others too)."""
    names = [value] if isinstance(value, str) else list(value if value is not None else [ANY])
    if names == [ANY]:
        return ()
    if not names:
        raise TargetError('target is an empty list; name at least one class or pool, or "any".')
    if len(names) > MAX_TARGETS:
        raise TargetError(f"target names {len(names)} classes or pools; at most {MAX_TARGETS} are measured.")
    if ANY in names and len(names) > 1:
        raise TargetError('"any" cannot be listed with other targets; list classes or pools, or give "any" alone.')
    if len(set(names)) != len(names):
        raise TargetError("target lists a class or pool twice; list each once.")
    return tuple(check_name(name) for name in names)

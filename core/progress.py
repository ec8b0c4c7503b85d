"""What a running job says beyond its stage and fraction: a sentence for the person watching and,
while mode auto tries its whole-model candidates, which one (the same fact, typed).

One path from the engine to the API: the engine makes a `Note`, the job process prints it on its
progress line (`ProgressLine`), the worker stores both columns from it in one call
(`service.jobs.state.progress`: `jobs.progress_note` and `jobs.progress_detail`), and the API reads
them back here (`Job.progress_note`, `Job.candidate`, the job's events)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Self

NOTE_LENGTH = 200  # of `jobs.progress_note`


@dataclass(frozen=True)
class CandidateProgress:
    """Mode auto: the candidate recipe being tried now, `index` of `total` (from 1)."""

    __pydantic_config__: ClassVar[dict[str, Any]] = {
        "json_schema_extra": {"examples": [{"index": 2, "total": 5, "name": "static QDQ u8/s8, per-channel, MinMax"}]}
    }

    index: int
    total: int
    name: str

    @classmethod
    def from_dict(cls, data: Any) -> Self | None:
        """The candidate a stored or printed mapping names; None for anything else."""
        if not isinstance(data, Mapping):
            return None
        try:
            return cls(int(data["index"]), int(data["total"]), str(data["name"]))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Note:
    """What the engine does now ("candidate 2 of 5: ...", "search step 3: ..."); `candidate` is set
    while a whole-model candidate is tried, and a later note without one ends it."""

    text: str
    candidate: CandidateProgress | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", self.text[:NOTE_LENGTH])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Self | None:
        if not isinstance(data, Mapping) or not isinstance(data.get("text"), str):
            return None
        return cls(data["text"], CandidateProgress.from_dict(data.get("candidate")))

    def detail(self) -> dict[str, Any] | None:
        """Its `jobs.progress_detail` column (the text goes to `jobs.progress_note`)."""
        return None if self.candidate is None else {"candidate": asdict(self.candidate)}


def candidate_of(detail: Mapping[str, Any] | None) -> CandidateProgress | None:
    """The candidate a `jobs.progress_detail` value names, if any."""
    return CandidateProgress.from_dict((detail or {}).get("candidate"))


@dataclass(frozen=True)
class ProgressLine:
    """One progress line on the job process's stdout: a stage and the fraction of it done, and on the lines
    where the engine says what it does now, its note. A line without a note leaves the last one standing."""

    stage: str
    fraction: float
    note: Note | None = None

    def line(self) -> str:
        return json.dumps(asdict(self)) + "\n"

    @classmethod
    def parse(cls, line: bytes | str) -> Self:
        """Raises ValueError (json's errors included), KeyError or TypeError on a line that is not one."""
        data = json.loads(line)
        return cls(stage=str(data["stage"]), fraction=float(data["fraction"]), note=Note.from_dict(data.get("note")))

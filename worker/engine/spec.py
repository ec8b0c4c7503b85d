"""How the engine tells its caller what it is doing: progress within a stage, and notes for the person
watching. The engine's typed inputs and its result are the core's (`core.recipe`, `core.evaluation`,
`core.jobfile`, `core.result`)."""

from __future__ import annotations

from collections.abc import Callable

from core.lifecycle import Stage
from core.progress import Note

# (stage, fraction of that stage done in 0..1). Called often; the caller throttles.
ProgressCallback = Callable[[Stage, float], None]


def no_progress(stage: Stage, fraction: float) -> None:
    """A ProgressCallback that ignores everything (engine used on its own)."""


# What the engine does now, for the person watching (mode auto: "candidate 2 of 5: ...", with the
# candidate typed; "search step 3: ..."). Called rarely; each note replaces the one before.
NoteCallback = Callable[[Note], None]


def no_note(note: Note) -> None:
    """A NoteCallback that ignores everything."""

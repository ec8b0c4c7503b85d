"""The worker's cache of mode auto's pre-flight timings, one file per CPU and ONNX Runtime version in
`Settings.preflight_cache_dir`: each auto job gets a read-only copy among its inputs, and the timings it measured
are merged back once it ends (`core.preflight_timings`). The job never writes the cache itself: it runs under a
uid of its own that can write only its folder, and what it leaves there is read as data, never trusted."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
from pathlib import Path

from core.preflight_timings import (
    HANDED_FILE,
    MAX_CACHE_ENTRIES,
    MAX_MEASURED_BYTES,
    MAX_MEASURED_ENTRIES,
    MEASURED_FILE,
    Identity,
    Refused,
    TimingsFile,
    read_timings,
    this_machine,
    write_timings,
)

log = logging.getLogger(__name__)

_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml")


def onnxruntime_version() -> str | None:
    """The installed ONNX Runtime's version, read without importing it (None: not installed)."""
    for name in _DISTRIBUTIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return None


class TimingsKeeper:
    """The cache of this machine (`identity`: None keeps nothing) in `folder`."""

    def __init__(self, folder: Path, identity: Identity | None = None) -> None:
        self.folder = Path(folder)
        if identity is None:
            version = onnxruntime_version()
            identity = this_machine(version) if version else None
        self.identity = identity

    @property
    def path(self) -> Path | None:
        if self.identity is None:
            return None
        digest = hashlib.sha256(self.identity.model_dump_json().encode()).hexdigest()[:16]
        return self.folder / f"preflight-{digest}.json"

    def _read(self) -> TimingsFile:
        path = self.path
        if path is None or not path.is_file():
            return TimingsFile()
        try:
            stored = read_timings(path, max_bytes=1 << 30, max_entries=MAX_CACHE_ENTRIES)
        except Refused as exc:
            log.warning("pre-flight timings cache %s %s; starting it again", path, exc)
            return TimingsFile()
        return stored if stored.identity == self.identity else TimingsFile()

    def hand_in(self, inputs: Path) -> Path | None:
        """A read-only copy of the timings kept so far among a job's inputs (None: none kept yet)."""
        kept = self._read()
        if self.identity is None or not kept.entries:
            return None
        inputs.mkdir(parents=True, exist_ok=True)
        copy = inputs / HANDED_FILE
        write_timings(copy, kept)
        copy.chmod(0o444)
        return copy

    def take_back(self, workdir: Path) -> int:
        """Merge the timings the job in `workdir` measured into the cache; how many were new. A file that is
        not timings of this CPU and ONNX Runtime version is ignored, with a log line. Timings already kept stay
        as they are: a job adds layers, it never changes another job's."""
        try:
            return self._take_back(workdir)
        except Exception:  # a cache: never the reason an attempt goes wrong
            log.exception("pre-flight timings a job left in %s could not be merged", workdir)
            return 0

    def _take_back(self, workdir: Path) -> int:
        measured_path = workdir / MEASURED_FILE
        path = self.path
        if path is None or not os.path.lexists(measured_path):
            return 0
        try:
            measured = read_timings(measured_path, max_bytes=MAX_MEASURED_BYTES, max_entries=MAX_MEASURED_ENTRIES)
        except Refused as exc:
            log.warning("pre-flight timings a job left in %s ignored: the file %s", workdir, exc)
            return 0
        if measured.identity != self.identity:
            log.warning(
                "pre-flight timings a job left in %s ignored: they are for %s, this worker is %s",
                workdir,
                measured.identity.model_dump(),
                self.identity.model_dump() if self.identity else None,
            )
            return 0
        kept = self._read()
        new = {key: timing for key, timing in measured.entries.items() if key not in kept.entries}
        if not new:
            return 0
        entries = {**kept.entries, **new}
        if len(entries) > MAX_CACHE_ENTRIES:
            entries = dict(list(entries.items())[-MAX_CACHE_ENTRIES:])
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_timings(path, TimingsFile(**self.identity.model_dump(), entries=entries))
        except OSError as exc:
            log.warning("pre-flight timings cache %s could not be written: %s", path, exc)
            return 0
        return len(new)

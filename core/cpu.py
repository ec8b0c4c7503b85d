"""The CPU's int8 features as Linux and py-cpuinfo name them, read once per process: the worker advertises its
class from them (`core.placement`) and the engine records them beside every latency it measures."""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

# CPU flags that decide how fast int8 (and bf16) kernels run, as the names are reported by
# Linux / py-cpuinfo. Spelling variants ("avx512vnni") are normalised to these.
INT8_FLAGS = (
    "sse4_1",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",  # ARM NEON
    "asimddp",  # ARM dot product (SDOT/UDOT), the ARM counterpart of VNNI
    "i8mm",  # ARM int8 matrix multiply
)
ARM_FLAGS = frozenset({"asimd", "asimddp", "i8mm"})
_ALIASES = {
    "avx512vnni": "avx512_vnni",
    "avxvnni": "avx_vnni",
    "avx512bf16": "avx512_bf16",
    "neon": "asimd",
    "dotprod": "asimddp",
}
_ARCHITECTURES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def normalise(flags: set[str] | frozenset[str] | list[str] | tuple[str, ...]) -> frozenset[str]:
    """Flags in lower case, spelling variants under the names of INT8_FLAGS."""
    return frozenset(_ALIASES.get(f, f) for f in (x.strip().lower() for x in flags) if f)


def architecture(machine: str | None = None) -> str:
    """`platform.machine()` under one name per architecture: `x86_64` (also AMD64), `aarch64` (also arm64)."""
    name = (platform.machine() if machine is None else machine).strip().lower()
    return _ARCHITECTURES.get(name, name) or "unknown"


def is_arm(machine: str | None = None) -> bool:
    name = architecture(machine)
    return name == "aarch64" or name.startswith("arm")


def read_proc_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str | None, set[str]]:
    """(model name, flags) of the first CPU listed, or (None, empty) where there is no such file."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None, set()
    model: str | None = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "processor", "hardware", "cpu model") and model is None and value.strip():
            # "processor" on x86 is just an index; keep looking for a real name.
            if not value.strip().isdigit():
                model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


@dataclass(frozen=True)
class CpuFacts:
    model: str | None
    flags: frozenset[str]
    source: str  # where they were read: "/proc/cpuinfo", "py-cpuinfo", both, or "none"


@functools.lru_cache(maxsize=1)
def cpu() -> CpuFacts:
    """This machine's CPU. /proc/cpuinfo first: py-cpuinfo starts a Python interpreter of its own to probe,
    and every job runs in a fresh process, so it is only the fallback (other systems, ARM without flags)."""
    model, flags = read_proc_cpuinfo()
    source = "/proc/cpuinfo" if model or flags else "none"
    if not model or not flags:
        try:
            import cpuinfo

            info = cpuinfo.get_cpu_info()
            model = model or info.get("brand_raw") or None
            flags = flags or set(info.get("flags") or ())
            source = "py-cpuinfo" if source == "none" else source + "+py-cpuinfo"
        except Exception:  # any failure of the probe just means fewer facts
            pass
    return CpuFacts(model, normalise(flags), source)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)

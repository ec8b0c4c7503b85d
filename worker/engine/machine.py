"""Facts about the machine that ran a measurement: the CPU features that decide int8 speed, ORT's version."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import onnxruntime as ort
import psutil

from core.result import Machine

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
_ALIASES = {"avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni", "avx512bf16": "avx512_bf16", "neon": "asimd"}


def _normalise(flags: set[str]) -> set[str]:
    return {_ALIASES.get(f, f) for f in (x.lower() for x in flags)}


def _read_proc_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str | None, set[str]]:
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


@functools.lru_cache(maxsize=1)
def _cpu() -> tuple[str | None, frozenset[str], str]:
    """(model name, flags, source). /proc/cpuinfo first: py-cpuinfo starts a Python interpreter of its
    own to probe, and every job runs in a fresh process, so it is only the fallback (other systems, ARM
    without flags)."""
    model, flags = _read_proc_cpuinfo()
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
    return model, frozenset(_normalise(flags)), source


def int8_acceleration(flags: set[str] | frozenset[str]) -> str:
    """One phrase saying what the CPU offers int8 kernels."""
    if {"amx_int8", "amx_tile"} <= flags:
        return "AMX (int8 matrix tiles): int8 is usually much faster than float32"
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return "VNNI (int8 dot products): int8 is usually faster than float32"
    if "asimddp" in flags or "i8mm" in flags:
        return "ARM int8 dot products: int8 is usually faster than float32"
    if "avx512f" in flags or "avx2" in flags:
        return "AVX2/AVX-512 without VNNI: int8 is often no faster, sometimes slower, than float32"
    return "no int8 acceleration found: int8 may be slower than float32"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def int8_kernels(flags: set[str] | frozenset[str] | None = None) -> str:
    """ "vnni" (int8 dot products: VNNI, AMX or ARM dot product), "avx2" (x86 without them, where
    U8S8 products can saturate) or "other"."""
    flags = _cpu()[1] if flags is None else flags
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"}:
        return "vnni"
    if flags & {"avx2", "avx512f"}:
        return "avx2"
    return "other"


def machine_info(threads: int | None = None) -> Machine:
    """What a reader of a latency number needs to know about where it was measured."""
    model, flags, source = _cpu()
    try:
        physical = psutil.cpu_count(logical=False)
    except Exception:
        physical = None
    return Machine(
        cpu_model=model,
        architecture=platform.machine(),
        logical_cores=os.cpu_count(),
        physical_cores=physical,
        cpu_features={flag: flag in flags for flag in INT8_FLAGS if not _irrelevant(flag)},
        int8_acceleration=int8_acceleration(flags),
        memory_bytes=int(psutil.virtual_memory().total),
        os=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        onnxruntime=ort.__version__,
        execution_provider="CPUExecutionProvider",
        threads=threads,
        cpu_info_source=source,
    )


def _irrelevant(flag: str) -> bool:
    """Don't list ARM flags on x86 and vice versa."""
    arm = flag in ("asimd", "asimddp", "i8mm")
    machine = platform.machine().lower()
    is_arm = machine in ("aarch64", "arm64") or machine.startswith("arm")
    return arm != is_arm

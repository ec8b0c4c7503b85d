"""Facts about the machine that ran a measurement: the CPU features that decide int8 speed, ORT's version."""

from __future__ import annotations

import os
import platform

import onnxruntime as ort
import psutil

from core.cpu import ARM_FLAGS, INT8_FLAGS, cpu, is_arm, usable_cores
from core.result import Machine

__all__ = ["int8_acceleration", "int8_kernels", "machine_info", "usable_cores"]


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


def int8_kernels(flags: set[str] | frozenset[str] | None = None) -> str:
    """ "vnni" (int8 dot products: VNNI, AMX or ARM dot product), "avx2" (x86 without them, where
    U8S8 products can saturate) or "other"."""
    flags = cpu().flags if flags is None else flags
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"}:
        return "vnni"
    if flags & {"avx2", "avx512f"}:
        return "avx2"
    return "other"


def machine_info(threads: int | None = None) -> Machine:
    """What a reader of a latency number needs to know about where it was measured."""
    facts = cpu()
    model, flags, source = facts.model, facts.flags, facts.source
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
    return (flag in ARM_FLAGS) != is_arm()

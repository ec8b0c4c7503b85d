"""Worker classes, pools and targets (core/placement.py): the same CPU facts always make the same class name,
every name is one a broker queue can carry, and a job's `target` reads as the names it lists or is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.cpu import normalise, read_proc_cpuinfo
from core.judge import FASTER_MARGIN, ships_quantized
from core.placement import (
    MAX_TARGETS,
    NAME,
    PLACEMENT_VARIABLE,
    Placement,
    TargetError,
    class_features,
    class_name,
    parse_target,
)

X86_SERVER_FLAGS = "fpu sse4_1 avx avx2 fma f16c avx512f avx512bw avx512vnni avx512_bf16"


@pytest.mark.parametrize(
    ("machine", "flags", "expected"),
    [
        ("x86_64", "sse4_1 avx avx2 fma", "x86_64-avx2"),
        ("x86_64", "avx2 avx512f avx512bw", "x86_64-avx512"),
        ("x86_64", "avx2 avx512f", "x86_64-avx2"),  # AVX-512 foundation without BW: no AVX-512 int8 kernels
        ("x86_64", X86_SERVER_FLAGS, "x86_64-avx512vnni"),  # Linux spells it avx512_vnni, py-cpuinfo avx512vnni
        ("x86_64", "avx2 avx_vnni", "x86_64-avxvnni"),
        ("x86_64", X86_SERVER_FLAGS + " amx_tile amx_int8 amx_bf16", "x86_64-amx"),
        ("x86_64", X86_SERVER_FLAGS + " amx_bf16 amx_tile", "x86_64-avx512vnni"),  # AMX without its int8 part
        ("AMD64", "AVX2", "x86_64-avx2"),  # Windows' name for the architecture, flags in upper case
        ("x86_64", "sse4_1", "x86_64"),  # no int8 tier at all: the architecture alone
        ("aarch64", "fp asimd", "aarch64-neon"),
        ("aarch64", "fp asimd asimddp", "aarch64-dotprod"),
        ("arm64", "asimd asimddp i8mm", "aarch64-i8mm"),  # macOS' name for the architecture
        ("aarch64", "avx2", "aarch64"),  # an x86 flag means nothing on ARM
        ("riscv64", "v", "riscv64"),
    ],
)
def test_a_cpu_makes_its_class_from_its_architecture_and_best_int8_instructions(
    machine: str, flags: str, expected: str
) -> None:
    assert class_name(machine, flags.split()) == expected
    assert class_name(machine, reversed(flags.split())) == expected  # the order of the flags does not matter
    assert NAME.fullmatch(expected)


def test_class_names_hold_nothing_a_broker_queue_or_a_file_name_could_trip_on() -> None:
    odd = class_name("i686 (PAE)/32", ["avx2"])
    assert NAME.fullmatch(odd) and "." not in odd and "/" not in odd


def test_the_features_a_worker_advertises_are_the_int8_ones_it_has() -> None:
    assert class_features(X86_SERVER_FLAGS.split()) == ("avx2", "avx512f", "avx512bw", "avx512_vnni")
    assert class_features(["asimd", "asimddp", "i8mm", "crc32"]) == ("asimd", "asimddp", "i8mm")
    assert normalise(["AVX512VNNI", " avxvnni ", "neon", ""]) == {"avx512_vnni", "avx_vnni", "asimd"}


def test_proc_cpuinfo_reads_the_model_and_flags_of_the_first_cpu(tmp_path: Path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: avx2 avx512f avx512_vnni\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: avx2\n"
    )
    assert read_proc_cpuinfo(path) == ("AMD EPYC 9R14", {"avx2", "avx512f", "avx512_vnni"})
    assert read_proc_cpuinfo(path.with_name("missing")) == (None, set())


@pytest.mark.parametrize(
    ("given", "names"),
    [
        (None, ()),
        ("any", ()),
        (["any"], ()),
        ("x86_64-amx", ("x86_64-amx",)),
        (["x86_64-avx2", "edge"], ("x86_64-avx2", "edge")),
    ],
)
def test_a_target_reads_as_the_classes_and_pools_it_lists(given: str | list[str] | None, names: tuple[str]) -> None:
    assert parse_target(given) == names


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ([], "empty list"),
        (["any", "edge"], '"any" cannot be listed'),
        (["edge", "edge"], "twice"),
        ("X86_64-AMX", "lower-case"),
        ("x86_64.amx", "lower-case"),
        ("../queue", "lower-case"),
        ("", "lower-case"),
        ("a" * 64, "at most 63"),
        ([f"pool-{i}" for i in range(MAX_TARGETS + 1)], f"at most {MAX_TARGETS}"),
    ],
)
def test_a_target_that_names_nothing_a_worker_could_be_is_refused(given: str | list[str], words: str) -> None:
    with pytest.raises(TargetError, match=words) as caught:
        parse_target(given)
    assert caught.value.code == "invalid_target" and isinstance(caught.value, ValueError)


def test_a_placement_travels_to_the_job_process_in_one_variable() -> None:
    for placement in (Placement("x86_64-amx", "edge"), Placement("aarch64-i8mm")):
        assert Placement.from_environ(placement.environ()) == placement
    assert Placement.from_environ({}) is None
    assert Placement.from_environ({PLACEMENT_VARIABLE: "Not A/Class"}) is None  # never a name no worker has


@pytest.mark.parametrize(
    ("within", "speedup", "objective", "ships"),
    [
        (True, 1 + FASTER_MARGIN, "latency", True),
        (True, 1 + FASTER_MARGIN / 2, "latency", False),  # faster by less than the noise: float
        (True, 0.7, "latency", False),
        (False, 3.0, "latency", False),  # outside the fidelity budget: never the quantized model
        (None, 3.0, "latency", False),
        (True, 0.7, "size", True),  # the size objective does not ask for speed
        (True, float("nan"), "latency", False),
    ],
)
def test_the_model_to_ship_on_a_class_is_judged_by_budget_and_speed(
    within: bool | None, speedup: float, objective: str, ships: bool
) -> None:
    assert ships_quantized(within, speedup, objective=objective) is ships

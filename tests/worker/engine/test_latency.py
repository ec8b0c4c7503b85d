"""Latency statistics and the interleaved timing loop, with fake runners and a fake clock."""

from __future__ import annotations

import pytest

from worker.engine.latency import TimedRuns, round_order, time_interleaved


class FakeClock:
    """A clock that only moves when a fake runner says it worked."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_stats_of_known_samples() -> None:
    stats = TimedRuns.from_samples([float(v) for v in range(1, 101)])  # 1..100 ms
    assert stats.p50 == pytest.approx(50.5)
    assert stats.p90 == pytest.approx(90.1)
    assert stats.p99 == pytest.approx(99.01)
    assert stats.mean == pytest.approx(50.5)
    assert stats.min == 1.0 and stats.max == 100.0
    assert stats.std == pytest.approx(29.011, abs=1e-3)  # sample std of 1..100
    assert stats.runs == 100
    assert stats.throughput_per_s(4) == pytest.approx(4 * 1000 / 50.5)
    assert set(stats.latency_ms().model_dump()) == {"p50", "p90", "p99", "mean", "std", "min", "max"}
    one = TimedRuns.from_samples([2.0])
    assert one.std == 0.0 and one.p99 == 2.0
    with pytest.raises(ValueError):
        TimedRuns.from_samples([])


def test_rounds_alternate_their_order() -> None:
    assert round_order(0, 2) == [0, 1]
    assert round_order(1, 2) == [1, 0]
    assert round_order(2, 3) == [0, 1, 2]
    assert round_order(3, 3) == [2, 1, 0]


def test_runs_are_interleaved_and_warmup_is_not_timed() -> None:
    clock = FakeClock()
    calls: list[str] = []

    def runner(name: str, cost_s: float):  # type: ignore[no-untyped-def]
        def run() -> None:
            calls.append(name)
            clock.now += cost_s

        return run

    timings = time_interleaved([runner("A", 0.001), runner("B", 0.003)], runs=4, warmup_runs=2, clock=clock)
    # Warm-up A B, B A; then the timed rounds continue the alternation.
    assert calls == ["A", "B", "B", "A", "A", "B", "B", "A", "A", "B", "B", "A"]
    assert timings.order == [0, 1, 1, 0, 0, 1, 1, 0]
    assert timings.warmup_rounds == 2
    assert timings.rounds_done == 4 and not timings.stopped_early
    assert timings.samples_ms[0] == pytest.approx([1.0] * 4)
    assert timings.samples_ms[1] == pytest.approx([3.0] * 4)
    a, b = timings.stats()
    assert a.p50 == pytest.approx(1.0) and b.p50 == pytest.approx(3.0)


def test_deadline_stops_timing_early_but_keeps_at_least_one_round() -> None:
    clock = FakeClock()

    def run() -> None:
        clock.now += 0.1

    # Each round takes 0.2 s; the deadline allows 1 s: 5 rounds, never past the deadline.
    timings = time_interleaved([run, run], runs=1000, warmup_runs=0, deadline=1.0, clock=clock)
    assert timings.stopped_early
    assert timings.rounds_done == 5
    assert clock.now <= 1.0 + 1e-9

    # Already past the deadline: warm-up is skipped, one timed round is still done.
    late = FakeClock()
    late.now = 5.0

    def run_late() -> None:
        late.now += 0.1

    timings = time_interleaved([run_late, run_late], runs=10, warmup_runs=3, deadline=1.0, clock=late)
    assert timings.warmup_rounds == 0
    assert timings.rounds_done == 1
    assert timings.stopped_early


def test_on_round_reports_progress() -> None:
    seen: list[int] = []
    time_interleaved([lambda: None], runs=3, on_round=seen.append)
    assert seen == [1, 2, 3]

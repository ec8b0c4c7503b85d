"""Latency measurement: warm-up, then timed runs of several models interleaved, and their statistics.

Interleaving: round r runs the models in order 0, 1, ..., n-1 when r is even and in reverse
when r is odd (A B, B A, A B, ...), so slow drift of the machine (other jobs, frequency
scaling, caches) hits every model alike and no model always runs right after another.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from core.result import LatencyStats

Clock = Callable[[], float]  # seconds, monotonic


@dataclass(frozen=True)
class TimedRuns:
    """Statistics of one model's timed runs, in milliseconds."""

    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    max: float
    runs: int

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> TimedRuns:
        if not samples_ms:
            raise ValueError("no timed runs")
        arr = np.asarray(samples_ms, dtype=np.float64)
        p50, p90, p99 = np.percentile(arr, [50, 90, 99])
        return cls(
            p50=float(p50),
            p90=float(p90),
            p99=float(p99),
            mean=float(arr.mean()),
            # Sample standard deviation: the runs are a sample of what the model would do.
            std=float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            min=float(arr.min()),
            max=float(arr.max()),
            runs=int(arr.size),
        )

    def latency_ms(self) -> LatencyStats:
        """The result's `latency_ms`."""
        return LatencyStats(
            p50=self.p50, p90=self.p90, p99=self.p99, mean=self.mean, std=self.std, min=self.min, max=self.max
        )

    def throughput_per_s(self, batch_size: int) -> float:
        return batch_size * 1000.0 / self.mean if self.mean > 0 else 0.0


@dataclass
class InterleavedTimings:
    samples_ms: list[list[float]]  # one list per runner, in run order
    warmup_rounds: int
    rounds_requested: int
    stopped_early: bool  # the deadline cut the timed rounds short
    order: list[int] = field(default_factory=list)  # runner index of every timed run, in call order

    @property
    def rounds_done(self) -> int:
        return min((len(s) for s in self.samples_ms), default=0)

    def stats(self) -> list[TimedRuns]:
        return [TimedRuns.from_samples(s) for s in self.samples_ms]


def round_order(round_index: int, count: int) -> list[int]:
    """Runner indices for one round: forward on even rounds, reversed on odd ones."""
    order = list(range(count))
    return order if round_index % 2 == 0 else order[::-1]


def time_interleaved(
    runners: Sequence[Callable[[], object]],
    *,
    runs: int,
    warmup_runs: int = 0,
    deadline: float | None = None,
    clock: Clock = time.perf_counter,
    min_runs: int = 1,
    on_round: Callable[[int], None] | None = None,
) -> InterleavedTimings:
    """Run every runner `warmup_runs` times untimed, then `runs` timed times, interleaved.

    `deadline` is a `clock()` value: no round starts once the clock has passed it, nor when
    the previous round's duration says this one would end past it. At least `min_runs` timed
    rounds are always done, so that there are numbers to report. `on_round(rounds_done)` is
    called after each timed round (for progress)."""
    n = len(runners)
    samples: list[list[float]] = [[] for _ in range(n)]
    order_log: list[int] = []

    def out_of_time(last_round_s: float) -> bool:
        return deadline is not None and clock() + last_round_s > deadline

    warmup_done = 0
    last = 0.0
    for r in range(warmup_runs):
        if out_of_time(last):
            break
        start = clock()
        for i in round_order(r, n):
            runners[i]()
        last = clock() - start
        warmup_done += 1

    stopped_early = False
    last = 0.0
    for r in range(max(runs, min_runs)):
        if r >= min_runs and out_of_time(last):
            stopped_early = True
            break
        round_start = clock()
        # Continue the alternation where the warm-up left it.
        for i in round_order(warmup_done + r, n):
            t0 = clock()
            runners[i]()
            samples[i].append((clock() - t0) * 1000.0)
            order_log.append(i)
        last = clock() - round_start
        if on_round is not None:
            on_round(r + 1)
    return InterleavedTimings(
        samples_ms=samples,
        warmup_rounds=warmup_done,
        rounds_requested=runs,
        stopped_early=stopped_early,
        order=order_log,
    )

"""The measurements of a succeeded job on the other classes and pools its target lists
(service/jobs/measurements.py), on both databases: the entries made when it succeeds, each asked for once,
again only once its message may be lost, given up after the last request, and recorded once as it arrives,
while the rest of the stored result stays as the worker stored it."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from core.errors import ErrorInfo
from core.result import (
    AutoSearch,
    Comparison,
    FidelityVerdict,
    JobResult,
    LatencyStats,
    Machine,
    MeasuredOn,
    ModelMetrics,
    QuantizationFacts,
)
from service.database import transaction, utcnow
from service.jobs import measurements
from service.jobs.measurements import Due
from service.queue import class_queue, pool_queue
from service.tables import Job
from tests.service.test_job_state import _job

Factory = sessionmaker[Session]
AVX2, AMX = "x86_64-avx2", "x86_64-amx"


def metrics(p50: float) -> ModelMetrics:
    stats = LatencyStats(p50=p50, p90=p50, p99=p50, mean=p50, std=0, min=p50, max=p50)
    return ModelMetrics(size_bytes=1000, latency_ms=stats)


def result(speedup: float = 2.0, *, within: bool = True, auto: str | None = None) -> JobResult:
    verdict = FidelityVerdict(within_budget=within, metric="cosine", fidelity=0.999, accuracy_tolerance=0.01)
    return JobResult(
        original=metrics(2.0),
        quantized=metrics(2.0 / speedup),
        comparison=Comparison(speedup_p50=speedup, fidelity=verdict),
        machine=Machine(worker_class=AVX2, cpu_model="cpu"),
        quantization=None if auto is None else QuantizationFacts(auto=AutoSearch(chosen="x", verdict=auto)),
    )


def succeeded(factory: Factory, stored: JobResult, target: list[str], queues: list[str]) -> str:
    """A job that succeeded with `stored`, as the runner records it, with a target of several."""
    job_id = _job(factory)
    with transaction(factory) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status="succeeded",
                result={**stored.model_dump(mode="json"), "from_a_newer_engine": {"kept": True}},
                finished_at=utcnow(),
                target=target,
                queues=queues,
                measurements_pending=True,
            )
        )
    return job_id


def ask(factory: Factory, job_id: str, resend_after_s: float | None = None, most: int = 3) -> list[Due]:
    with transaction(factory) as s:
        return measurements.ask(s, job_id, resend_after_s=resend_after_s, max_requests=most)


def row(factory: Factory, job_id: str) -> Job:
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def entries(factory: Factory, job_id: str) -> list[MeasuredOn]:
    stored = row(factory, job_id).result
    assert stored is not None and stored["from_a_newer_engine"] == {"kept": True}  # nothing else is rewritten
    return JobResult.from_stored(stored).measured_on


def test_a_succeeded_job_is_measured_where_it_ran_and_asks_once_for_each_other_target(
    session_factory: Factory,
) -> None:
    job_id = succeeded(
        session_factory, result(2.0), [AVX2, AMX, "edge"], [class_queue(AVX2), class_queue(AMX), pool_queue("edge")]
    )
    assert ask(session_factory, job_id) == [
        Due(job_id, AMX, class_queue(AMX)),
        Due(job_id, "edge", pool_queue("edge")),
    ]
    ran, amx, edge = entries(session_factory, job_id)
    assert (ran.target, ran.status, ran.worker_class, ran.speedup_p50, ran.chosen) == (
        AVX2,
        "measured",
        AVX2,
        2.0,
        "quantized",
    )
    assert ran.within_budget is True and ran.original is not None and ran.measured_at is not None
    assert (amx.status, amx.requests, edge.requests) == ("pending", 1, 1) and amx.requested_at is not None
    assert ask(session_factory, job_id) == []  # asked already: the worker that ran it and a sweep agree
    assert ask(session_factory, job_id, resend_after_s=600) == []  # not long enough ago
    assert row(session_factory, job_id).measurements_pending


def test_a_measurement_lost_on_the_way_is_asked_for_again_then_given_up(session_factory: Factory) -> None:
    job_id = succeeded(session_factory, result(), [AVX2, AMX], [class_queue(AVX2), class_queue(AMX)])
    assert len(ask(session_factory, job_id, most=2)) == 1

    def age() -> None:
        stored = row(session_factory, job_id).result
        assert stored is not None
        old = (utcnow() - timedelta(seconds=601)).isoformat()
        with transaction(session_factory) as s:
            moved = [{**e, "requested_at": old} if e["status"] == "pending" else e for e in stored["measured_on"]]
            s.execute(update(Job).where(Job.id == job_id).values(result={**stored, "measured_on": moved}))

    age()
    assert ask(session_factory, job_id, resend_after_s=600, most=2) == [Due(job_id, AMX, class_queue(AMX))]
    age()
    assert ask(session_factory, job_id, resend_after_s=600, most=2) == []
    _, amx = entries(session_factory, job_id)
    assert amx.status == "failed" and amx.error is not None and amx.error.code == "timeout"
    assert "asked 2 times" in amx.error.message
    assert not row(session_factory, job_id).measurements_pending
    with session_factory() as s:
        assert measurements.jobs_waiting(s) == []


def test_a_measurement_is_recorded_once_and_the_job_stops_waiting_after_the_last(session_factory: Factory) -> None:
    job_id = succeeded(
        session_factory, result(), [AVX2, AMX, "edge"], [class_queue(AVX2), class_queue(AMX), pool_queue("edge")]
    )
    ask(session_factory, job_id)
    with session_factory() as s:
        assert measurements.jobs_waiting(s) == [job_id]
        assert measurements.is_pending(s, job_id, AMX) and not measurements.is_pending(s, job_id, AVX2)
    on_amx = MeasuredOn.measured(
        AMX, Machine(worker_class=AMX), metrics(2.0), metrics(0.5), result(4.0).comparison, objective="latency"
    )
    with transaction(session_factory) as s:
        assert measurements.record(s, job_id, on_amx)
    with transaction(session_factory) as s:
        assert not measurements.record(s, job_id, on_amx)  # a duplicate message's measurement
    _, amx, edge = entries(session_factory, job_id)
    assert (amx.status, amx.speedup_p50, amx.chosen, amx.requests) == ("measured", 4.0, "quantized", 1)
    assert edge.status == "pending" and row(session_factory, job_id).measurements_pending
    broken = MeasuredOn.failed("edge", ErrorInfo("evaluation_failed", "It broke.", {}))
    with transaction(session_factory) as s:
        assert measurements.record(s, job_id, broken)
    assert [e.status for e in entries(session_factory, job_id)] == ["measured", "measured", "failed"]
    assert not row(session_factory, job_id).measurements_pending
    with session_factory() as s:
        assert not measurements.is_pending(s, job_id, "edge")


def test_where_the_job_ran_mode_autos_verdict_chooses_elsewhere_speed_and_budget_do(session_factory: Factory) -> None:
    # Auto kept float where it ran, whatever the final evaluation's speedup says; a plain job whose quantized
    # model is no faster beyond noise, or outside the budget, ships float there.
    for stored, chosen in (
        (result(1.5, auto="keep_float"), "float"),
        (result(1.01, auto="quantized"), "quantized"),
        (result(1.01), "float"),
        (result(3.0, within=False), "float"),
    ):
        job_id = succeeded(session_factory, stored, [AVX2, AMX], [class_queue(AVX2), class_queue(AMX)])
        ask(session_factory, job_id)
        assert entries(session_factory, job_id)[0].chosen == chosen


def test_a_job_that_did_not_succeed_is_never_measured(session_factory: Factory) -> None:
    job_id = succeeded(session_factory, result(), [AVX2, AMX], [class_queue(AVX2), class_queue(AMX)])
    with transaction(session_factory) as s:
        s.execute(update(Job).where(Job.id == job_id).values(status="failed"))
    assert ask(session_factory, job_id) == []
    with session_factory() as s:
        assert measurements.jobs_waiting(s) == [] and not measurements.is_pending(s, job_id, AMX)

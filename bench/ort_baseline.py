"""The baseline: a plain Python script doing the job's work directly with ONNX Runtime, in one process.

    python -m bench.ort_baseline MODEL DATA.npz WORKDIR [--preprocess] [--evaluate]
                                 [--latency-runs N] [--warmup-runs M]

It does what a user following ONNX Runtime's documentation would write: (optionally
`quant_pre_process`), `quantize_static` with a CalibrationDataReader over every sample,
CalibrationMethod.Percentile, per_channel=True, QDQ; then, with `--evaluate`, the evaluation the
service does: both models in sessions with the same options, fidelity (cosine, SQNR) over every
sample, then warm-up and interleaved timed runs of both models on the first sample. Prints one JSON
line: wall times of the steps and the process's peak RSS (ru_maxrss).

Deliberately imports only numpy, onnx and onnxruntime (the benchmark times it from spawn to exit)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

T0 = time.perf_counter()

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnxruntime.quantization import (  # noqa: E402
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: E402


class NpzReader(CalibrationDataReader):
    """Every sample of `input` [N, ...] fed as is, one sample per `get_next`."""

    def __init__(self, path: Path) -> None:
        self.data = np.load(path)
        self.names = [k for k in self.data.files if k != "__labels__"]
        self.count = int(self.data[self.names[0]].shape[0])
        self.arrays = {k: self.data[k] for k in self.names}
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= self.count:
            return None
        feed = {k: a[self.i] for k, a in self.arrays.items()}
        self.i += 1
        return feed

    def rewind(self) -> None:
        self.i = 0


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def evaluate(original: Path, quantized: Path, data: NpzReader, latency_runs: int, warmup_runs: int) -> dict:
    sessions = [session(original), session(quantized)]
    names = [o.name for o in sessions[0].get_outputs()]
    sums = {n: np.zeros(4) for n in names}  # xx, yy, xy, ee
    data.rewind()
    first = None
    while (feed := data.get_next()) is not None:
        first = first or feed
        a, b = (s.run(names, feed) for s in sessions)
        for n, x, y in zip(names, a, b, strict=True):
            x = x.astype(np.float64).ravel()
            y = y.astype(np.float64).ravel()
            sums[n] += (x @ x, y @ y, x @ y, (x - y) @ (x - y))
    fidelity = {}
    for n, (xx, yy, xy, ee) in sums.items():
        fidelity[n] = {
            "cosine": float(xy / np.sqrt(xx * yy)) if xx and yy else None,
            "sqnr_db": float(10 * np.log10(xx / ee)) if ee else None,
        }
    times: list[list[float]] = [[], []]
    for r in range(warmup_runs + latency_runs):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            t = time.perf_counter()
            sessions[i].run(names, first)
            if r >= warmup_runs:
                times[i].append((time.perf_counter() - t) * 1000)
    p50 = [float(np.percentile(t, 50)) for t in times]
    return {
        "fidelity": fidelity,
        "latency_p50_ms": {"original": p50[0], "quantized": p50[1]},
        "speedup_p50": p50[0] / p50[1] if p50[1] else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--preprocess", action="store_true")
    ap.add_argument("--evaluate", action="store_true")
    ap.add_argument("--latency-runs", type=int, default=50)
    ap.add_argument("--warmup-runs", type=int, default=5)
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    out: dict = {"imports_s": time.perf_counter() - T0}
    model = args.model
    t = time.perf_counter()
    if args.preprocess:
        pre = args.workdir / "preprocessed.onnx"
        quant_pre_process(str(model), str(pre))
        model = pre
    out["preprocess_s"] = time.perf_counter() - t
    t = time.perf_counter()
    reader = NpzReader(args.data)
    quantized = args.workdir / "quantized.onnx"
    quantize_static(
        str(model),
        str(quantized),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.Percentile,
    )
    out["quantize_s"] = time.perf_counter() - t
    out["samples"] = reader.count
    if args.evaluate:
        t = time.perf_counter()
        out["evaluation"] = evaluate(args.model, quantized, reader, args.latency_runs, args.warmup_runs)
        out["evaluate_s"] = time.perf_counter() - t
    out["total_s"] = time.perf_counter() - T0
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

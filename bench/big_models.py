"""big_model_peak_ratio: peak resident memory of a whole job (validate, pre-process, quantize, verify,
evaluate) per mode on a generated external-data model of about 2 GB, as a ratio to the model's size.

Each job runs the way a worker's child runs it (`python -m worker.job_process WORKDIR` on a job file) in
its own process; its peak is the child's own ru_maxrss (`os.wait4`), the largest RSS sampled with psutil
while it runs, and the job's own `peak_memory_bytes`, whichever is largest. The model (a few Conv layers,
then a stack of 4096x4096 MatMul/Gemm layers with random weights) is written tensor by tensor into one
external data file, so the generator never holds more than one layer. `QAAS_BENCH_BIG_MODEL_MB` sets the
size (default 2048; `--quick` 256); mode auto searches it with max_search_seconds 300. A second model of half
that size is one Gather embedding and a small head (`embedding_static`, `embedding_dynamic`; skipped with
`QAAS_BENCH_BIG_MODEL_EMBEDDING=0`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import psutil
from onnx import TensorProto, helper

from bench import harness
from bench.common import MB, ROOT, Context
from bench.results import Measurement

TARGET_RATIO = 2.0
HIDDEN = 4096
CONV_CHANNELS = 64
SIDE = 8  # the Conv stack's feature map is CONV_CHANNELS x SIDE x SIDE = HIDDEN values
ALIGN = 4096  # external data offsets on page boundaries: ONNX Runtime can map them
CALIBRATION_SAMPLES = 4
MODES: dict[str, dict[str, Any]] = {
    "static": {"mode": "static"},
    "dynamic": {"mode": "dynamic"},
    "weight_only_int4": {"mode": "weight_only", "weight_type": "int4"},
    "fp16": {"mode": "fp16"},
    # The search on the same model: every candidate, timed one session at a time (issue #24).
    "auto": {"mode": "auto", "max_search_seconds": 300},
}
# A model dominated by one tensor (a Gather embedding of about half the size asked for, then a small head):
# the modes where ORT's quantizer reads a whole weight at once.
EMBEDDING_MODES = ("static", "dynamic")
EMBEDDING_DIM = 1024
TOKENS = 16
EVALUATION = {"latency_runs": 3, "warmup_runs": 1, "threads": 1}


class _Writer:
    """Appends tensors to one external data file and returns their TensorProtos (references only)."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.file = data.open("wb")

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        pad = -self.file.tell() % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
        offset = self.file.tell()
        raw = np.ascontiguousarray(array)
        raw.tofile(self.file)
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(raw.dtype)
        tensor.dims.extend(raw.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data.name), ("offset", str(offset)), ("length", str(raw.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def close(self) -> None:
        self.file.close()


def big_model(path: Path, total_bytes: int, *, seed: int = 0) -> Path:
    """Write `path` and `path.data` (about `total_bytes` of float32 weights): input `x` [1, 64, 8, 8],
    three Conv+Relu, Flatten, then MatMul+Add+Relu layers (every third a Gemm) of HIDDEN x HIDDEN,
    and a last MatMul to 16 outputs `y`."""
    rng = np.random.default_rng(seed)
    layers = max(2, round(total_bytes / (HIDDEN * HIDDEN * 4)))
    writer = _Writer(path.with_name(path.name + ".data"))
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    prev = "x"
    try:
        for i in range(3):
            fan_in = CONV_CHANNELS * 9
            w = rng.normal(0.0, np.sqrt(2.0 / fan_in), (CONV_CHANNELS, CONV_CHANNELS, 3, 3)).astype(np.float32)
            inits += [writer.add(f"conv{i}.w", w), writer.add(f"conv{i}.b", np.zeros(CONV_CHANNELS, np.float32))]
            nodes.append(helper.make_node("Conv", [prev, f"conv{i}.w", f"conv{i}.b"], [f"conv{i}"], pads=[1] * 4))
            nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"conv{i}.relu"]))
            prev = f"conv{i}.relu"
        nodes.append(helper.make_node("Flatten", [prev], ["flat"], axis=1))
        prev = "flat"
        for i in range(layers):
            w = rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32)
            w *= np.float32(np.sqrt(2.0 / HIDDEN))
            b = rng.normal(0.0, 0.01, HIDDEN).astype(np.float32)
            inits += [writer.add(f"fc{i}.w", w), writer.add(f"fc{i}.b", b)]
            del w
            if i % 3 == 2:
                nodes.append(helper.make_node("Gemm", [prev, f"fc{i}.w", f"fc{i}.b"], [f"fc{i}"]))
            else:
                nodes.append(helper.make_node("MatMul", [prev, f"fc{i}.w"], [f"fc{i}.mm"]))
                nodes.append(helper.make_node("Add", [f"fc{i}.mm", f"fc{i}.b"], [f"fc{i}"]))
            nodes.append(helper.make_node("Relu", [f"fc{i}"], [f"fc{i}.relu"]))
            prev = f"fc{i}.relu"
        head = rng.normal(0.0, np.sqrt(1.0 / HIDDEN), (HIDDEN, 16)).astype(np.float32)
        inits.append(writer.add("head.w", head))
        nodes.append(helper.make_node("MatMul", [prev, "head.w"], ["y"]))
    finally:
        writer.close()
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CONV_CHANNELS, SIDE, SIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def embedding_model(path: Path, total_bytes: int, *, seed: int = 0) -> Path:
    """Write `path` and `path.data`: input `ids` [1, TOKENS] int64, a Gather from an embedding of about
    `total_bytes` [vocab, EMBEDDING_DIM], then MatMul+Relu (EMBEDDING_DIM square) and a MatMul to 16 outputs `y`."""
    rng = np.random.default_rng(seed)
    vocab = max(TOKENS, total_bytes // (EMBEDDING_DIM * 4))
    writer = _Writer(path.with_name(path.name + ".data"))
    try:
        # Written in slices of rows, so the generator holds one slice at a time.
        offset = writer.file.tell()
        rows = max(1, (64 << 20) // (EMBEDDING_DIM * 4))
        for start in range(0, vocab, rows):
            n = min(rows, vocab - start)
            rng.normal(0.0, 0.5, (n, EMBEDDING_DIM)).astype(np.float32).tofile(writer.file)
        emb = TensorProto()
        emb.name, emb.data_type = "emb", TensorProto.FLOAT
        emb.dims.extend([vocab, EMBEDDING_DIM])
        emb.data_location = TensorProto.EXTERNAL
        length = vocab * EMBEDDING_DIM * 4
        for key, value in (("location", writer.data.name), ("offset", str(offset)), ("length", str(length))):
            entry = emb.external_data.add()
            entry.key, entry.value = key, value
        fc = rng.normal(0.0, np.sqrt(2.0 / EMBEDDING_DIM), (EMBEDDING_DIM, EMBEDDING_DIM)).astype(np.float32)
        head = rng.normal(0.0, np.sqrt(1.0 / EMBEDDING_DIM), (EMBEDDING_DIM, 16)).astype(np.float32)
        inits = [emb, writer.add("fc.w", fc), writer.add("head.w", head)]
    finally:
        writer.close()
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], axis=0),
        helper.make_node("MatMul", ["e", "fc.w"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("MatMul", ["hr", "head.w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, TOKENS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, TOKENS, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def embedding_calibration(path: Path, vocab: int, samples: int = CALIBRATION_SAMPLES) -> Path:
    ids = np.random.default_rng(1).integers(0, vocab, (samples, 1, TOKENS), dtype=np.int64)
    np.savez(path, ids=ids)
    return path


def model_bytes(path: Path) -> int:
    return path.stat().st_size + path.with_name(path.name + ".data").stat().st_size


def calibration(path: Path, samples: int = CALIBRATION_SAMPLES) -> Path:
    x = np.random.default_rng(1).random((samples, 1, CONV_CHANNELS, SIDE, SIDE), dtype=np.float32)
    np.savez(path, x=x)
    return path


def _job_file(model: Path, data: Path, recipe: dict[str, Any], job_id: str) -> Any:
    from core.evaluation import EvaluationSpec
    from core.jobfile import DatasetSource, JobFile, Limits
    from core.model import graph_inputs
    from core.recipe import Recipe

    source = DatasetSource(data, "npz")
    return JobFile(
        job_id,
        model,
        tuple(graph_inputs(onnx.load(str(model), load_external_data=False))),
        Recipe(**recipe),
        EvaluationSpec(**EVALUATION),
        Limits(),
        source,
        source,
        True,
    )


def run_one(model: Path, data: Path, recipe: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """One job in `python -m worker.job_process`; its peak RSS three ways and its outcome."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    _job_file(model, data, recipe, workdir.name).write(workdir)
    log = (workdir / "child.log").open("w")
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.job_process", str(workdir)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
    )
    ps = psutil.Process(proc.pid)
    with harness.Sampler(lambda: {"rss": float(harness.rss(ps))}, interval=0.05) as sampler:
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    wall = time.perf_counter() - t
    outcome = json.loads((workdir / "outcome.json").read_text()) if (workdir / "outcome.json").exists() else {}
    result = outcome.get("result") or {}
    reported = int(result.get("peak_memory_bytes") or 0)
    peak = max(int(usage.ru_maxrss) * 1024, int(sampler.peak.get("rss", 0)), reported)
    return {
        "status": outcome.get("status", f"exit {proc.returncode}"),
        "error": outcome.get("error"),
        "peak_bytes": peak,
        "ru_maxrss_bytes": int(usage.ru_maxrss) * 1024,
        "sampled_peak_bytes": int(sampler.peak.get("rss", 0)),
        "reported_peak_bytes": reported,
        "wall_s": round(wall, 1),
        "timings_s": result.get("timings_s"),
        "log_tail": (workdir / "child.log").read_text()[-1500:] if proc.returncode else "",
    }


def run(ctx: Context) -> dict[str, Measurement]:
    size_mb = int(os.environ.get("QAAS_BENCH_BIG_MODEL_MB", "256" if ctx.quick else "2048"))
    only = [m for m in os.environ.get("QAAS_BENCH_BIG_MODEL_MODES", "").split(",") if m] or list(MODES)
    work = ctx.dir("big_models")
    model = big_model(work / "big.onnx", size_mb * MB)
    data = calibration(work / "calib.npz")
    size = model_bytes(model)
    ctx.log(f"  model: {size / MB:.0f} MB ({model.with_name('big.onnx.data').stat().st_size / MB:.0f} MB external)")
    ratios: dict[str, float | None] = {}
    details: dict[str, Any] = {"model_bytes": size, "hidden": HIDDEN, "evaluation": EVALUATION, "modes": {}}
    errors: list[str] = []
    jobs = [(name, model, data, MODES[name], size) for name in only]
    try:
        if os.environ.get("QAAS_BENCH_BIG_MODEL_EMBEDDING", "1") != "0":
            emb = embedding_model(work / "emb.onnx", size_mb * MB // 2)
            vocab = int(onnx.load(str(emb), load_external_data=False).graph.initializer[0].dims[0])
            emb_data = embedding_calibration(work / "emb_calib.npz", vocab)
            emb_size = model_bytes(emb)
            details["embedding_model_bytes"] = emb_size
            ctx.log(f"  embedding model: {emb_size / MB:.0f} MB, one Gather of {vocab} x {EMBEDDING_DIM}")
            jobs += [(f"embedding_{m}", emb, emb_data, MODES[m], emb_size) for m in EMBEDDING_MODES if m in only]
        for name, path, source, recipe, nbytes in jobs:
            r = run_one(path, source, recipe, work / f"job-{name}")
            shutil.rmtree(work / f"job-{name}", ignore_errors=True)
            details["modes"][name] = r
            if r["status"] != "succeeded":
                ratios[name] = None
                errors.append(f"{name}: {r['status']} {r['error'] or r['log_tail']}")
                ctx.log(f"  {name}: FAILED {r['error'] or r['log_tail']}")
                continue
            ratios[name] = round(r["peak_bytes"] / nbytes, 2)
            ctx.log(
                f"  {name}: peak {r['peak_bytes'] / MB:.0f} MB = {ratios[name]}x the model "
                f"(ru_maxrss {r['ru_maxrss_bytes'] / MB:.0f}, sampled {r['sampled_peak_bytes'] / MB:.0f}; "
                f"{r['wall_s']} s; {r['timings_s']})"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    values = [v for v in ratios.values() if v is not None]
    figure = Measurement(
        what=f"Peak RSS of a job / model size, per mode ({size / MB:,.0f} MB external-data model)",
        unit="x",
        value=ratios,
        target=f"≤ {TARGET_RATIO}x in every mode",
        met=None if len(values) != len(jobs) else max(values) <= TARGET_RATIO,
        errors=errors,
        details=details,
    )
    return {"big_model_peak_ratio": figure}

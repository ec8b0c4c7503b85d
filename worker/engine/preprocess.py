"""Model pre-processing before quantization, each step recorded as a sentence.

Steps (each optional): copy the model into the work folder with its external data gathered in one
file, fold `Constant` nodes into initializers, upgrade the opset, then ONNX Runtime's
`quant_pre_process` (symbolic shape inference, graph optimisation, ONNX shape inference) with
fallbacks: without symbolic shape inference, then plain ONNX shape inference, then nothing.
Models with external data (or too large for one protobuf) keep external data at every step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
import warnings as pywarnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from core.errors import RuleError
from core.model import default_opset, external_locations, iter_graphs
from worker.engine import streaming
from worker.engine.graph_order import sort_model_file

# Above this a model cannot be one protobuf (2 GB limit); keep a margin.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass
class Prepared:
    path: Path
    external: bool  # the file at `path` keeps its tensors in external data beside it
    opset: int
    steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    fused_ops: dict[str, int] = field(default_factory=dict)  # transformer fusion: what it fused
    # The graph was prepared without loading its weights (worker/engine/streaming.py): the modes quantize it
    # tensor by tensor too.
    streamed: bool = False


def fuse_transformer(prepared: Prepared, workdir: Path) -> Prepared:
    """ONNX Runtime's transformer graph fusions (model type bert: Attention, SkipLayerNormalization,
    Gelu, ...) on the prepared model, in place of it; `fused_ops` says what was fused (empty: the
    fusions found nothing to do here)."""
    from onnxruntime.transformers.optimizer import optimize_model

    logger = logging.getLogger("onnxruntime.transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)  # it logs every pattern it looks for
    try:
        optimized = optimize_model(str(prepared.path), model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
        fused = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
        out = workdir / "fused.onnx"
        optimized.save_model_to_file(str(out), use_external_data_format=prepared.external)
    except Exception as exc:
        raise RuleError(
            "quantization_failed",
            f"ONNX Runtime's transformer fusion failed: {_first_line(exc)}",
            {"step": "transformer_fusion"},
        ) from exc
    finally:
        logger.setLevel(level)
    prepared.path = out
    prepared.fused_ops = fused
    listed = ", ".join(f"{n} {op}" for op, n in sorted(fused.items())) or "nothing to fuse"
    prepared.steps.append(f"Transformer fusion (ONNX Runtime, model type bert): {listed}.")
    return prepared


def save_model(model: onnx.ModelProto, path: Path, *, external: bool) -> None:
    """Save, with every tensor larger than 1 KB in `<name>.data` beside it when `external`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        data = path.with_name(path.name + ".data")
        if data.exists():
            data.unlink()
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
            convert_attribute=False,
        )
    else:
        onnx.save_model(model, str(path))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:300]


# --------------------------------------------------------------------------------------------
# Steps


def fold_constants(model: onnx.ModelProto) -> int:
    """Turn `Constant` nodes (in every graph) into initializers of the graph they live in.
    Returns how many were folded. Constants with sparse values are left alone."""
    folded = 0
    for graph in iter_graphs(model.graph):
        keep = []
        new_inits = []
        for node in graph.node:
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
                keep.append(node)
                continue
            tensor = _constant_value(node)
            if tensor is None:
                keep.append(node)
                continue
            tensor.name = node.output[0]
            new_inits.append(tensor)
            folded += 1
        if new_inits:
            del graph.node[:]
            graph.node.extend(keep)
            graph.initializer.extend(new_inits)
    return folded


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(attr.t)
            return t
        if attr.name == "value_float":
            return numpy_helper.from_array(np.array(attr.f, dtype=np.float32))
        if attr.name == "value_floats":
            return numpy_helper.from_array(np.array(list(attr.floats), dtype=np.float32))
        if attr.name == "value_int":
            return numpy_helper.from_array(np.array(attr.i, dtype=np.int64))
        if attr.name == "value_ints":
            return numpy_helper.from_array(np.array(list(attr.ints), dtype=np.int64))
    return None  # sparse_value, value_string(s): leave as nodes


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    from onnx import version_converter

    converted = version_converter.convert_version(model, target)
    min_ir = helper.find_min_ir_version_for([helper.make_opsetid("", target)])
    if converted.ir_version < min_ir:
        converted.ir_version = min_ir
    return converted


class _CaptureErrors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _quant_pre_process(src: Path, dst: Path, *, skip_symbolic: bool, optimize: bool, external: bool) -> list[str]:
    """ORT's quant_pre_process; returns the errors it only logged (a failed optimisation)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    handler = _CaptureErrors()
    logger = logging.getLogger("onnxruntime.quantization.shape_inference")
    logger.addHandler(handler)
    src, dst = Path(src).resolve(), Path(dst).resolve()
    try:
        # Symbolic shape inference writes sym_shape_infer_temp.onnx (and its data) into the current
        # directory when it fails: keep that inside the work folder.
        with pywarnings.catch_warnings(), contextlib.chdir(dst.parent):
            pywarnings.simplefilter("ignore")
            quant_pre_process(
                str(src),
                str(dst),
                skip_optimization=not optimize,
                skip_symbolic_shape=skip_symbolic,
                auto_merge=True,
                save_as_external_data=external,
                all_tensors_to_one_file=True,
                external_data_location=dst.name + ".data",
            )
    finally:
        logger.removeHandler(handler)
    if not dst.is_file():
        raise RuntimeError("quant_pre_process wrote no model")
    sort_model_file(dst)
    return handler.messages


def _infer_shapes(src: Path, dst: Path) -> None:
    onnx.shape_inference.infer_shapes_path(str(src), str(dst))


# --------------------------------------------------------------------------------------------
# The pipeline


def prepare_model(
    model_path: Path,
    workdir: Path,
    *,
    target_opset: int | None = None,
    fold: bool = True,
    shape_inference: bool = True,
    optimize: bool = False,
    external: bool | None = None,
    streaming_bytes: int | None = None,
    progress: Callable[[float], None] = lambda f: None,
) -> Prepared:
    """Run the pre-processing steps into `workdir` and return the model to quantize.

    `target_opset`: upgrade the default-domain opset to at least this. `external`: keep tensors in
    external data (default: when the input has external data or is too large for one protobuf).
    An external-data model of `streaming_bytes` or more (default `streaming.STREAMING_BYTES`) is prepared
    without loading its weights (`Prepared.streamed`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    raw = onnx.load(str(model_path), load_external_data=False)
    had_external = bool(external_locations(raw))
    if external is None:
        external = had_external or Path(model_path).stat().st_size > EXTERNAL_DATA_THRESHOLD
    opset = default_opset(raw)
    result = Prepared(path=Path(model_path), external=bool(external), opset=opset)
    del raw
    if had_external and streaming.should_stream(Path(model_path), streaming_bytes):
        return _prepare_streamed(
            Path(model_path), workdir, result, target_opset, fold, shape_inference, optimize, progress, t0
        )

    # 1. Fold constants and upgrade the opset, into the work folder. With external data the
    #    weights are first gathered in one file there; the graph is then edited without them
    #    (so the protobuf stays small whatever the model's size) and keeps pointing at that file.
    current = workdir / "model.onnx"
    try:
        model = onnx.load(str(model_path), load_external_data=True)
        if external:
            save_model(model, current, external=True)
            del model
            model = onnx.load(str(current), load_external_data=False)
    except Exception as exc:
        raise RuleError(
            "quantization_failed",
            f"Loading the model with its weights failed: {_first_line(exc)}",
            {"step": "load"},
        ) from exc
    if had_external:
        result.steps.append(
            "Gathered the model's external data in one file and kept the tensors in external data at every step."
        )
    elif external:
        result.steps.append("The model is too large for one protobuf: moved its tensors to external data.")
    progress(0.1)
    model = _fold_and_upgrade(model, fold, opset, target_opset, result)
    # With external data the tensors already point at model.onnx.data beside `current`.
    if external:
        onnx.save_model(model, str(current))
    else:
        save_model(model, current, external=False)
    del model
    result.path = current
    progress(0.3)
    result.timings_s["load_fold_upgrade"] = time.perf_counter() - t0

    # 2. Shape inference (and optimisation), with fallbacks.
    if shape_inference:
        t1 = time.perf_counter()
        result.path = _shape_steps(current, workdir, optimize=optimize, external=bool(external), result=result)
        result.timings_s["shape_inference"] = time.perf_counter() - t1
    progress(1.0)
    return result


def _fold_and_upgrade(
    model: onnx.ModelProto, fold: bool, opset: int, target_opset: int | None, result: Prepared
) -> onnx.ModelProto:
    """Constant nodes folded into initializers (`fold`) and the opset raised to `target_opset`, each step
    recorded in `result`: the same for a whole model and for a graph alone (the streamed path)."""
    if fold:
        n = fold_constants(model)
        if n:
            result.steps.append(
                f"Folded {n} Constant node(s) into initializers (weights given as Constant nodes "
                "cannot be quantized otherwise)."
            )
    if target_opset is not None and 0 < opset < target_opset:
        try:
            with pywarnings.catch_warnings():
                pywarnings.simplefilter("ignore")
                model = upgrade_opset(model, target_opset)
            result.steps.append(
                f"Upgraded the opset from {opset} to {target_opset} (needed by the recipe: "
                "per-channel QDQ needs 13, transformer fusion 17, 16-bit types and int4 Gather 21)."
            )
            result.opset = target_opset
        except Exception as exc:
            raise RuleError(
                "quantization_failed",
                f"Upgrading the opset from {opset} to {target_opset} failed: {_first_line(exc)}. "
                "Try without per_channel or 16-bit types, or re-export the model at a newer opset.",
                {"step": "opset_upgrade", "from": opset, "to": target_opset},
            ) from exc
    return model


def _prepare_streamed(
    model_path: Path,
    workdir: Path,
    result: Prepared,
    target_opset: int | None,
    fold: bool,
    shape_inference: bool,
    optimize: bool,
    progress: Callable[[float], None],
    t0: float,
) -> Prepared:
    """prepare_model's steps on the graph alone; the weights are copied once, tensor by tensor, into
    `workdir/model.onnx.data`, and every later file of the work folder refers to them."""
    result.streamed = True
    model_path, workdir = model_path.resolve(), workdir.resolve()
    model = onnx.load(str(model_path), load_external_data=False)
    model = _fold_and_upgrade(model, fold, result.opset, target_opset, result)
    current = workdir / "model.onnx"
    try:
        streaming.write(model, current, source_dir=model_path.parent)
    except Exception as exc:
        raise RuleError(
            "quantization_failed",
            f"Copying the model's weights failed: {_first_line(exc)}",
            {"step": "load"},
        ) from exc
    del model
    result.steps.append(
        "Gathered the model's external data in one file, tensor by tensor, and prepared the graph without "
        "loading its weights."
    )
    result.path = current
    progress(0.3)
    result.timings_s["load_fold_upgrade"] = time.perf_counter() - t0
    if shape_inference:
        t1 = time.perf_counter()
        result.path = _streamed_shape_steps(current, workdir, optimize=optimize, result=result)
        result.timings_s["shape_inference"] = time.perf_counter() - t1
    progress(1.0)
    return result


def _streamed_shape_steps(src: Path, workdir: Path, *, optimize: bool, result: Prepared) -> Path:
    """quant_pre_process's steps (symbolic shape inference, ORT basic optimisation, ONNX shape inference),
    with its fallbacks, on the graph without its weights; every file refers to weights in `workdir`."""
    model = onnx.load(str(src), load_external_data=False)
    what = []
    try:
        model = streaming.symbolic_shapes(model, workdir)
        what.append("symbolic shape inference")
    except Exception as exc:
        result.steps.append(f"Symbolic shape inference failed ({_first_line(exc)}); continued without it.")
    if optimize:
        sym = workdir / "model.sym.onnx"
        opt = workdir / "model.opt.onnx"
        streaming.save_references(model, sym)
        try:
            streaming.optimize_basic(sym, opt)
            model = onnx.load(str(opt), load_external_data=False)
            what.append("ORT basic graph optimisation")
        except Exception as exc:
            result.steps.append(f"ORT graph optimisation failed ({_first_line(exc)}); continued without it.")
    try:
        model = streaming.onnx_shapes(model)
        what.append("ONNX shape inference")
    except Exception as exc:
        result.steps.append(f"ONNX shape inference failed ({_first_line(exc)}).")
    if not any("shape" in w for w in what):
        result.warnings.append("Shape inference failed on this model: tensors of unknown shape are left in float.")
    dst = workdir / "model.pre.onnx"
    streaming.save_references(model, dst)
    sort_model_file(dst)
    if what:
        result.steps.append(f"Ran {', '.join(what)} on the graph without its weights.")
    return dst


def _shape_steps(src: Path, workdir: Path, *, optimize: bool, external: bool, result: Prepared) -> Path:
    dst = workdir / "model.pre.onnx"
    what = "symbolic and ONNX shape inference" + (" and ORT basic graph optimisation" if optimize else "")
    try:
        errors = _quant_pre_process(src, dst, skip_symbolic=False, optimize=optimize, external=external)
        result.steps.append(f"Ran ONNX Runtime's quant_pre_process ({what}).")
        _note_optimisation_errors(errors, result)
        return dst
    except Exception as exc:
        result.steps.append(f"Symbolic shape inference failed ({_first_line(exc)}); retried without it.")
    dst = workdir / "model.pre2.onnx"
    try:
        errors = _quant_pre_process(src, dst, skip_symbolic=True, optimize=optimize, external=external)
        result.steps.append(
            "Ran quant_pre_process without symbolic shape inference (ONNX shape inference"
            + (" and ORT basic graph optimisation)." if optimize else ").")
        )
        _note_optimisation_errors(errors, result)
        return dst
    except Exception as exc:
        result.steps.append(
            f"quant_pre_process without symbolic shape inference failed too ({_first_line(exc)}); "
            "falling back to plain ONNX shape inference."
        )
    dst = workdir / "model.inferred.onnx"
    try:
        _infer_shapes(src, dst)
        result.steps.append("Ran plain ONNX shape inference.")
        return dst
    except Exception as exc:
        result.steps.append(f"ONNX shape inference failed ({_first_line(exc)}); quantizing without inferred shapes.")
        result.warnings.append("Shape inference failed on this model: tensors of unknown shape are left in float.")
        return src


def _note_optimisation_errors(errors: list[str], result: Prepared) -> None:
    if errors:
        msg = next((e for e in errors if "Traceback" not in e), errors[0])
        result.steps.append(f"ORT graph optimisation failed ({msg.splitlines()[0][:200]}); continued without it.")


def runnable_original(model_path: Path, workdir: Path) -> tuple[Path, list[str]]:
    """The model as ONNX Runtime will run it, and the steps that took. Exporters (Paddle2ONNX)
    declare unknown dims as `dim_value` -1 or 0; ONNX Runtime takes -1 as unknown but refuses
    any data for a 0. Such dims become symbolic in a copy under `workdir` (external data files
    linked, not copied); the weights and graph are untouched. Other models are used as they are.

    Every external-data location must be a plain file name (`core.model.external_data`, the upload's
    own rule), else RuleError `external_data_escape`, whether or not a copy is made; a copy links only
    files that are regular files in the model's own folder (the ones the upload recorded), and only
    inside `workdir`."""
    model = onnx.load(str(model_path), load_external_data=False)
    locations = external_locations(model)
    changed = 0
    for value in [*model.graph.input, *model.graph.output]:
        if value.type.WhichOneof("value") != "tensor_type":
            continue
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.WhichOneof("value") == "dim_value" and dim.dim_value <= 0:
                dim.dim_param = f"{value.name}_dim{i}"
                changed += 1
    if not changed:
        return Path(model_path), []
    workdir.mkdir(parents=True, exist_ok=True)
    for location in locations:
        _link_within(Path(model_path).parent, workdir, location)
    out = workdir / Path(model_path).name
    onnx.save(model, str(out))
    return out, [f"Declared {changed} input/output dimension(s) written as -1 or 0 as unknown (symbolic)."]


def _link_within(source_dir: Path, workdir: Path, name: str) -> None:
    """`workdir/name`, a symbolic link to the regular file `source_dir/name`: made only when the file's
    real path is inside `source_dir` and the link's inside `workdir` (both checked before it is made)."""
    source_root, work_root = os.path.realpath(source_dir), os.path.realpath(workdir)
    source, link = os.path.join(source_root, name), os.path.join(work_root, name)
    try:
        regular = stat.S_ISREG(os.lstat(source).st_mode)
    except OSError:
        regular = False
    if not (regular and _inside(source_root, os.path.realpath(source)) and _inside(work_root, os.path.realpath(link))):
        raise RuleError(
            "external_data_escape",
            f"The model names the external data file {name!r}, which is not a file uploaded with it; upload the "
            "model again with its weight files beside it.",
            {"location": name},
        )
    os.symlink(source, link)


def _inside(root: str, path: str) -> bool:
    return path != root and os.path.commonpath([root, path]) == root

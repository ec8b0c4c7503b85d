"""Fidelity of a model against its float reference: one accumulator per output, scored once, judged by
`core.judge`. Its rows drive mode auto's and compare's budgets, the result's per-output rows and the
warnings alike.

Each output has a kind (the contract's names), given by the recipe's `fidelity` or inferred from the op that
produces it in the graph and the shape it has at run time (its first batch; declared shapes can be wrong):
- classification, class scores `[B, C]` or class ids `[B]`: top-1 agreement with the float model;
- sequence, scores per position `[B, T, C]` (or `[T, B, C]`): per-position argmax agreement;
- detection, rows `[B, N, 4 + 1 + C]` or columns `[B, 4 + C, N]`: the rows scoring above a threshold in
  either model, matched one to one (same class, IoU >= 0.5); their F1, 2 matched / (float + quantized rows);
- embedding (pooled or normalised vectors; a token model's outputs), dense (maps `[B, C, H, W]`) and
  regression (anything else): mean per-sample cosine (per token for token outputs; over all samples for an
  output with one value per sample, such as a probability `[B, 1]`: one value's cosine only says whether
  the signs agree). A dense map of per-pixel class scores is judged by per-pixel argmax agreement.
The graph says what an output holds: Softmax/LogSoftmax/ArgMax give class scores (their axis is the class
axis), Sigmoid rows or a Concat of box coordinates and Sigmoid scores give detections, pooling and
normalisation give embeddings, Conv gives maps. Without such an op a float `[B, C]` is read as class logits
and `[B, T, C]` as scores per position, as before. Positions that a token model's attention mask marks as
padding are left out of token-level numbers. Whole-tensor cosine, SQNR and absolute errors are recorded for
every output. With labels, the budget is the top-1 drop (`accuracy_tolerance`); a recipe's `fidelity` adds its
own floor on the outputs it names (all outputs when it names none).
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort

from core import judge
from core.errors import RuleError
from core.jobfile import DatasetSource
from core.model import TensorSpec, default_opset, shape_text, value_info_spec
from core.recipe import (
    AUTO_COLUMNS,
    BoxFormat,
    DetectionLayout,
    DetectionSpec,
    FidelityMetric,
    FidelitySpec,
    OutputJudging,
    OutputKindChoice,
)
from core.result import DetectionAgreement, FidelityVerdict, OutputFidelity
from worker.engine.batch import Batch
from worker.engine.data import iter_batches, synthesize_batch
from worker.engine.metrics import AccuracyAccumulator, cosine_from_sums, finite_or_none, is_class_scores
from worker.engine.metrics import sqnr_from_energies as _sqnr
from worker.engine.session import session_options


class OutputKind(StrEnum):
    """What an output holds (the contract's kinds; `core.recipe.OutputKindChoice` without `auto`)."""

    CLASSIFICATION = "classification"
    DETECTION = "detection"
    SEQUENCE = "sequence"
    EMBEDDING = "embedding"
    DENSE = "dense"
    REGRESSION = "regression"


# Reference outputs are kept in memory up to this many bytes; past it the float model is re-run.
REFERENCE_CACHE_BYTES = 256 << 20
RANDOM_SAMPLES = 32  # random inputs fed when there is no evaluation dataset
DETECTION_F1 = "detection_f1"  # the result's metric of detection outputs
# Detections left to the greedy IoU matching per sample and model, highest scores first (an IoU matrix of
# MATCH_ROWS^2); rows at the same index are paired before, so raw heads rarely get near it.
MATCH_ROWS = 1024


def is_token_model(inputs: Sequence[TensorSpec]) -> bool:
    """Has an integer input that is not a scalar (token ids; a sample rate or a step count is none)."""
    return any(np.dtype(i.dtype).kind in "iu" and (i.shape is None or len(i.shape) > 0) for i in inputs)


def mask_input(inputs: Sequence[TensorSpec]) -> str | None:
    """The attention-mask input of a token model: an integer input whose name says mask."""
    names = [i.name for i in inputs if np.dtype(i.dtype).kind in "iub" and "mask" in i.name.lower()]
    return next((n for n in names if n.lower() == "attention_mask"), names[0] if names else None)


# --------------------------------------------------------------------------------------------
# What the graph says an output holds


class Role(StrEnum):
    """What the op that gives an output its meaning makes of it."""

    SCORES = "scores"  # Softmax, LogSoftmax: a distribution over the class axis
    CLASS_IDS = "class_ids"  # ArgMax, ArgMin
    SIGMOID = "sigmoid"  # independent probabilities (or a detector's rows)
    BOXES_AND_SCORES = "boxes_and_scores"  # a Concat of box coordinates and Sigmoid/Softmax scores
    POOLED = "pooled"  # GlobalAveragePool, ReduceMean, ...: one vector per sample
    NORMALISED = "normalised"  # LpNormalization, or a Div by a norm
    CONV_MAP = "conv_map"  # Conv, ConvTranspose (through activations, normalisation, resizing)


# Ops that pass values on without changing what they mean: keeping every axis where it was, or moving them.
_PASS = frozenset({"Identity", "Cast", "CastLike", "Dropout", "QuantizeLinear", "DequantizeLinear"})
_RESHAPE = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Gather", "Expand", "Tile"})
_SCORE_OPS = {"Softmax": Role.SCORES, "LogSoftmax": Role.SCORES, "ArgMax": Role.CLASS_IDS, "ArgMin": Role.CLASS_IDS}
_POOL_OPS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "ReduceMean", "ReduceMax", "ReduceSum"})
_NORM_OPS = frozenset({"ReduceL2", "ReduceL1", "ReduceSumSquare", "LpNormalization", "Sqrt"})
_CONV_OPS = frozenset({"Conv", "ConvTranspose"})
# Between a Conv and an output, these keep it a map.
_MAP_OPS = frozenset(
    {"Relu", "LeakyRelu", "PRelu", "Clip", "Elu", "Selu", "HardSwish", "HardSigmoid", "Mish", "Tanh", "Add", "Mul"}
    | {"BatchNormalization", "InstanceNormalization", "Resize", "Upsample", "MaxPool", "AveragePool", "Pad"}
)
_WALK_DEPTH = 64


@dataclass(frozen=True)
class GraphHint:
    """What the graph says of one output: the op that gives it its meaning (read back through ops that only
    move values), what that op makes of it, and the shape the model declares for it."""

    op: str | None = None
    role: Role | None = None
    axis: int | None = None  # SCORES/CLASS_IDS: the class axis (negative: from the end); None: unknown
    declared: tuple[Any, ...] | None = None
    via: str = ""  # e.g. "a Concat of box coordinates and Sigmoid scores"


def graph_hints(model: Path | onnx.ModelProto) -> dict[str, GraphHint]:
    """Every graph output's hint (an empty one for what cannot be read: the judge then goes by shape)."""
    if not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load(str(model), load_external_data=False)
        except Exception:  # the sessions will say what is wrong with the file
            return {}
    reader = _GraphReader(model)
    return {out.name: replace(reader.hint(out.name), declared=value_info_spec(out).shape) for out in model.graph.output}


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else onnx.helper.get_attribute_value(found)


class _GraphReader:
    """Reads a tensor's meaning back from the op that produced it (main graph; memoised)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.producers = {out: node for node in model.graph.node for out in node.output if out}
        self.opset = default_opset(model)
        self.memo: dict[str, GraphHint] = {}

    def hint(self, name: str, depth: int = 0) -> GraphHint:
        if name not in self.memo:
            node = self.producers.get(name)
            self.memo[name] = GraphHint() if node is None or depth > _WALK_DEPTH else self._node(node, depth + 1)
        return self.memo[name]

    def _node(self, node: onnx.NodeProto, depth: int) -> GraphHint:
        op = node.op_type
        first = self.hint(node.input[0], depth) if node.input and node.input[0] else GraphHint()
        if op in _PASS:
            return first
        if op == "Transpose":
            return GraphHint(
                first.op, first.role, _transposed(first.axis, list(_attr(node, "perm", []))), via=first.via
            )
        if op in _RESHAPE:
            # A reshape that keeps the class axis last (the common case) keeps it; any other loses it.
            return GraphHint(first.op, first.role, -1 if first.axis == -1 else None, via=first.via)
        if op in _SCORE_OPS:
            default = (-1 if self.opset >= 13 else 1) if _SCORE_OPS[op] == Role.SCORES else 0
            return GraphHint(op, _SCORE_OPS[op], int(_attr(node, "axis", default)))
        if op in ("Sigmoid", "HardSigmoid"):
            return GraphHint(op, Role.SIGMOID)
        if op == "Concat":
            return self._concat(node, depth)
        if op in _POOL_OPS:
            return GraphHint(op, Role.POOLED)
        if op == "LpNormalization":
            return GraphHint(op, Role.NORMALISED)
        if op == "Div" and len(node.input) > 1 and self._is_norm(node.input[1], 4):
            return GraphHint(op, Role.NORMALISED, via="a Div by a norm")
        if op == "Mul" and self._product_of_scores(node, depth):
            return GraphHint(op, Role.SIGMOID, via="a product of Sigmoid scores")
        if op in _CONV_OPS:
            return GraphHint(op, Role.CONV_MAP)
        if op in _MAP_OPS and first.role == Role.CONV_MAP:
            return first
        return GraphHint(op)

    def _concat(self, node: onnx.NodeProto, depth: int) -> GraphHint:
        parts = [self.hint(i, depth) for i in node.input if i]
        roles = {p.role for p in parts}
        scores = {Role.SIGMOID, Role.SCORES}
        if Role.BOXES_AND_SCORES in roles or (roles & scores and roles - scores):
            return GraphHint("Concat", Role.BOXES_AND_SCORES, via="a Concat of box coordinates and scores")
        if len(roles) == 1 and parts:  # like parts (a detector's levels, heads) mean what each means
            return GraphHint("Concat", parts[0].role, parts[0].axis, via=parts[0].via)
        return GraphHint("Concat")

    def _product_of_scores(self, node: onnx.NodeProto, depth: int) -> bool:
        """A Mul of computed scores only (objectness times class score); one by a constant is a transform."""
        computed = [i for i in node.input if i in self.producers and self.producers[i].op_type != "Constant"]
        scores = (Role.SIGMOID, Role.SCORES)
        return len(computed) >= 2 and all(self.hint(i, depth).role in scores for i in computed)

    def _is_norm(self, name: str, steps: int) -> bool:
        """Is `name` a norm a few ops up (Sqrt of a sum of squares, ReduceL2, through Clip/Max/Add of an
        epsilon and reshapes)?"""
        node = self.producers.get(name)
        if node is None or steps == 0:
            return False
        if node.op_type in _NORM_OPS:
            return True
        if node.op_type in (*_PASS, *_RESHAPE, "Clip", "Max", "Add"):
            return any(self._is_norm(i, steps - 1) for i in node.input[:2] if i)
        return False


def _transposed(axis: int | None, perm: list[int]) -> int | None:
    """Where a Transpose with `perm` puts `axis` (counted from the end)."""
    if axis is None or not perm:
        return None
    position = axis if axis >= 0 else len(perm) + axis
    return perm.index(position) - len(perm) if 0 <= position < len(perm) else None


# --------------------------------------------------------------------------------------------
# Detections


@dataclass(frozen=True)
class Detections:
    """One sample's rows scoring above the threshold: their row index, box (corners), score and class."""

    index: np.ndarray
    boxes: np.ndarray  # [n, 4] x1, y1, x2, y2
    scores: np.ndarray
    classes: np.ndarray


@dataclass(frozen=True)
class DetectionReader:
    """The columns of one detection output's rows, resolved against the shape it has at run time."""

    layout: DetectionLayout  # ROWS or COLUMNS
    boxes: tuple[int, ...]
    box_format: BoxFormat
    objectness: int | None
    classes: tuple[int, ...]
    class_id: int | None
    score_threshold: float
    iou_threshold: float
    width: int

    @classmethod
    def resolve(cls, spec: DetectionSpec, reference: np.ndarray, *, field: str | None) -> DetectionReader | None:
        """The reader of `reference` (the float model's first batch). When `field` names the recipe's field
        (a given kind), columns that do not fit raise invalid_recipe naming it; when the kind is inferred,
        an output that cannot be read as rows of boxes and scores gives None."""

        def unfit(message: str, sub: str = "") -> None:
            if field is not None:
                raise RuleError(
                    "invalid_recipe",
                    f"{field}: {message}.",
                    {"field": field + sub, "shape": list(reference.shape)},
                )

        shape = shape_text(reference.shape)
        if reference.ndim not in (2, 3) or reference.dtype.kind != "f":
            unfit(f"a detection output is rows [B, N, K] or columns [B, K, N] of floats, not {reference.dtype} {shape}")
            return None
        tall, wide = reference.shape[-2], reference.shape[-1]
        layout = spec.layout
        if layout == DetectionLayout.AUTO:  # K, a row's width, holds a box and a score at least
            layout = DetectionLayout.COLUMNS if 5 <= tall < wide else DetectionLayout.ROWS
        width = wide if layout == DetectionLayout.ROWS else tall
        rows = _as_rows(reference, layout)
        boxes = tuple(spec.box_columns)
        explicit = set(range(*spec.class_columns)) if isinstance(spec.class_columns, tuple) else set()
        class_id = spec.class_id_column
        objectness: int | None
        if spec.objectness_column == AUTO_COLUMNS:
            free = 4 not in {*boxes, *explicit, class_id}
            objectness = 4 if layout == DetectionLayout.ROWS and width >= 5 and free else None
        else:
            objectness = spec.objectness_column
        classes: tuple[int, ...] = ()
        if isinstance(spec.class_columns, tuple):
            classes = tuple(range(*spec.class_columns))
        elif spec.class_columns == AUTO_COLUMNS and class_id is None:
            rest = [c for c in range(width) if c not in boxes and c != objectness]
            if len(rest) == 1 and objectness is not None and _whole(rows[..., rest[0]]):
                class_id = rest[0]  # [x, y, w, h, score, class id]: a post-processed head
            else:
                classes = tuple(rest)
        named = (
            ("box_columns", boxes),
            ("objectness_column", () if objectness is None else (objectness,)),
            ("class_columns", classes),
            ("class_id_column", () if class_id is None else (class_id,)),
        )
        for name, columns in named:
            beyond = [c for c in columns if c >= width]
            if beyond:
                unfit(f"column {beyond[0]} is beyond the {width} columns of the {layout} of {shape}", f".{name}")
                return None
        if objectness is None and not classes:
            unfit(f"no column of the {layout} of {shape} holds a score", ".objectness_column")
            return None
        return cls(
            layout=layout,
            boxes=boxes,
            box_format=BoxFormat(spec.box_format),
            objectness=objectness,
            classes=classes,
            class_id=class_id,
            score_threshold=float(spec.score_threshold),
            iou_threshold=float(spec.iou_threshold),
            width=width,
        )

    def describe(self) -> str:
        """Which columns hold what, for the result's kind_reason."""
        parts = [f"boxes in columns {_columns_text(self.boxes)} as {self.box_format}"]
        if self.objectness is not None:
            parts.append(f"objectness in column {self.objectness}")
        if self.classes:
            parts.append(f"class scores in column{'s' if len(self.classes) > 1 else ''} {_columns_text(self.classes)}")
        if self.class_id is not None:
            parts.append(f"class ids in column {self.class_id}")
        return ", ".join(parts)

    def detections(self, array: np.ndarray) -> list[Detections]:
        """Each sample's rows scoring above the threshold (score: objectness times the best class score)."""
        rows = _as_rows(np.asarray(array), self.layout).astype(np.float64, copy=False)
        scores = np.ones(rows.shape[:2])
        classes = np.zeros(rows.shape[:2], np.int64)
        if self.objectness is not None:
            scores = scores * rows[..., self.objectness]
        if self.classes:
            class_scores = rows[..., list(self.classes)]
            scores = scores * class_scores.max(axis=-1)
            classes = class_scores.argmax(axis=-1)
        elif self.class_id is not None:
            ids = rows[..., self.class_id]
            classes = np.where(np.isfinite(ids), np.round(ids), -1).astype(np.int64)
        boxes = _corners(rows[..., list(self.boxes)], self.box_format)
        keep = (scores > self.score_threshold) & np.isfinite(scores) & np.isfinite(boxes).all(axis=-1)
        found = []
        for s in range(rows.shape[0]):
            (index,) = np.nonzero(keep[s])
            found.append(Detections(index, boxes[s, index], scores[s, index], classes[s, index]))
        return found


def _as_rows(array: np.ndarray, layout: DetectionLayout) -> np.ndarray:
    rows = array[None] if array.ndim == 2 else array
    return np.swapaxes(rows, -1, -2) if layout == DetectionLayout.COLUMNS else rows


def _whole(values: np.ndarray) -> bool:
    """Whole numbers from 0 up (class ids), not scores."""
    v = np.asarray(values, np.float64)
    return bool(v.size) and bool(np.isfinite(v).all()) and bool((v == np.round(v)).all()) and float(v.min()) >= 0


def _columns_text(columns: Sequence[int]) -> str:
    cols = list(columns)
    if len(cols) > 2 and cols == list(range(cols[0], cols[-1] + 1)):
        return f"{cols[0]}-{cols[-1]}"
    return ", ".join(str(c) for c in cols)


def _corners(boxes: np.ndarray, box_format: BoxFormat) -> np.ndarray:
    a, b, c, d = (boxes[..., i] for i in range(4))
    if box_format == BoxFormat.XYXY:
        return np.stack([np.minimum(a, c), np.minimum(b, d), np.maximum(a, c), np.maximum(b, d)], axis=-1)
    if box_format == BoxFormat.XYWH:
        return np.stack([a, b, a + np.abs(c), b + np.abs(d)], axis=-1)
    half_w, half_h = np.abs(c) / 2, np.abs(d) / 2
    return np.stack([a - half_w, b - half_h, a + half_w, b + half_h], axis=-1)


def box_iou(a: np.ndarray, b: np.ndarray, *, paired: bool = False) -> np.ndarray:
    """IoU of every box of `a` [n, 4] with every box of `b` [m, 4] (corners): [n, m]; `paired`: of a[i] with
    b[i] only: [n]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not paired:
        a, b = a[:, None, :], b[None, :, :]
    inter_w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    inter_h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = inter_w * inter_h
    union = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = union - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    # Two equal boxes without area (points) are the same detection.
    return np.where((union <= 0) & (a == b).all(axis=-1), 1.0, iou)


def match_detections(ref: Detections, got: Detections, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (positions in `ref`, positions in `got`) of detections that match: same class, IoU at least
    `iou_threshold`, each detection in one pair at most. Rows at the same index are paired first (a raw head
    keeps its anchors in order); the rest greedily, highest IoU first (the MATCH_ROWS best-scoring of each)."""
    _, ia, ib = np.intersect1d(ref.index, got.index, assume_unique=True, return_indices=True)
    ok = (box_iou(ref.boxes[ia], got.boxes[ib], paired=True) >= iou_threshold) & (ref.classes[ia] == got.classes[ib])
    ia, ib = ia[ok], ib[ok]
    free_ref = np.setdiff1d(np.arange(ref.index.size), ia)
    free_got = np.setdiff1d(np.arange(got.index.size), ib)
    free_ref = free_ref[np.argsort(-ref.scores[free_ref], kind="stable")][:MATCH_ROWS]
    free_got = free_got[np.argsort(-got.scores[free_got], kind="stable")][:MATCH_ROWS]
    if not (free_ref.size and free_got.size):
        return ia.astype(np.int64), ib.astype(np.int64)
    iou = box_iou(ref.boxes[free_ref], got.boxes[free_got])
    iou[ref.classes[free_ref][:, None] != got.classes[free_got][None, :]] = -1.0
    rows, cols = np.nonzero(iou >= iou_threshold)
    used_ref: set[int] = set()
    used_got: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for k in np.argsort(-iou[rows, cols], kind="stable").tolist():
        r, c = int(rows[k]), int(cols[k])
        if r not in used_ref and c not in used_got:
            used_ref.add(r)
            used_got.add(c)
            pairs.append((r, c))
    greedy_ref = free_ref[[r for r, _ in pairs]] if pairs else free_ref[:0]
    greedy_got = free_got[[c for _, c in pairs]] if pairs else free_got[:0]
    return np.concatenate([ia, greedy_ref]).astype(np.int64), np.concatenate([ib, greedy_got]).astype(np.int64)


def box_errors(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per matched pair of boxes (corners), the mean absolute error of the four corners' coordinates relative
    to the float box's width (x) and height (y)."""
    size = ref[:, [2, 3, 2, 3]] - ref[:, [0, 1, 0, 1]]
    size = np.where(size > 0, size, 1.0)
    return np.asarray(np.abs(got - ref) / size, np.float64).mean(axis=1)


@dataclass
class DetectionTally:
    """Running counts of one detection output's detections in both models."""

    reader: DetectionReader
    reference_rows: int = 0
    candidate_rows: int = 0
    matched: int = 0
    iou_sum: float = 0.0
    error_sum: float = 0.0

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        for r, g in zip(self.reader.detections(ref), self.reader.detections(got), strict=True):
            pr, pg = match_detections(r, g, self.reader.iou_threshold)
            self.reference_rows += int(r.index.size)
            self.candidate_rows += int(g.index.size)
            self.matched += int(pr.size)
            if pr.size:
                self.iou_sum += float(box_iou(r.boxes[pr], g.boxes[pg], paired=True).sum())
                self.error_sum += float(box_errors(r.boxes[pr], g.boxes[pg]).sum())

    @property
    def f1(self) -> float | None:
        """2 matched / (float rows + quantized rows); None when neither model detected anything."""
        rows = self.reference_rows + self.candidate_rows
        return 2.0 * self.matched / rows if rows else None

    def agreement(self) -> DetectionAgreement:
        return DetectionAgreement(
            score_threshold=self.reader.score_threshold,
            iou_threshold=self.reader.iou_threshold,
            layout="rows" if self.reader.layout == DetectionLayout.ROWS else "columns",
            reference_rows=self.reference_rows,
            candidate_rows=self.candidate_rows,
            matched=self.matched,
            mean_iou=self.iou_sum / self.matched if self.matched else None,
            box_error=self.error_sum / self.matched if self.matched else None,
        )


# --------------------------------------------------------------------------------------------
# The kind of an output


@dataclass(frozen=True)
class KindChoice:
    """An output's kind, where it came from and why, and what judging it needs."""

    kind: OutputKind
    source: Literal["given", "inferred"] = "inferred"
    reason: str = ""
    class_axis: int | None = None  # scores: the axis (from the end) whose argmax is compared
    class_ids: bool = False  # the values are class ids: agreement is equality
    detection: DetectionReader | None = None

    @property
    def scores(self) -> bool:
        """Is argmax (or class id) agreement defined for it?"""
        return self.class_ids or self.class_axis is not None


def choose_kind(
    array: np.ndarray,
    hint: GraphHint | None = None,
    *,
    token_model: bool = False,
    judging: OutputJudging | None = None,
    given: str | None = None,
    detection_field: str = "fidelity.detection",
) -> KindChoice:
    """The kind of an output whose float values (first batch) are `array`: the recipe's when `given` names the
    field that gave it (an output it does not fit raises invalid_recipe), else inferred from the graph's
    `hint` and the shape it has at run time."""
    array = np.asarray(array)
    hint = hint or GraphHint()
    spec = judging.detection if judging is not None and judging.detection is not None else DetectionSpec()
    if given is not None and judging is not None and judging.kind != OutputKindChoice.AUTO:
        return _given_kind(OutputKind(judging.kind.value), array, hint, spec, given, detection_field)
    return _inferred_kind(array, hint, token_model, spec)


def _shape_said(array: np.ndarray, hint: GraphHint) -> str:
    """The run-time shape, and the declared one when it differs (declared shapes can be wrong)."""
    shape = shape_text(array.shape)
    declared = hint.declared
    if declared is None:
        return shape
    fits = len(declared) == array.ndim and all(
        not isinstance(d, int) or d == n for d, n in zip(declared, array.shape, strict=True)
    )
    return shape if fits else f"{shape} (as run; the model declares {shape_text(declared)})"


def _class_axis(axis: int | None, ndim: int) -> int:
    """A class axis counted from the end; the last one when unknown or out of range."""
    if axis is None or ndim == 0:
        return -1
    if axis >= 0:
        return axis - ndim if axis < ndim else -1
    return axis if axis >= -ndim else -1


def _axis_text(axis: int, ndim: int) -> str:
    return "the last axis" if axis == -1 else f"axis {ndim + axis}"


def _given_kind(
    kind: OutputKind, array: np.ndarray, hint: GraphHint, spec: DetectionSpec, given: str, detection_field: str
) -> KindChoice:
    reason = f"given in the recipe ({given})"
    if kind == OutputKind.DETECTION:
        reader = DetectionReader.resolve(spec, array, field=detection_field)
        assert reader is not None  # a given kind that does not fit has raised
        return KindChoice(
            kind,
            "given",
            f"{reason}: {reader.layout} {_shape_said(array, hint)}, {reader.describe()}",
            detection=reader,
        )
    if kind in (OutputKind.CLASSIFICATION, OutputKind.SEQUENCE) and array.dtype.kind in "iu":
        return KindChoice(kind, "given", f"{reason}: class ids {_shape_said(array, hint)}", class_ids=True)
    if kind in (OutputKind.CLASSIFICATION, OutputKind.SEQUENCE) or (
        kind == OutputKind.DENSE and hint.role == Role.SCORES
    ):
        axis = _class_axis(hint.axis if hint.role == Role.SCORES else None, array.ndim)
        text = f"{reason}: argmax over {_axis_text(axis, array.ndim)} of {_shape_said(array, hint)}"
        return KindChoice(kind, "given", text, class_axis=axis)
    return KindChoice(kind, "given", reason)


def _inferred_kind(array: np.ndarray, hint: GraphHint, token_model: bool, spec: DetectionSpec) -> KindChoice:
    shape = _shape_said(array, hint)
    by = f"produced by {hint.via or hint.op}" if hint.op else "produced by no operator (an input or a constant)"
    role, ndim = hint.role, array.ndim
    if array.dtype.kind not in "biuf":
        return KindChoice(OutputKind.REGRESSION, reason=f"its values are {array.dtype}, which are not compared")
    if role == Role.CLASS_IDS and array.dtype.kind in "iu":
        kind = OutputKind.CLASSIFICATION if ndim <= 1 else OutputKind.SEQUENCE if ndim == 2 else OutputKind.DENSE
        return KindChoice(kind, reason=f"{by}: class ids {shape}", class_ids=True)
    if array.dtype.kind != "f":
        return KindChoice(OutputKind.REGRESSION, reason=f"{by}: whole numbers {shape}, compared by cosine")
    detector = (role == Role.BOXES_AND_SCORES and ndim in (2, 3)) or (role == Role.SIGMOID and ndim == 3)
    reader = DetectionReader.resolve(spec, array, field=None) if detector else None
    if reader is not None:
        return KindChoice(
            OutputKind.DETECTION, reason=f"{by}, giving {reader.layout} {shape}: {reader.describe()}", detection=reader
        )
    if role == Role.SCORES:
        axis = _class_axis(hint.axis, ndim)
        kind = OutputKind.CLASSIFICATION if ndim <= 2 else OutputKind.SEQUENCE if ndim == 3 else OutputKind.DENSE
        assumed = "" if hint.axis is not None else " (the class axis taken to be the last)"
        return KindChoice(kind, reason=f"{by} over {_axis_text(axis, ndim)} of {shape}{assumed}", class_axis=axis)
    if role in (Role.POOLED, Role.NORMALISED):
        what = "pooled" if role == Role.POOLED else "normalised"
        return KindChoice(OutputKind.EMBEDDING, reason=f"{by}: a {what} vector per sample, {shape}")
    if role == Role.CONV_MAP and ndim == 4:
        return KindChoice(OutputKind.DENSE, reason=f"{by}: a map {shape}")
    if role == Role.SIGMOID:
        if ndim == 4:
            return KindChoice(OutputKind.DENSE, reason=f"{by}: a map of probabilities {shape}")
        return KindChoice(OutputKind.REGRESSION, reason=f"{by}: independent probabilities {shape}")
    if token_model and ndim >= 2:
        return KindChoice(OutputKind.EMBEDDING, reason=f"{by} in a token model: embeddings {shape}")
    if is_class_scores(array):
        return KindChoice(
            OutputKind.CLASSIFICATION, reason=f"{by}, no Softmax: {shape} read as class scores", class_axis=-1
        )
    if ndim == 3 and array.shape[2] > 1:
        return KindChoice(
            OutputKind.SEQUENCE, reason=f"{by}, no Softmax: {shape} read as scores per position", class_axis=-1
        )
    if ndim == 4:
        return KindChoice(OutputKind.DENSE, reason=f"{by}: a 4-D map {shape}")
    return KindChoice(
        OutputKind.REGRESSION, reason=f"{by}: nothing says what {shape} holds, so it is compared by cosine"
    )


def output_kind(array: np.ndarray, *, token_model: bool, hint: GraphHint | None = None) -> OutputKind:
    """The inferred kind alone (see `choose_kind`)."""
    return choose_kind(array, hint, token_model=token_model).kind


def _row_cosines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xx = np.einsum("ij,ij->i", x, x)
    yy = np.einsum("ij,ij->i", y, y)
    xy = np.einsum("ij,ij->i", x, y)
    denom = np.sqrt(xx * yy)
    both_zero = (xx == 0) & (yy == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, xy / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(np.where(both_zero, 1.0, cos), -1.0, 1.0)


class OutputAccumulator:
    """Running sums of one output against its reference (O(1) memory in the number of samples): every
    number the result shows for the output comes from here."""

    def __init__(self, name: str, kind: OutputKind | KindChoice) -> None:
        self.name = name
        self.choice = kind if isinstance(kind, KindChoice) else _plain_choice(kind)
        self.kind = self.choice.kind
        self.detections = DetectionTally(self.choice.detection) if self.choice.detection is not None else None
        self.cos_sum = 0.0
        self.cos_rows = 0
        self.agree = 0
        self.positions = 0
        self.xx = 0.0  # sum x^2, over the kept rows' elements
        self.yy = 0.0
        self.xy = 0.0
        self.ee = 0.0  # sum (x-y)^2
        self.abs_sum = 0.0
        self.abs_max = 0.0
        self.elements = 0
        self.nonfinite = 0  # elements where either model gave NaN/inf (their rows are left out)
        self.scalar_rows = True  # one value per row so far: see mean_cosine
        self.problem: str | None = None

    def _rows(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The rows compared one by one: class scores per position (class axis last), token vectors (padding
        left out), or one row per sample."""
        choice = self.choice
        if choice.class_axis is not None and x.ndim >= 1:
            if x.ndim >= 2 and choice.class_axis != -1:
                x, y = np.moveaxis(x, choice.class_axis, -1), np.moveaxis(y, choice.class_axis, -1)
            rows_x = x.reshape(-1, x.shape[-1]) if x.ndim >= 2 else x.reshape(1, -1)
        elif self.kind in (OutputKind.EMBEDDING, OutputKind.SEQUENCE) and x.ndim >= 3:
            rows_x = x.reshape(x.shape[0] * x.shape[1], -1)
        else:
            rows_x = x.reshape(x.shape[0] if x.ndim else 1, -1)
        rows_y = y.reshape(rows_x.shape)
        per_position = self.kind in (OutputKind.EMBEDDING, OutputKind.SEQUENCE) and x.ndim >= 3
        if per_position and mask is not None and x.shape[:2] == mask.shape:
            keep = mask.astype(bool).reshape(-1)
            rows_x, rows_y = rows_x[keep], rows_y[keep]
        return rows_x, rows_y

    def add(self, ref: np.ndarray, got: np.ndarray, mask: np.ndarray | None = None) -> None:
        ref, got = np.asarray(ref), np.asarray(got)
        if ref.dtype.kind not in "biuf" or got.dtype.kind not in "biuf":
            self.problem = f"{ref.dtype if ref.dtype.kind not in 'biuf' else got.dtype} values are not compared"
            return
        if ref.shape != got.shape:
            self.problem = f"shape {list(ref.shape)} in the original and {list(got.shape)} in the quantized model"
            return
        if self.detections is not None:
            self.detections.add(ref, got)
        x = ref.astype(np.float64)
        y = got.astype(np.float64)
        rows_x, rows_y = self._rows(x, y, mask)
        bad = ~(np.isfinite(rows_x) & np.isfinite(rows_y))
        if bad.any():
            self.nonfinite += int(np.count_nonzero(bad))
            finite = ~bad.any(axis=1)
            rows_x, rows_y = rows_x[finite], rows_y[finite]
        if self.choice.class_ids:
            self.agree += int(np.count_nonzero(rows_x == rows_y))
            self.positions += int(rows_x.size)
        elif self.choice.scores and rows_x.shape[1] > 1:
            self.agree += int(np.count_nonzero(rows_x.argmax(axis=1) == rows_y.argmax(axis=1)))
            self.positions += rows_x.shape[0]
        cos = _row_cosines(rows_x, rows_y)
        self.cos_sum += float(cos.sum())
        self.cos_rows += int(cos.size)
        self.scalar_rows = self.scalar_rows and rows_x.shape[1] == 1
        diff = rows_x - rows_y
        self.xx += float(np.einsum("ij,ij->", rows_x, rows_x))
        self.yy += float(np.einsum("ij,ij->", rows_y, rows_y))
        self.xy += float(np.einsum("ij,ij->", rows_x, rows_y))
        self.ee += float(np.einsum("ij,ij->", diff, diff))
        if diff.size:
            absdiff = np.abs(diff)
            self.abs_sum += float(absdiff.sum())
            self.abs_max = max(self.abs_max, float(absdiff.max()))
            self.elements += int(diff.size)

    @property
    def comparable(self) -> bool:
        return self.problem is None and self.cos_rows > 0

    @property
    def cosine(self) -> float | None:
        """Cosine over all (kept) elements taken together."""
        return cosine_from_sums(self.xx, self.yy, self.xy, self.ee) if self.comparable else None

    @property
    def mean_cosine(self) -> float | None:
        """Mean per-row cosine; for an output with one value per sample (a probability [B, 1]),
        where a row's cosine only says whether the signs agree, the cosine over all samples."""
        if not self.comparable:
            return None
        return self.cosine if self.scalar_rows else self.cos_sum / self.cos_rows

    @property
    def sqnr_db(self) -> float | None:
        return _sqnr(self.xx, self.ee) if self.comparable else None

    @property
    def agreement(self) -> float | None:
        return self.agree / self.positions if self.positions and self.problem is None else None

    @property
    def detection_f1(self) -> float | None:
        return self.detections.f1 if self.detections is not None and self.problem is None else None

    @property
    def max_abs_error(self) -> float | None:
        return self.abs_max if self.comparable else None

    @property
    def mean_abs_error(self) -> float | None:
        return self.abs_sum / self.elements if self.comparable and self.elements else None

    def value(self, metric: FidelityMetric | str) -> float | None:
        if metric == DETECTION_F1:
            return self.detection_f1
        if metric == FidelityMetric.AGREEMENT:
            return self.agreement
        if metric == FidelityMetric.SQNR:
            return self.sqnr_db
        return self.mean_cosine

    def metric(self, asked: FidelityMetric) -> str:
        """The metric this output is judged by when the recipe asks for `asked`."""
        if asked in (FidelityMetric.COSINE, FidelityMetric.SQNR):
            return str(asked.value)
        if self.kind == OutputKind.DETECTION:  # auto or agreement: the detections' agreement
            return DETECTION_F1 if self.detection_f1 is not None else FidelityMetric.COSINE.value
        # Agreement means nothing for embeddings and values.
        return FidelityMetric.AGREEMENT.value if self.choice.scores else FidelityMetric.COSINE.value

    def judged(self, spec: FidelitySpec | None, *, counted: bool = True) -> OutputFidelity:
        """This output's row of the result, with the judge's verdict on it. `counted` False: the budget is
        the labels' top-1 drop alone, so no output counts toward it."""
        judging = spec.judging(self.name)[0] if spec is not None else None
        asked = judging.metric if judging is not None else FidelityMetric.AUTO
        metric = self.metric(asked)
        value = finite_or_none(self.value(metric))
        floor = judge.floor_of(judging, metric)
        wanted = spec is None or spec.names(self.name)
        reason = self.choice.reason
        if self.detections is not None and metric == FidelityMetric.COSINE and asked != FidelityMetric.COSINE:
            threshold = self.detections.reader.score_threshold
            reason += f"; no row scored above {threshold:g} in either model, so it is judged by cosine"
        return OutputFidelity(
            name=self.name,
            kind=self.kind.value,
            kind_source=self.choice.source,
            kind_reason=reason or None,
            metric=metric,
            value=value,
            min=floor,
            budgeted=counted and wanted and self.problem is None,
            faithful=None if not self.comparable else judge.faithful(value, floor),
            cosine=finite_or_none(self.cosine),
            mean_cosine=finite_or_none(self.mean_cosine),
            sqnr_db=finite_or_none(self.sqnr_db),
            max_abs_error=finite_or_none(self.max_abs_error),
            mean_abs_error=finite_or_none(self.mean_abs_error),
            top1_agreement=finite_or_none(self.agreement),
            problem=self.problem,
            detection=self.detections.agreement() if self.detections is not None else None,
        )


def _plain_choice(kind: OutputKind) -> KindChoice:
    """A kind without a graph or a recipe: class scores over the last axis."""
    scores = kind in (OutputKind.CLASSIFICATION, OutputKind.SEQUENCE)
    return KindChoice(kind, class_axis=-1 if scores else None)


@dataclass
class Score:
    """A model's fidelity against the reference on the evaluation data: its rows, and the judge's verdict."""

    outputs: list[OutputFidelity]
    accuracy_drop: float | None = None
    tolerance: float = 0.01
    labels_decide: bool = False  # labels and no explicit `fidelity` in the recipe: the top-1 drop decides
    samples: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def budgeted(self) -> list[OutputFidelity]:
        return [o for o in self.outputs if o.budgeted]

    @property
    def worst(self) -> OutputFidelity | None:
        """The budgeted output furthest below (or least above) its floor."""
        scored = [o for o in self.budgeted if o.value is not None and o.min is not None]
        return min(scored, key=lambda o: (o.value or 0.0) - (o.min or 0.0), default=None)

    @property
    def fidelity(self) -> float | None:
        """One number per model (the worst budgeted output's metric value), for tables and plots."""
        worst = self.worst
        return None if worst is None else worst.value

    @property
    def metric(self) -> str:
        if self.accuracy_drop is not None and self.labels_decide:
            return "top1_drop"
        worst = self.worst
        return str(worst.metric) if worst is not None else "none"

    @property
    def within_budget(self) -> bool:
        return judge.within_budget(
            [o.faithful is True for o in self.budgeted],
            self.accuracy_drop,
            self.tolerance,
            labels_decide=self.labels_decide,
        )

    @property
    def within_tolerance(self) -> bool:
        return not judge.beyond_tolerance(self.accuracy_drop, self.tolerance)

    def margin(self) -> float:
        """How far inside (> 0) or outside (< 0) the budget: for ordering models that all miss it."""
        parts = []
        if self.accuracy_drop is not None:
            parts.append(self.tolerance - self.accuracy_drop)
        if not self.labels_decide or self.accuracy_drop is None:
            worst = self.worst
            parts.append(-math.inf if worst is None else (worst.value or 0.0) - (worst.min or 0.0))
        return min(parts) if parts else -math.inf

    def verdict(self) -> FidelityVerdict:
        return FidelityVerdict(
            within_budget=self.within_budget,
            metric=self.metric,
            fidelity=finite_or_none(self.fidelity),
            accuracy_drop=finite_or_none(self.accuracy_drop),
            accuracy_tolerance=self.tolerance,
            samples=self.samples,
            notes=list(self.notes),
        )


class FidelityPass:
    """One model against its reference, batch by batch: every output's accumulator and both models'
    top-1 counts on the labels. The evaluation and mode auto's evaluator both fill one."""

    def __init__(
        self,
        inputs: Sequence[TensorSpec],
        spec: FidelitySpec | None,
        tolerance: float,
        *,
        hints: Mapping[str, GraphHint] | None = None,
    ) -> None:
        self.token_model = is_token_model(inputs)
        self.mask = mask_input(inputs)
        self.spec = spec
        self.hints = dict(hints or {})  # `graph_hints` of the reference model
        self.tolerance = tolerance
        self.outputs: dict[str, OutputAccumulator] = {}
        self.accuracy = {"reference": AccuracyAccumulator(), "candidate": AccuracyAccumulator()}
        self.accuracy_output: str | None = None
        self.labels_seen = False
        self.labels_unusable: str | None = None
        self.samples = 0

    def add(self, batch: Batch, names: Sequence[str], ref: Sequence[Any], got: Sequence[Any]) -> None:
        mask = batch.feeds.get(self.mask) if self.mask else None
        for name, r, g in zip(names, ref, got, strict=True):
            acc = self.outputs.get(name)
            if acc is None:
                acc = self.outputs[name] = OutputAccumulator(name, self._kind(name, np.asarray(r)))
            acc.add(r, g, None if mask is None else np.asarray(mask))
        if batch.labels is not None:
            self._labels(batch.labels, names, ref, got)

    def _kind(self, name: str, reference: np.ndarray) -> KindChoice:
        """The output's kind, from the recipe or from the graph and its first batch in the reference."""
        judging, given = self.spec.judging(name) if self.spec is not None else (None, None)
        own = (self.spec.per_output or {}).get(name) if self.spec is not None else None
        where = f"fidelity.per_output.{name}.detection" if own is not None and own.detection else "fidelity.detection"
        return choose_kind(
            reference,
            self.hints.get(name),
            token_model=self.token_model,
            judging=judging,
            given=given,
            detection_field=where,
        )

    def _labels(self, labels: np.ndarray, names: Sequence[str], ref: Sequence[Any], got: Sequence[Any]) -> None:
        self.labels_seen = True
        if self.labels_unusable is not None:
            return
        if self.accuracy_output is None:
            self.accuracy_output = next((n for n, r in zip(names, ref, strict=True) if is_class_scores(r)), None)
            if self.accuracy_output is None:
                self.labels_unusable = "no output of the model holds class scores [batch, classes]"
                return
        k = list(names).index(self.accuracy_output)
        scores = {"reference": np.asarray(ref[k]), "candidate": np.asarray(got[k])}
        if all(is_class_scores(s) and s.shape[0] == labels.shape[0] for s in scores.values()):
            for which, s in scores.items():
                self.accuracy[which].add(s, labels)
        else:
            self.accuracy = {"reference": AccuracyAccumulator(), "candidate": AccuracyAccumulator()}
            self.labels_unusable = (
                f"output '{self.accuracy_output}' has {scores['reference'].shape[0]} rows for {labels.shape[0]} labels"
            )

    @property
    def accuracy_drop(self) -> float | None:
        a0, a1 = self.accuracy["reference"].top1_accuracy, self.accuracy["candidate"].top1_accuracy
        return None if a0 is None or a1 is None else a0 - a1

    def score(self, names: Sequence[str]) -> Score:
        """The judged rows in the model's output order (raises invalid_recipe for a budgeted name it lacks)."""
        for field_name in ("outputs", "per_output"):
            named = getattr(self.spec, field_name) if self.spec is not None else None
            unknown = sorted(set(named or ()) - set(names))
            if unknown:
                raise RuleError(
                    "invalid_recipe",
                    f"fidelity.{field_name} names output(s) the model does not have: {', '.join(unknown)}.",
                    {"field": f"fidelity.{field_name}", "unknown": unknown, "outputs": list(names)},
                )
        drop = self.accuracy_drop
        labels_decide = drop is not None and self.spec is None
        return Score(
            outputs=[self.outputs[n].judged(self.spec, counted=not labels_decide) for n in names if n in self.outputs],
            accuracy_drop=drop,
            tolerance=self.tolerance,
            labels_decide=labels_decide,
            samples=self.samples,
        )


def load_session(path: Path, options: ort.SessionOptions, which: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        msg = str(exc).strip()[:300] or type(exc).__name__
        raise RuleError(
            "evaluation_failed",
            f'ONNX Runtime could not load the {which} model: "{msg}"',
            {"model": which, "ort_message": msg},
        ) from exc


def run_session(session: ort.InferenceSession, names: Sequence[str], feeds: dict[str, Any], which: str) -> list[Any]:
    try:
        return session.run(list(names), feeds)
    except Exception as exc:
        msg = str(exc).strip()[:300] or type(exc).__name__
        raise RuleError(
            "evaluation_failed",
            f'ONNX Runtime could not run the {which} model: "{msg}"',
            {"model": which, "ort_message": msg},
        ) from exc


def evaluation_batches(
    data: DatasetSource | None, inputs: Sequence[TensorSpec], batch_size: int, max_samples: int | None
) -> Generator[Batch, None, None]:
    """The evaluation batches, up to `max_samples` samples (random ones, at most RANDOM_SAMPLES, when there
    is no dataset)."""
    if data is None:
        samples = min(max_samples or RANDOM_SAMPLES, RANDOM_SAMPLES)
        for seed in range(max(1, math.ceil(samples / batch_size))):
            yield synthesize_batch(inputs, seed=seed, batch=batch_size)
        return
    it = iter_batches(data, inputs, batch_size=batch_size)
    seen = 0
    try:
        for batch in it:
            yield batch
            seen += batch.num_samples
            if max_samples is not None and seen >= max_samples:
                break
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


class FidelityEvaluator:
    """Scores candidate models against the float reference on the same evaluation batches (mode auto).

    The reference's outputs are computed once and kept while they fit in REFERENCE_CACHE_BYTES;
    the data is streamed from the dataset on every call, never held whole. With `spill` (a folder: a big
    model's search, one session at a time) the reference runs alone on every batch before the first candidate
    opens, its outputs are written under `spill` and its session is closed: no candidate's session is ever
    open beside the reference's."""

    def __init__(
        self,
        reference: Path,
        data: DatasetSource | None,
        inputs: Sequence[TensorSpec],
        spec: FidelitySpec | None,
        tolerance: float,
        *,
        batch_size: int = 1,
        max_samples: int = 64,
        threads: int | None = None,
        spill: Path | None = None,
    ) -> None:
        self.reference = Path(reference)
        self.spill = None if spill is None else Path(spill)
        self._spilled = False
        self._subsets = 0
        self.data = data
        self.inputs = list(inputs)
        self.spec = spec
        self.tolerance = tolerance
        self.batch_size = max(1, batch_size)
        self.max_samples = max(1, max_samples)
        self.threads = threads
        self._options = session_options(threads or 1)
        self._ref_session: ort.InferenceSession | None = None
        self._cache: list[list[np.ndarray]] | None = None
        self._cache_complete = False
        self.names: list[str] = []
        self._hints: dict[str, GraphHint] | None = None

    @property
    def hints(self) -> dict[str, GraphHint]:
        """What the reference's graph says of its outputs (read once)."""
        if self._hints is None:
            self._hints = graph_hints(self.reference)
        return self._hints

    def subset(self, max_samples: int) -> FidelityEvaluator:
        """The same evaluator on fewer samples (its own reference cache, or spill folder)."""
        self._subsets += 1
        return FidelityEvaluator(
            self.reference,
            self.data,
            self.inputs,
            self.spec,
            self.tolerance,
            batch_size=self.batch_size,
            max_samples=max_samples,
            threads=self.threads,
            spill=None if self.spill is None else self.spill / f"subset-{self._subsets}",
        )

    def batches(self) -> Iterator[Batch]:
        return evaluation_batches(self.data, self.inputs, self.batch_size, self.max_samples)

    def _reference(self) -> ort.InferenceSession:
        if self._ref_session is None:
            self._ref_session = load_session(self.reference, self._options, "original")
            self.names = [o.name for o in self._ref_session.get_outputs()]
        return self._ref_session

    def _spill_reference(self) -> None:
        """The reference alone on every batch, its outputs written under `spill`, its session closed."""
        if self._spilled or self.spill is None:
            return
        self.spill.mkdir(parents=True, exist_ok=True)
        session = self._reference()
        for index, batch in enumerate(self.batches()):
            for k, value in enumerate(run_session(session, self.names, batch.feeds, "original")):
                np.save(self.spill / f"{index}_{k}.npy", np.asarray(value), allow_pickle=False)
        self._ref_session = None
        del session
        self._spilled = True

    def _reference_outputs(self, index: int, batch: Batch) -> list[np.ndarray]:
        if self._spilled and self.spill is not None:
            return [np.load(self.spill / f"{index}_{k}.npy", allow_pickle=False) for k in range(len(self.names))]
        if self._cache_complete and self._cache is not None:
            return self._cache[index]
        outs = [np.asarray(o) for o in run_session(self._reference(), self.names, batch.feeds, "original")]
        if self._cache is not None:
            size = sum(o.nbytes for c in self._cache for o in c) + sum(o.nbytes for o in outs)
            if size <= REFERENCE_CACHE_BYTES and len(self._cache) == index:
                self._cache.append(outs)
            else:
                self._cache = None
        return outs

    def score(self, candidate: Path) -> Score:
        self._spill_reference()
        session = load_session(Path(candidate), self._options, "candidate")
        if not self._cache_complete and not self._spilled:
            self._reference()
        first_pass = self._cache is None and not self._cache_complete and not self._spilled
        if first_pass:
            self._cache = []
        comparison = FidelityPass(self.inputs, self.spec, self.tolerance, hints=self.hints)
        for index, batch in enumerate(self.batches()):
            ref = self._reference_outputs(index, batch)
            got = run_session(session, self.names, batch.feeds, "candidate")
            comparison.add(batch, self.names, ref, got)
            comparison.samples += batch.num_samples
        if first_pass and self._cache is not None:
            self._cache_complete = True
            self._ref_session = None
        del session
        return comparison.score(self.names)

"""The recipe: the one specification of how to quantize, and every rule about it.

`Recipe` is a frozen dataclass that pydantic validates: the API takes it as the `recipe` of a
job (a broken rule answers 422 `invalid_recipe` at the door) and the engine reads the stored
recipe back through `parse_recipe`, so both run the same field bounds (the `Field` metadata) and
the same combination rules (`check_recipe`, run by `__post_init__`). Rules that need the model
(`check_recipe_for_model`) read `ModelFacts`, which the API stores at upload and the engine
reads from the file, so job creation never parses the model again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    ConfigDict,
    Field,
    JsonValue,
    PlainSerializer,
    PlainValidator,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)

from core.errors import RuleError
from core.model import ModelFacts


class Mode(StrEnum):
    STATIC = "static"
    DYNAMIC = "dynamic"
    WEIGHT_ONLY = "weight_only"
    FP16 = "fp16"
    AUTO = "auto"
    COMPARE = "compare"  # evaluate an uploaded, already quantized model against its float reference


class Objective(StrEnum):
    """What mode auto optimises within the fidelity budget."""

    LATENCY = "latency"
    SIZE = "size"


class FidelityMetric(StrEnum):
    AUTO = "auto"  # by output kind: agreement for class/sequence scores, detection F1, cosine otherwise
    COSINE = "cosine"
    SQNR = "sqnr"
    AGREEMENT = "agreement"


class QuantFormat(StrEnum):
    QDQ = "qdq"
    QOPERATOR = "qoperator"


class CalibrationMethod(StrEnum):
    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"
    DISTRIBUTION = "distribution"


class QType(StrEnum):
    """Weight types. Activations take the 8- and 16-bit ones only (`ActivationType`)."""

    INT8 = "int8"
    UINT8 = "uint8"
    INT16 = "int16"
    UINT16 = "uint16"
    INT4 = "int4"
    UINT4 = "uint4"


class ActivationType(StrEnum):
    UINT8 = "uint8"
    INT8 = "int8"
    UINT16 = "uint16"
    INT16 = "int16"


SIXTEEN_BIT = (QType.INT16, QType.UINT16)
FOUR_BIT = (QType.INT4, QType.UINT4)
EIGHT_BIT = (QType.INT8, QType.UINT8)
WEIGHT_ONLY_OP_TYPES = ("MatMul", "Gather")
# What a static recipe may hand to ONNX Runtime's dynamic quantizer instead (`dynamic_op_types`): the op types
# it has integer kernels for that are worth it (its dynamic Conv, ConvInteger, is several times slower than
# float; it leaves Gemm in float).
HYBRID_DYNAMIC_OP_TYPES = ("MatMul", "Attention", "LSTM")
# Modes that run calibration data through the float model.
CALIBRATED_MODES = (Mode.STATIC, Mode.AUTO)
MIN_PERCENTILE = 50.0
MAX_LISTED = 10_000  # nodes_to_exclude entries
MAX_OP_TYPES = 256
MAX_NAME_CHARS = 1024  # one node name or op type

MAX_SEARCH_SECONDS = 86_400
# Calibration samples fast bias correction measures on, at most: a channel mean settles fast (every position of
# every sample counts), and shifts within sampling noise are not applied.
BIAS_CORRECTION_SAMPLES = 16
NodeName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS)]
RECIPE_EXAMPLES: list[JsonValue] = [
    {"mode": "static", "calibration_method": "minmax", "per_channel": True},
    {"mode": "auto", "objective": "latency", "fidelity": {"metric": "auto", "min": 0.99}, "max_search_seconds": 600},
    {"mode": "dynamic", "op_types_to_quantize": ["MatMul", "Gemm"]},
    {"mode": "weight_only", "weight_type": "int4", "block_size": 32},
    {"mode": "auto", "accuracy_tolerance": 0.01},
]


class RecipeError(RuleError, ValueError):
    """A broken recipe rule: code `invalid_recipe`, `detail.field` names the field to change.
    A ValueError too, so that pydantic reports it as a validation error of the recipe."""

    def __init__(self, message: str, field: str, **detail: Any) -> None:
        super().__init__("invalid_recipe", message, {"field": field, **detail})


class OutputKindChoice(StrEnum):
    """What an output holds, which decides how it is judged; `auto` reads it from the graph and the data."""

    AUTO = "auto"
    CLASSIFICATION = "classification"  # class scores [B, C] (or class ids [B]): top-1 agreement
    DETECTION = "detection"  # rows (boxes and scores) per sample: detection F1
    SEQUENCE = "sequence"  # scores per position [B, T, C] (or [T, B, C]): per-position argmax agreement
    EMBEDDING = "embedding"  # vectors compared by direction: mean cosine
    DENSE = "dense"  # maps [B, C, H, W]: mean cosine (per-pixel argmax agreement for per-pixel class scores)
    REGRESSION = "regression"  # values: mean cosine


class DetectionLayout(StrEnum):
    AUTO = "auto"  # columns when the last axis is the longer and the other holds 5 values or more; else rows
    ROWS = "rows"  # [B, N, 4 + 1 + C] (YOLOv5, YOLOX) or [B, N, 6]
    COLUMNS = "columns"  # [B, 4 + C, N] (YOLOv8)


class BoxFormat(StrEnum):
    CXCYWH = "cxcywh"  # centre x, centre y, width, height
    XYWH = "xywh"  # top-left x, top-left y, width, height
    XYXY = "xyxy"  # corners


MAX_COLUMN = 1_000_000
Column = Annotated[int, Field(ge=0, le=MAX_COLUMN)]
AUTO_COLUMNS: Literal["auto"] = "auto"


def _column(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COLUMN:
        raise ValueError(f"a column is an index from 0 to {MAX_COLUMN}, not {value!r}")
    return value


def _column_or_auto(value: Any) -> int | str | None:
    return value if value is None or value == AUTO_COLUMNS else _column(value)


def _columns_or_auto(value: Any) -> tuple[int, int] | str | None:
    if value is None or value == AUTO_COLUMNS:
        return value
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(f'give [first, stop) as two column indexes, "auto" or null, not {value!r}')
    return _column(value[0]), _column(value[1])


# Plain validators, not unions: a bad value is then named by its field alone (`detection.class_columns`),
# not by the union member pydantic tried last.
_COLUMN_SCHEMA = {"type": "integer", "minimum": 0, "maximum": MAX_COLUMN}
ColumnOrAuto = Annotated[
    int | Literal["auto"] | None,
    PlainValidator(_column_or_auto),
    WithJsonSchema({"anyOf": [_COLUMN_SCHEMA, {"const": AUTO_COLUMNS}, {"type": "null"}]}),
]
ColumnsOrAuto = Annotated[
    tuple[int, int] | Literal["auto"] | None,
    PlainValidator(_columns_or_auto),
    PlainSerializer(lambda v: list(v) if isinstance(v, tuple) else v),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "array", "items": _COLUMN_SCHEMA, "minItems": 2, "maxItems": 2},
                {"const": AUTO_COLUMNS},
                {"type": "null"},
            ]
        }
    ),
]


@dataclass(frozen=True)
class DetectionSpec:
    """How to read a detection output: which columns of a row hold the box and the scores, and which rows
    count (score above `score_threshold`) and match (IoU at least `iou_threshold`, same class)."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    score_threshold: Annotated[
        float, Field(ge=0, le=1, description="Rows scoring above this in either model are detections.")
    ] = 0.3
    iou_threshold: Annotated[
        float, Field(gt=0, le=1, description="A float and a quantized detection match at this IoU or more.")
    ] = 0.5
    layout: Annotated[
        DetectionLayout,
        Field(
            description="rows [B, N, K] or columns [B, K, N]; auto: columns when the last axis is the longer and "
            "the one before it holds 5 values or more (a box and a score), rows otherwise."
        ),
    ] = DetectionLayout.AUTO
    box_columns: Annotated[
        tuple[Column, ...],
        Field(min_length=4, max_length=4, description="The four columns of the box, in `box_format` order."),
    ] = (0, 1, 2, 3)
    box_format: BoxFormat = BoxFormat.CXCYWH
    objectness_column: Annotated[
        ColumnOrAuto,
        Field(description="auto: column 4 in rows layout (YOLOv5, YOLOX), none in columns layout (YOLOv8)."),
    ] = AUTO_COLUMNS
    class_columns: Annotated[
        ColumnsOrAuto,
        Field(
            description="[first, stop) of the class-score columns; auto: the columns after the box and the "
            "objectness (a single one holding whole numbers is read as a class id)."
        ),
    ] = AUTO_COLUMNS
    class_id_column: Annotated[Column | None, Field(description="A column that holds the class id.")] = None

    def __post_init__(self) -> None:
        normalise = object.__setattr__
        normalise(self, "layout", DetectionLayout(self.layout))
        normalise(self, "box_format", BoxFormat(self.box_format))
        normalise(self, "box_columns", tuple(self.box_columns))
        if isinstance(self.class_columns, list | tuple):
            normalise(self, "class_columns", tuple(self.class_columns))

    def check(self, field: str) -> None:
        """Columns that cannot describe a row. Raises RecipeError naming `field` + the sub-field."""
        boxes = set(self.box_columns)
        if len(boxes) != 4:
            raise RecipeError(f"{field}.box_columns must name four different columns.", f"{field}.box_columns")
        classes: set[int] = set()
        if isinstance(self.class_columns, tuple):
            first, stop = self.class_columns
            if first >= stop:
                raise RecipeError(
                    f"{field}.class_columns is [first, stop): stop must be greater than first, e.g. [5, 85] for 80 "
                    "classes.",
                    f"{field}.class_columns",
                )
            classes = set(range(first, stop))
            if self.class_id_column is not None:
                raise RecipeError(
                    f"{field}: give class_columns (class scores) or class_id_column (a class id), not both.",
                    f"{field}.class_id_column",
                )
        named = {
            "objectness_column": {self.objectness_column} if isinstance(self.objectness_column, int) else set(),
            "class_columns": classes,
            "class_id_column": {self.class_id_column} if self.class_id_column is not None else set(),
        }
        for name, columns in named.items():
            if columns & boxes:
                raise RecipeError(
                    f"{field}.{name} overlaps the box columns {list(self.box_columns)}.", f"{field}.{name}"
                )
        if named["objectness_column"] & (classes | named["class_id_column"]):
            raise RecipeError(f"{field}.objectness_column is also a class column.", f"{field}.objectness_column")
        if self.objectness_column is None and self.class_columns is None:
            raise RecipeError(
                f"{field}: a detection needs a score; give objectness_column or class_columns.",
                f"{field}.objectness_column",
            )


@dataclass(frozen=True)
class OutputJudging:
    """How one output is judged: what it holds (`kind`), by which metric, against which floor."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    kind: Annotated[
        OutputKindChoice,
        Field(
            description="What the output holds; auto: read from the op that produces it and the shape it has "
            "at run time."
        ),
    ] = OutputKindChoice.AUTO
    metric: Annotated[
        FidelityMetric,
        Field(
            description="auto: top-1 agreement for classification, per-position argmax agreement for sequence, "
            "detection F1 for detection, mean cosine otherwise; agreement on a detection output is its F1."
        ),
    ] = FidelityMetric.AUTO
    min: Annotated[float | None, Field(description="Floor of the metric; default 0.99 (20 dB for sqnr).")] = None
    detection: Annotated[
        DetectionSpec | None,
        Field(description="Detection outputs: score threshold, IoU and the columns of a row; null: defaults."),
    ] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", OutputKindChoice(self.kind))
        object.__setattr__(self, "metric", FidelityMetric(self.metric))
        if isinstance(self.detection, Mapping):
            object.__setattr__(self, "detection", DetectionSpec(**self.detection))

    def check_as(self, field: str, metric: FidelityMetric, *, detection_applies: bool = False) -> None:
        """This judging's rules, `metric` being the one in force (a per-output floor may lean on the
        top-level metric); `detection_applies`: some output judged by these rules may be a detection whatever
        `kind` says. Raises RecipeError naming `field` + the sub-field."""
        if self.min is not None:
            low, high = (-200.0, 200.0) if metric == FidelityMetric.SQNR else (-1.0, 1.0)
            if not low <= float(self.min) <= high:
                raise RecipeError(
                    f"{field}.min for metric {metric} must be between {low:g} and {high:g} (cosine, agreement and "
                    "detection F1 are fractions, e.g. 0.99; sqnr is in dB, e.g. 20).",
                    f"{field}.min",
                )
        if self.detection is not None:
            if self.kind not in (OutputKindChoice.AUTO, OutputKindChoice.DETECTION) and not detection_applies:
                raise RecipeError(
                    f"{field}.detection describes detection outputs, and {field}.kind is {self.kind}.",
                    f"{field}.detection",
                )
            self.detection.check(f"{field}.detection")


@dataclass(frozen=True)
class FidelitySpec(OutputJudging):
    """Which outputs must stay faithful, what they hold, compared how, and the floor (modes auto and compare).
    `kind` applies to the outputs `outputs` names (all when it names none); `metric`, `min` and `detection` to
    every output; `per_output` overrides any of them for one output."""

    outputs: Annotated[
        tuple[NodeName, ...] | None, Field(min_length=1, max_length=1000, description="Output names; null: all.")
    ] = None
    per_output: Annotated[
        dict[NodeName, OutputJudging] | None,
        Field(
            max_length=1000,
            description="Per output name: its own kind, metric, floor or detection columns.",
            examples=[{"detections": {"kind": "detection", "detection": {"score_threshold": 0.25}}}],
        ),
    ] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.outputs is not None:
            object.__setattr__(self, "outputs", tuple(self.outputs))
        if self.per_output is not None:
            object.__setattr__(
                self,
                "per_output",
                {k: OutputJudging(**v) if isinstance(v, Mapping) else v for k, v in self.per_output.items()},
            )

    def check(self, field: str = "fidelity") -> None:
        """Every rule of the spec (run by the recipe's, so that the field is named from the recipe down)."""
        # The top-level detection columns serve outputs its kind does not name, and per-output detections.
        detections = any(j.kind == OutputKindChoice.DETECTION for j in (self.per_output or {}).values())
        self.check_as(field, self.metric, detection_applies=bool(self.outputs) or detections)
        for name, judging in (self.per_output or {}).items():
            where = f"{field}.per_output.{name}"
            judging.check_as(where, judging.metric if judging.metric != FidelityMetric.AUTO else self.metric)
            inherited = judging.kind == OutputKindChoice.AUTO and self.names(name)
            not_detection = self.kind not in (OutputKindChoice.AUTO, OutputKindChoice.DETECTION)
            if judging.detection is not None and inherited and not_detection:
                raise RecipeError(
                    f"{where}.detection describes detection outputs, and fidelity.kind makes '{name}' {self.kind}.",
                    f"{where}.detection",
                )

    def names(self, output: str) -> bool:
        """Does the spec's top-level `outputs` name this output (all do when it names none)?"""
        return not self.outputs or output in self.outputs

    def judging(self, output: str) -> tuple[OutputJudging, str | None]:
        """How `output` is judged, per-output entries over the top level; and the field that gave its kind
        (None: not given, so it is inferred)."""
        own = (self.per_output or {}).get(output)
        kind, given = OutputKindChoice.AUTO, None
        if own is not None and own.kind != OutputKindChoice.AUTO:
            kind, given = own.kind, f"fidelity.per_output.{output}.kind"
        elif self.kind != OutputKindChoice.AUTO and self.names(output):
            kind, given = self.kind, "fidelity.kind"
        metric = own.metric if own is not None and own.metric != FidelityMetric.AUTO else self.metric
        floor = own.min if own is not None and own.min is not None else self.min
        detection = own.detection if own is not None and own.detection is not None else self.detection
        return OutputJudging(kind=kind, metric=metric, min=floor, detection=detection), given

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Self:
        return cls(**{k: data[k] for k in ("outputs", "metric", "min", "kind", "detection", "per_output") if k in data})


@dataclass(frozen=True)
class Recipe:
    """How to quantize. Defaults give static MinMax QDQ, uint8 activations, int8 weights
    (int4 for `weight_only`)."""

    __pydantic_config__ = ConfigDict(extra="forbid", json_schema_extra={"examples": RECIPE_EXAMPLES})

    mode: Mode = Mode.STATIC
    format: Annotated[QuantFormat, Field(description="Static only: QDQ pairs, or QLinear* operators.")] = (
        QuantFormat.QDQ
    )
    activation_type: Annotated[ActivationType, Field(description="Static only; dynamic computes uint8.")] = (
        ActivationType.UINT8
    )
    weight_type: Annotated[QType | None, Field(description="Default int8; int4 for `weight_only`.")] = None
    calibration_method: CalibrationMethod = CalibrationMethod.MINMAX
    percentile: Annotated[
        float, Field(gt=0, le=100, description=f"For `percentile` calibration; at least {MIN_PERCENTILE:g}.")
    ] = 99.999
    per_channel: bool = False
    reduce_range: bool = False
    symmetric_activations: bool = False
    symmetric_weights: Annotated[bool | None, Field(description="Default: symmetric for signed weight types.")] = None
    op_types_to_quantize: Annotated[
        tuple[NodeName, ...] | None,
        Field(max_length=MAX_OP_TYPES, examples=[["Conv", "MatMul", "Gemm"]]),
    ] = None
    nodes_to_exclude: Annotated[
        tuple[NodeName, ...] | None,
        Field(max_length=MAX_LISTED, description="Node names (as Netron shows them) to keep in float."),
    ] = None
    calibration_batch_size: Annotated[int, Field(ge=1, le=4096)] = 1
    max_calibration_samples: Annotated[int | None, Field(ge=1)] = None
    block_size: Annotated[
        int, Field(ge=16, le=4096, description="`weight_only`: weights per block, a power of two.")
    ] = 128
    accuracy_tolerance: Annotated[
        float, Field(ge=0, le=1, description="Largest allowed top-1 drop as a fraction (0.01 = one point).")
    ] = 0.01
    sixteen_bit_tensors: Annotated[
        tuple[NodeName, ...] | None,
        Field(max_length=MAX_LISTED, description="Static QDQ: activation tensors quantized to 16 bits instead of 8."),
    ] = None
    transformer_fusion: Annotated[
        bool,
        Field(
            description="Static/dynamic: ONNX Runtime's transformer fusions (Attention, SkipLayerNormalization, "
            "Gelu) before quantizing."
        ),
    ] = False
    dynamic_op_types: Annotated[
        tuple[NodeName, ...] | None,
        Field(
            min_length=1,
            max_length=MAX_OP_TYPES,
            description="Static only: op types quantized dynamically (int8 weights, activation ranges computed at "
            f"run time) in a second pass instead of statically, a hybrid: e.g. `op_types_to_quantize` [Conv, Gemm] "
            f"and `dynamic_op_types` [MatMul]. Any of {', '.join(HYBRID_DYNAMIC_OP_TYPES)}.",
            examples=[["MatMul"]],
        ),
    ] = None
    bias_correction: Annotated[
        bool | None,
        Field(
            description="Static 8-bit: shift the bias of every quantized Conv, Gemm and MatMul+Add by the mean "
            "error per output channel that quantizing its weights and input adds (fast bias correction, measured "
            f"on up to {BIAS_CORRECTION_SAMPLES} calibration batches; it costs about one float pass over them). "
            "null: off for a static job (the ranges ONNX Runtime's quantize_static gives), on in mode auto's "
            "static candidates."
        ),
    ] = None
    calibration_per_tensor: Annotated[
        bool,
        Field(
            description="Static: for the few activation tensors whose quantization hurts most (by sensitivity), "
            "try a MinMax and a Percentile range and keep, tensor by tensor, the one with less output error on "
            "the calibration data; every other tensor keeps `calibration_method`."
        ),
    ] = False
    objective: Annotated[
        Objective,
        Field(description="Mode auto: the fastest model within budget (never slower than float), or the smallest."),
    ] = Objective.LATENCY
    fidelity: Annotated[FidelitySpec | None, Field(description="Modes auto and compare: the fidelity budget.")] = None
    max_search_seconds: Annotated[
        float, Field(ge=1, le=MAX_SEARCH_SECONDS, description="Mode auto: time budget of the search.")
    ] = 900.0
    reference_model_id: Annotated[
        str | None,
        Field(
            max_length=64,
            description="Mode compare: the float model the uploaded (already quantized) model is compared with.",
        ),
    ] = None

    def __post_init__(self) -> None:
        # Plain strings and lists (direct construction, JSON) become the enums and tuples.
        normalise = object.__setattr__
        normalise(self, "mode", Mode(self.mode))
        normalise(self, "format", QuantFormat(self.format))
        normalise(self, "activation_type", ActivationType(self.activation_type))
        normalise(self, "calibration_method", CalibrationMethod(self.calibration_method))
        normalise(self, "objective", Objective(self.objective))
        if isinstance(self.fidelity, Mapping):
            normalise(self, "fidelity", FidelitySpec.from_mapping(self.fidelity))
        if self.weight_type is None:
            normalise(self, "weight_type", QType.INT4 if self.mode == Mode.WEIGHT_ONLY else QType.INT8)
        else:
            normalise(self, "weight_type", QType(self.weight_type))
        for name in ("op_types_to_quantize", "nodes_to_exclude", "sixteen_bit_tensors", "dynamic_op_types"):
            value = getattr(self, name)
            if value is not None:
                normalise(self, name, tuple(value))
        check_recipe(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Self:
        """A stored or sent recipe, through the same validation as the API's."""
        return parse_recipe(data)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return dict(_ADAPTER.dump_python(self, mode="json"))

    @property
    def corrects_bias(self) -> bool:
        """Is fast bias correction on? (Mode auto sets it on its static candidates unless the job says false.)"""
        return self.mode in CALIBRATED_MODES and bool(self.bias_correction)

    @property
    def weight(self) -> QType:
        """`weight_type`, resolved (never None after construction)."""
        assert self.weight_type is not None
        return QType(self.weight_type)


_ADAPTER: TypeAdapter[Recipe] = TypeAdapter(Recipe)


def parse_recipe(data: Mapping[str, Any]) -> Recipe:
    """Validate a recipe mapping. Raises RuleError `invalid_recipe` naming the field."""
    try:
        return _ADAPTER.validate_python(dict(data))
    except ValidationError as exc:
        raise recipe_error_from(exc) from exc


def unchecked_recipe(data: Mapping[str, Any]) -> Recipe:
    """A stored recipe as it was stored, without the rules: for showing jobs whose recipe was
    accepted before a rule existed (such jobs failed in the worker). Never for running one."""
    recipe = object.__new__(Recipe)
    for name, default in Recipe.__dataclass_fields__.items():
        value = data.get(name, default.default)
        object.__setattr__(recipe, name, tuple(value) if isinstance(value, list) else value)
    return recipe


def recipe_error_from(exc: ValidationError, prefix: tuple[str, ...] = ()) -> RuleError:
    """The RuleError for a pydantic validation error of a recipe (the first error)."""
    first = exc.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, RecipeError):
        return cause
    field = ".".join(str(p) for p in (*prefix, *first.get("loc", ()))) or "recipe"
    return RecipeError(f"Invalid value for `{field}`: {first.get('msg', 'invalid')}.", field)


# --------------------------------------------------------------------------------------------
# The rules


def check_recipe(recipe: Recipe) -> None:
    """Combinations ONNX Runtime cannot honour, whatever the model. Raises RecipeError."""
    mode = recipe.mode
    weight = recipe.weight
    _check_search_fields(recipe)
    if weight in FOUR_BIT and mode != Mode.WEIGHT_ONLY:
        raise RecipeError(
            f"weight_type {weight} (4-bit) is only available with mode weight_only (blocked MatMulNBits); "
            "use int8 weights or mode weight_only.",
            "weight_type",
            mode=str(mode),
        )
    clipping = recipe.calibration_method == CalibrationMethod.PERCENTILE and recipe.percentile < MIN_PERCENTILE
    if clipping and mode in CALIBRATED_MODES:
        raise RecipeError(
            f"percentile {recipe.percentile:g} would clip most values; give at least {MIN_PERCENTILE:g}, "
            "typically 99.99 or 99.999.",
            "percentile",
        )
    if mode == Mode.STATIC:
        _check_static(recipe, weight)
    elif mode == Mode.DYNAMIC:
        if weight not in EIGHT_BIT:
            raise RecipeError(f"Dynamic quantization supports int8 or uint8 weights, not {weight}.", "weight_type")
        if recipe.activation_type != ActivationType.UINT8:
            raise RecipeError(
                "Dynamic quantization computes activations as uint8 at run time; activation_type "
                f"{recipe.activation_type} needs mode static.",
                "activation_type",
            )
    elif mode == Mode.WEIGHT_ONLY:
        if weight not in (*FOUR_BIT, *EIGHT_BIT):
            raise RecipeError(
                f"Weight-only quantization supports int4, uint4, int8 or uint8 weights, not {weight}.",
                "weight_type",
            )
        if recipe.block_size & (recipe.block_size - 1):
            raise RecipeError(
                f"block_size must be a power of two (16, 32, 64, 128, ...), not {recipe.block_size}.", "block_size"
            )
        unknown = sorted(set(recipe.op_types_to_quantize or ()) - set(WEIGHT_ONLY_OP_TYPES))
        if unknown:
            raise RecipeError(
                f"Weight-only quantization handles MatMul and Gather only, not {', '.join(unknown[:10])}.",
                "op_types_to_quantize",
                unknown=unknown[:100],
            )
    elif mode == Mode.FP16 and recipe.op_types_to_quantize:
        raise RecipeError(
            "op_types_to_quantize does not apply to fp16, which converts the whole model (keeping "
            "overflowing nodes in float32); drop it, or list nodes in nodes_to_exclude.",
            "op_types_to_quantize",
        )


def _check_search_fields(recipe: Recipe) -> None:
    """Mode compare's reference, 16-bit tensors, transformer fusion, the search's time."""
    mode = recipe.mode
    if recipe.fidelity is not None:
        # Here rather than in the spec's own __post_init__: a rule broken inside a nested field is then
        # named from the recipe down (`recipe.fidelity.min`), by the API and by `parse_recipe` alike.
        recipe.fidelity.check()
    if mode == Mode.COMPARE and not recipe.reference_model_id:
        raise RecipeError(
            "Mode compare needs reference_model_id: the id of the float model to compare with.", "reference_model_id"
        )
    if mode != Mode.COMPARE and recipe.reference_model_id:
        raise RecipeError("reference_model_id is only used by mode compare; drop it.", "reference_model_id")
    if recipe.sixteen_bit_tensors and (mode not in CALIBRATED_MODES or recipe.format != QuantFormat.QDQ):
        raise RecipeError(
            "sixteen_bit_tensors needs static quantization in format qdq (16-bit activations are Q/DQ pairs).",
            "sixteen_bit_tensors",
            mode=str(mode),
        )
    if recipe.sixteen_bit_tensors and recipe.activation_type in SIXTEEN_BIT:
        raise RecipeError(
            "sixteen_bit_tensors widens chosen tensors of an 8-bit recipe; activation_type is already 16-bit.",
            "sixteen_bit_tensors",
        )
    for name in ("bias_correction", "calibration_per_tensor"):
        if getattr(recipe, name) and mode not in CALIBRATED_MODES:
            raise RecipeError(
                f"{name} refines static quantization with calibration data; it needs mode static (or auto).",
                name,
                mode=str(mode),
            )
    if recipe.transformer_fusion and mode not in (Mode.STATIC, Mode.DYNAMIC, Mode.AUTO):
        raise RecipeError(
            "transformer_fusion is a pre-processing step of static and dynamic quantization.",
            "transformer_fusion",
            mode=str(mode),
        )
    if not 1.0 <= float(recipe.max_search_seconds) <= MAX_SEARCH_SECONDS:
        raise RecipeError(f"max_search_seconds must be between 1 and {MAX_SEARCH_SECONDS}.", "max_search_seconds")
    if recipe.dynamic_op_types:
        _check_hybrid(recipe)


def _check_hybrid(recipe: Recipe) -> None:
    """`dynamic_op_types`: a static recipe whose listed op types go to ONNX Runtime's dynamic quantizer."""
    dynamic = recipe.dynamic_op_types or ()
    if recipe.mode != Mode.STATIC:
        raise RecipeError(
            "dynamic_op_types makes a static recipe quantize some op types dynamically; it needs mode static "
            "(mode dynamic quantizes every op type dynamically already).",
            "dynamic_op_types",
            mode=str(recipe.mode),
        )
    unknown = sorted(set(dynamic) - set(HYBRID_DYNAMIC_OP_TYPES))
    if unknown:
        gemm = (
            " ONNX Runtime's dynamic quantizer leaves Gemm in float: quantize it statically."
            if "Gemm" in unknown
            else ""
        )
        raise RecipeError(
            f"dynamic_op_types takes {', '.join(HYBRID_DYNAMIC_OP_TYPES)}, not {', '.join(unknown[:10])}.{gemm}",
            "dynamic_op_types",
            unknown=unknown[:100],
        )
    both = sorted(set(dynamic) & set(recipe.op_types_to_quantize or ()))
    if both:
        raise RecipeError(
            f"{', '.join(both)} cannot be quantized both statically (op_types_to_quantize) and dynamically "
            "(dynamic_op_types); list each op type in one of them.",
            "dynamic_op_types",
            both=both,
        )


def _check_static(recipe: Recipe, weight: QType) -> None:
    if recipe.format == QuantFormat.QOPERATOR and (recipe.activation_type in SIXTEEN_BIT or weight in SIXTEEN_BIT):
        raise RecipeError(
            "16-bit activation or weight types need format qdq: ONNX Runtime's QOperator format "
            "(QLinearConv, QLinearMatMul) has 8-bit kernels only.",
            "format",
            activation_type=str(recipe.activation_type),
            weight_type=str(weight),
        )
    if recipe.activation_type == ActivationType.INT8 and weight == QType.UINT8:
        raise RecipeError(
            "ONNX Runtime has no kernels for int8 activations with uint8 weights; use int8 weights "
            "(or uint8 activations).",
            "weight_type",
            activation_type="int8",
            weight_type="uint8",
        )


def weight_only_op_types(recipe: Recipe) -> tuple[str, ...]:
    """The op types a weight-only recipe rewrites."""
    return tuple(recipe.op_types_to_quantize or ("MatMul",))


def check_recipe_for_model(recipe: Recipe, facts: ModelFacts, *, has_calibration: bool) -> list[str]:
    """Rules that need the model (from facts stored at upload). Raises RecipeError; returns
    warnings (things that work but deserve a word)."""
    warnings: list[str] = []
    mode = recipe.mode
    if mode in CALIBRATED_MODES and not has_calibration:
        what = "Static quantization" if mode == Mode.STATIC else "Mode auto (it compares static variants)"
        raise RecipeError(
            f"{what} needs calibration data: upload a dataset and pass its id as calibration_dataset_id"
            + (", or use mode dynamic." if mode == Mode.STATIC else "."),
            "calibration_dataset_id",
        )
    if recipe.nodes_to_exclude:
        # Stored names are clipped to MAX_NAME_CHARS (service.models.service.stored_node_names), the
        # longest a recipe may name: a longer node can't be named, and every shorter one matches exactly.
        unknown = sorted(set(recipe.nodes_to_exclude) - set(facts.node_names))
        if unknown:
            raise RecipeError(
                f"nodes_to_exclude names node(s) the model does not have: {', '.join(unknown[:10])}; "
                "use node names as they appear in the model (Netron shows them).",
                "nodes_to_exclude",
                unknown=unknown[:100],
            )
    if mode == Mode.WEIGHT_ONLY:
        wanted = weight_only_op_types(recipe)
        if not any(facts.op_counts.get(op, 0) for op in wanted):
            raise RecipeError(
                f"Weight-only quantization rewrites {' and '.join(wanted)} nodes and the model has none; "
                "use mode static or dynamic.",
                "mode",
                op_types=list(wanted),
            )
    if recipe.op_types_to_quantize and mode in (Mode.STATIC, Mode.DYNAMIC, Mode.WEIGHT_ONLY):
        present = [op for op in recipe.op_types_to_quantize if facts.op_counts.get(op, 0)]
        if not present:
            raise RecipeError(
                f"None of op_types_to_quantize ({', '.join(recipe.op_types_to_quantize[:10])}) occurs in the "
                f"model, so nothing would be quantized; the model's operators are "
                f"{', '.join(sorted(facts.op_counts)[:40])}.",
                "op_types_to_quantize",
                model_ops=sorted(facts.op_counts),
            )
        missing = [op for op in recipe.op_types_to_quantize if op not in present]
        if missing:
            warnings.append(f"op_types_to_quantize lists {', '.join(missing[:10])}, which the model does not contain.")
    if recipe.dynamic_op_types and mode == Mode.STATIC:
        present = [op for op in recipe.dynamic_op_types if facts.op_counts.get(op, 0)]
        if not present:
            raise RecipeError(
                f"None of dynamic_op_types ({', '.join(recipe.dynamic_op_types)}) occurs in the model, so the "
                "dynamic pass would quantize nothing; drop the field or use op types the model has.",
                "dynamic_op_types",
                model_ops=sorted(facts.op_counts),
            )
        missing = [op for op in recipe.dynamic_op_types if op not in present]
        if missing:
            warnings.append(f"dynamic_op_types lists {', '.join(missing)}, which the model does not contain.")
    if recipe.fidelity is not None:
        names = {o.name for o in facts.outputs}
        for field, named in (("outputs", recipe.fidelity.outputs), ("per_output", recipe.fidelity.per_output)):
            unknown = sorted(set(named or ()) - names)
            if unknown:
                raise RecipeError(
                    f"fidelity.{field} names output(s) the model does not have: {', '.join(unknown[:10])}; "
                    f"its outputs are {', '.join(sorted(names)[:20])}.",
                    f"fidelity.{field}",
                    unknown=unknown[:100],
                )
    qdq = facts.qdq_nodes
    if qdq:
        warnings.append(
            f"The model already holds {qdq} QuantizeLinear/DequantizeLinear nodes "
            "(a quantization-aware trained or already quantized export); those parts are kept as they are."
        )
    return warnings


def check_reference_fits(facts: ModelFacts, reference: ModelFacts) -> None:
    """Mode compare: the reference must have the model's inputs and outputs, to run on the same data."""
    for what in ("inputs", "outputs"):
        mine = sorted(t.name for t in getattr(facts, what))
        theirs = sorted(t.name for t in getattr(reference, what))
        if mine != theirs:
            raise RecipeError(
                f"The reference model's {what} ({', '.join(theirs)}) differ from the model's ({', '.join(mine)}); "
                "they cannot be compared on the same data.",
                "reference_model_id",
                **{what: mine, f"reference_{what}": theirs},
            )

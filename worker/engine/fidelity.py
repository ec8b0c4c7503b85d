"""Fidelity of a model against its float reference: one accumulator per output, scored once, judged by
`core.judge`. Its rows drive mode auto's and compare's budgets, the result's per-output rows and the
warnings alike.

Each output is one of four kinds, read from its first batch and the model's inputs:
- class scores `[B, C]` (C > 1): top-1 agreement with the float model;
- sequence scores `[B, T, C]` (C > 1): per-position argmax agreement;
- token outputs of a token model (one with integer inputs such as `input_ids`): mean per-token cosine;
- anything else: mean per-sample cosine (over all samples for an output with one value per sample,
  such as a probability `[B, 1]`: one value's cosine only says whether the signs agree).
In token models, 2-D and 3-D outputs are embeddings rather than scores (a sentence embedding
`[B, 384]` has no "class"), so they are compared by cosine. Positions that the model's attention
mask marks as padding are left out of token-level numbers. Whole-tensor cosine, SQNR and absolute
errors are recorded for every output. With labels, the budget is the top-1 drop (`accuracy_tolerance`);
a recipe's `fidelity` adds its own floor on the outputs it names (all outputs when it names none).
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from core import judge
from core.errors import RuleError
from core.jobfile import DatasetSource
from core.model import TensorSpec
from core.recipe import FidelityMetric, FidelitySpec
from core.result import FidelityVerdict, OutputFidelity
from worker.engine.batch import Batch
from worker.engine.data import iter_batches, synthesize_batch
from worker.engine.metrics import AccuracyAccumulator, cosine_from_sums, finite_or_none, is_class_scores
from worker.engine.metrics import sqnr_from_energies as _sqnr
from worker.engine.session import session_options


class OutputKind(StrEnum):
    CLASS_SCORES = "class_scores"
    SEQUENCE_SCORES = "sequence_scores"
    TOKENS = "tokens"
    TENSOR = "tensor"


# Reference outputs are kept in memory up to this many bytes; past it the float model is re-run.
REFERENCE_CACHE_BYTES = 256 << 20
RANDOM_SAMPLES = 32  # random inputs fed when there is no evaluation dataset
_AUTO_METRIC = {
    OutputKind.CLASS_SCORES: FidelityMetric.AGREEMENT,
    OutputKind.SEQUENCE_SCORES: FidelityMetric.AGREEMENT,
    OutputKind.TOKENS: FidelityMetric.COSINE,
    OutputKind.TENSOR: FidelityMetric.COSINE,
}
_SCORES = (OutputKind.CLASS_SCORES, OutputKind.SEQUENCE_SCORES)


def is_token_model(inputs: Sequence[TensorSpec]) -> bool:
    """Has an integer input that is not a scalar (token ids; a sample rate or a step count is none)."""
    return any(np.dtype(i.dtype).kind in "iu" and (i.shape is None or len(i.shape) > 0) for i in inputs)


def mask_input(inputs: Sequence[TensorSpec]) -> str | None:
    """The attention-mask input of a token model: an integer input whose name says mask."""
    names = [i.name for i in inputs if np.dtype(i.dtype).kind in "iub" and "mask" in i.name.lower()]
    return next((n for n in names if n.lower() == "attention_mask"), names[0] if names else None)


def output_kind(array: np.ndarray, *, token_model: bool) -> OutputKind:
    array = np.asarray(array)
    if array.dtype.kind != "f":
        return OutputKind.TENSOR
    if token_model:
        return OutputKind.TOKENS if array.ndim >= 2 else OutputKind.TENSOR
    if is_class_scores(array):
        return OutputKind.CLASS_SCORES
    if array.ndim == 3 and array.shape[2] > 1:
        return OutputKind.SEQUENCE_SCORES
    return OutputKind.TENSOR


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

    def __init__(self, name: str, kind: OutputKind) -> None:
        self.name = name
        self.kind = kind
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

    def add(self, ref: np.ndarray, got: np.ndarray, mask: np.ndarray | None = None) -> None:
        ref, got = np.asarray(ref), np.asarray(got)
        if ref.dtype.kind not in "biuf" or got.dtype.kind not in "biuf":
            self.problem = f"{ref.dtype if ref.dtype.kind not in 'biuf' else got.dtype} values are not compared"
            return
        if ref.shape != got.shape:
            self.problem = f"shape {list(ref.shape)} in the original and {list(got.shape)} in the quantized model"
            return
        x = ref.astype(np.float64)
        y = got.astype(np.float64)
        if self.kind in (OutputKind.TOKENS, OutputKind.SEQUENCE_SCORES) and x.ndim >= 3:
            rows_x = x.reshape(x.shape[0] * x.shape[1], -1)
            rows_y = y.reshape(rows_x.shape)
            if mask is not None and x.shape[:2] == mask.shape:
                keep = mask.astype(bool).reshape(-1)
                rows_x, rows_y = rows_x[keep], rows_y[keep]
        else:
            rows_x = x.reshape(x.shape[0] if x.ndim else 1, -1)
            rows_y = y.reshape(rows_x.shape)
        bad = ~(np.isfinite(rows_x) & np.isfinite(rows_y))
        if bad.any():
            self.nonfinite += int(np.count_nonzero(bad))
            finite = ~bad.any(axis=1)
            rows_x, rows_y = rows_x[finite], rows_y[finite]
        if self.kind in _SCORES and rows_x.shape[1] > 1:
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
    def max_abs_error(self) -> float | None:
        return self.abs_max if self.comparable else None

    @property
    def mean_abs_error(self) -> float | None:
        return self.abs_sum / self.elements if self.comparable and self.elements else None

    def value(self, metric: FidelityMetric) -> float | None:
        if metric == FidelityMetric.AGREEMENT:
            return self.agreement
        if metric == FidelityMetric.SQNR:
            return self.sqnr_db
        return self.mean_cosine

    def judged(self, spec: FidelitySpec | None, *, counted: bool = True) -> OutputFidelity:
        """This output's row of the result, with the judge's verdict on it. `counted` False: the budget is
        the labels' top-1 drop alone, so no output counts toward it."""
        asked = spec.metric if spec is not None else FidelityMetric.AUTO
        metric = _AUTO_METRIC[self.kind] if asked == FidelityMetric.AUTO else FidelityMetric(asked)
        if metric == FidelityMetric.AGREEMENT and self.kind not in _SCORES:
            metric = FidelityMetric.COSINE  # agreement means nothing for embeddings
        value = finite_or_none(self.value(metric))
        floor = judge.floor_of(spec, metric)
        wanted = spec is None or not spec.outputs or self.name in spec.outputs
        return OutputFidelity(
            name=self.name,
            kind=self.kind.value,
            metric=metric.value,
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
        )


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

    def __init__(self, inputs: Sequence[TensorSpec], spec: FidelitySpec | None, tolerance: float) -> None:
        self.token_model = is_token_model(inputs)
        self.mask = mask_input(inputs)
        self.spec = spec
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
                acc = self.outputs[name] = OutputAccumulator(name, output_kind(r, token_model=self.token_model))
            acc.add(r, g, None if mask is None else np.asarray(mask))
        if batch.labels is not None:
            self._labels(batch.labels, names, ref, got)

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
        wanted = set(self.spec.outputs) if self.spec is not None and self.spec.outputs else set()
        unknown = sorted(wanted - set(names))
        if unknown:
            raise RuleError(
                "invalid_recipe",
                f"fidelity.outputs names output(s) the model does not have: {', '.join(unknown)}.",
                {"field": "fidelity.outputs", "unknown": unknown, "outputs": list(names)},
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
    the data is streamed from the dataset on every call, never held whole."""

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
    ) -> None:
        self.reference = Path(reference)
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

    def subset(self, max_samples: int) -> FidelityEvaluator:
        """The same evaluator on fewer samples (its own reference cache)."""
        return FidelityEvaluator(
            self.reference,
            self.data,
            self.inputs,
            self.spec,
            self.tolerance,
            batch_size=self.batch_size,
            max_samples=max_samples,
            threads=self.threads,
        )

    def batches(self) -> Iterator[Batch]:
        return evaluation_batches(self.data, self.inputs, self.batch_size, self.max_samples)

    def _reference(self) -> ort.InferenceSession:
        if self._ref_session is None:
            self._ref_session = load_session(self.reference, self._options, "original")
            self.names = [o.name for o in self._ref_session.get_outputs()]
        return self._ref_session

    def _reference_outputs(self, index: int, batch: Batch) -> list[np.ndarray]:
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
        session = load_session(Path(candidate), self._options, "candidate")
        if not self._cache_complete:
            self._reference()
        first_pass = self._cache is None and not self._cache_complete
        if first_pass:
            self._cache = []
        comparison = FidelityPass(self.inputs, self.spec, self.tolerance)
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

"""Fidelity budgets that match what an output means, and the evaluator that scores a candidate model.

Each output is one of four kinds, read from its first batch and the model's inputs:
- class scores `[B, C]` (C > 1): top-1 agreement with the float model;
- sequence scores `[B, T, C]` (C > 1): per-position argmax agreement;
- token outputs of a token model (one with integer inputs such as `input_ids`): mean per-token cosine;
- anything else: mean per-sample cosine (over all samples for an output with one value per sample,
  such as a probability `[B, 1]`: one value's cosine only says whether the signs agree).
In token models, 2-D and 3-D outputs are embeddings rather than scores (a sentence embedding
`[B, 384]` has no "class"), so they are compared by cosine. Positions that the model's attention
mask marks as padding are left out of token-level numbers. SQNR over the kept elements is recorded
for every output. With labels, the budget is the top-1 drop (`accuracy_tolerance`); a recipe's
`fidelity` adds its own floor on the outputs it names (all outputs when it names none).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine.data import Batch, iter_batches, synthesize_batch
from worker.engine.errors import EngineError
from worker.engine.metrics import (
    AccuracyAccumulator,
    cosine_from_sums,
    finite_or_none,
    is_class_scores,
    sqnr_from_energies,
)
from worker.engine.spec import DatasetSource, FidelityMetric, FidelitySpec, TensorSpec


class OutputKind(StrEnum):
    CLASS_SCORES = "class_scores"
    SEQUENCE_SCORES = "sequence_scores"
    TOKENS = "tokens"
    TENSOR = "tensor"


DEFAULT_FLOOR = 0.99
DEFAULT_SQNR_FLOOR_DB = 20.0
# Reference outputs are kept in memory up to this many bytes; past it the float model is re-run.
REFERENCE_CACHE_BYTES = 256 << 20
_AUTO_METRIC = {
    OutputKind.CLASS_SCORES: FidelityMetric.AGREEMENT,
    OutputKind.SEQUENCE_SCORES: FidelityMetric.AGREEMENT,
    OutputKind.TOKENS: FidelityMetric.COSINE,
    OutputKind.TENSOR: FidelityMetric.COSINE,
}


def floor_of(spec: FidelitySpec | None, metric: FidelityMetric) -> float:
    if spec is not None and spec.min is not None:
        return float(spec.min)
    return DEFAULT_SQNR_FLOOR_DB if metric == FidelityMetric.SQNR else DEFAULT_FLOOR


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
    """Running sums of one output's fidelity (O(1) memory in the number of samples)."""

    def __init__(self, name: str, kind: OutputKind) -> None:
        self.name = name
        self.kind = kind
        self.cos_sum = 0.0
        self.cos_rows = 0
        self.agree = 0
        self.positions = 0
        self.xx = 0.0
        self.ee = 0.0
        self.xy = 0.0
        self.yy = 0.0
        self.scalar_rows = True  # one value per row so far: see mean_cosine
        self.problem: str | None = None

    def add(self, ref: np.ndarray, got: np.ndarray, mask: np.ndarray | None) -> None:
        ref, got = np.asarray(ref), np.asarray(got)
        if ref.shape != got.shape:
            self.problem = f"shape {list(ref.shape)} in the reference and {list(got.shape)} in the candidate"
            return
        if ref.dtype.kind not in "biuf":
            self.problem = f"{ref.dtype} values are not compared"
            return
        x = ref.astype(np.float64)
        y = got.astype(np.float64)
        keep = None
        if mask is not None and x.ndim >= 2 and x.shape[:2] == mask.shape:
            keep = mask.astype(bool)
        if self.kind in (OutputKind.TOKENS, OutputKind.SEQUENCE_SCORES) and x.ndim >= 3:
            rows_x = x.reshape(x.shape[0] * x.shape[1], -1)
            rows_y = y.reshape(rows_x.shape)
            if keep is not None:
                rows_x, rows_y = rows_x[keep.reshape(-1)], rows_y[keep.reshape(-1)]
        else:
            rows_x = x.reshape(x.shape[0] if x.ndim else 1, -1)
            rows_y = y.reshape(rows_x.shape)
        finite = np.isfinite(rows_x).all(axis=1) & np.isfinite(rows_y).all(axis=1)
        rows_x, rows_y = rows_x[finite], rows_y[finite]
        if self.kind in (OutputKind.CLASS_SCORES, OutputKind.SEQUENCE_SCORES) and rows_x.shape[1] > 1:
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

    @property
    def mean_cosine(self) -> float | None:
        """Mean per-row cosine; for an output with one value per sample (a probability [B, 1]),
        where a row's cosine only says whether the signs agree, the cosine over all samples."""
        if not self.cos_rows or self.problem is not None:
            return None
        if self.scalar_rows:
            return cosine_from_sums(self.xx, self.yy, self.xy, self.ee)
        return self.cos_sum / self.cos_rows

    @property
    def sqnr_db(self) -> float | None:
        if self.problem is not None or not self.cos_rows:
            return None
        return sqnr_from_energies(self.xx, self.ee)

    @property
    def agreement(self) -> float | None:
        return self.agree / self.positions if self.positions and self.problem is None else None

    def value(self, metric: FidelityMetric) -> float | None:
        if metric == FidelityMetric.AGREEMENT:
            return self.agreement
        if metric == FidelityMetric.SQNR:
            return self.sqnr_db
        return self.mean_cosine


@dataclass
class OutputScore:
    name: str
    kind: OutputKind
    metric: FidelityMetric
    value: float | None
    floor: float
    budgeted: bool
    mean_cosine: float | None
    sqnr_db: float | None
    agreement: float | None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.value is not None and self.value >= self.floor - 1e-12

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": str(self.kind),
            "metric": str(self.metric),
            "value": finite_or_none(self.value),
            "min": self.floor,
            "budgeted": self.budgeted,
            "mean_cosine": finite_or_none(self.mean_cosine),
            "sqnr_db": finite_or_none(self.sqnr_db),
            "agreement": finite_or_none(self.agreement),
            "problem": self.problem,
        }


@dataclass
class Score:
    """A candidate's fidelity against the reference on the evaluation data, and its budget."""

    outputs: list[OutputScore]
    accuracy_drop: float | None = None
    tolerance: float = 0.01
    uses_fidelity: bool = True  # False: labels decide alone (no explicit `fidelity` in the recipe)
    samples: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def budgeted(self) -> list[OutputScore]:
        return [o for o in self.outputs if o.budgeted]

    @property
    def worst(self) -> OutputScore | None:
        """The budgeted output furthest below (or least above) its floor."""
        scored = [o for o in self.budgeted if o.value is not None]
        if not scored:
            return None
        return min(scored, key=lambda o: o.value - o.floor if o.value is not None else -math.inf)

    @property
    def fidelity(self) -> float | None:
        """One number per candidate (the worst budgeted output's metric value), for tables and plots."""
        worst = self.worst
        return None if worst is None else worst.value

    @property
    def metric(self) -> str:
        worst = self.worst
        if self.accuracy_drop is not None and not self.uses_fidelity:
            return "top1_drop"
        return str(worst.metric) if worst is not None else "none"

    @property
    def within_budget(self) -> bool:
        if self.accuracy_drop is not None:
            if self.accuracy_drop > self.tolerance + 1e-12:
                return False
            if not self.uses_fidelity:
                return True
        budgeted = self.budgeted
        return bool(budgeted) and all(o.ok for o in budgeted)

    def margin(self) -> float:
        """How far inside (> 0) or outside (< 0) the budget: for ordering candidates that all miss it."""
        parts = []
        if self.accuracy_drop is not None:
            parts.append(self.tolerance - self.accuracy_drop)
        if self.uses_fidelity or self.accuracy_drop is None:
            worst = self.worst
            parts.append(-math.inf if worst is None or worst.value is None else worst.value - worst.floor)
        return min(parts) if parts else -math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "fidelity": finite_or_none(self.fidelity),
            "within_budget": self.within_budget,
            "accuracy_drop": finite_or_none(self.accuracy_drop),
            "accuracy_tolerance": self.tolerance,
            "samples": self.samples,
            "outputs": [o.to_dict() for o in self.outputs],
            "notes": list(self.notes),
        }


class FidelityEvaluator:
    """Scores candidate models against the float reference on the same evaluation batches.

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
        from worker.engine.evaluate import session_options

        self.reference = Path(reference)
        self.data = data
        self.inputs = list(inputs)
        self.spec = spec
        self.tolerance = tolerance
        self.batch_size = max(1, batch_size)
        self.max_samples = max(1, max_samples)
        self.threads = threads
        self.token_model = is_token_model(self.inputs)
        self.mask = mask_input(self.inputs)
        self._options = session_options(threads or 1)
        self._ref_session: Any = None
        self._cache: list[list[np.ndarray]] | None = None
        self._cache_complete = False
        self.names: list[str] = []
        self.kinds: dict[str, OutputKind] = {}

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

    def _session(self, path: Path) -> Any:
        import onnxruntime as ort

        try:
            return ort.InferenceSession(str(path), sess_options=self._options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise EngineError(
                "evaluation_failed", f"ONNX Runtime could not load {path.name}: {str(exc).strip()[:300]}", {}
            ) from exc

    def batches(self) -> Iterator[Batch]:
        """The evaluation batches, up to `max_samples` samples (random ones when there is no data)."""
        if self.data is None:
            for seed in range(max(1, math.ceil(min(self.max_samples, 32) / self.batch_size))):
                yield synthesize_batch(self.inputs, seed=seed, batch=self.batch_size)
            return
        it = iter_batches(self.data, self.inputs, batch_size=self.batch_size)
        seen = 0
        try:
            for batch in it:
                yield batch
                seen += batch.num_samples
                if seen >= self.max_samples:
                    break
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _reference_outputs(self, index: int, batch: Batch) -> list[np.ndarray]:
        if self._cache_complete and self._cache is not None:
            return self._cache[index]
        if self._ref_session is None:
            self._ref_session = self._session(self.reference)
            self.names = [o.name for o in self._ref_session.get_outputs()]
        outs = [np.asarray(o) for o in self._ref_session.run(self.names, batch.feeds)]
        if self._cache is not None:
            size = sum(o.nbytes for c in self._cache for o in c) + sum(o.nbytes for o in outs)
            if size <= REFERENCE_CACHE_BYTES and len(self._cache) == index:
                self._cache.append(outs)
            else:
                self._cache = None
        return outs

    def score(self, candidate: Path) -> Score:
        session = self._session(candidate)
        if self._ref_session is None and not self._cache_complete:
            self._ref_session = self._session(self.reference)
            self.names = [o.name for o in self._ref_session.get_outputs()]
        first_pass = self._cache is None and not self._cache_complete
        if first_pass:
            self._cache = []
        wanted = set(self.spec.outputs) if self.spec is not None and self.spec.outputs else None
        accs: dict[str, OutputAccumulator] = {}
        accuracy = {"reference": AccuracyAccumulator(), "candidate": AccuracyAccumulator()}
        labels_output: str | None = None
        samples = 0
        for index, batch in enumerate(self.batches()):
            ref = self._reference_outputs(index, batch)
            try:
                got = session.run(self.names, batch.feeds)
            except Exception as exc:
                raise EngineError(
                    "evaluation_failed",
                    f"ONNX Runtime could not run {Path(candidate).name}: {str(exc).strip()[:300]}",
                    {},
                ) from exc
            mask = batch.feeds.get(self.mask) if self.mask else None
            for name, r, g in zip(self.names, ref, got, strict=True):
                if name not in accs:
                    kind = self.kinds.setdefault(name, output_kind(r, token_model=self.token_model))
                    accs[name] = OutputAccumulator(name, kind)
                accs[name].add(r, g, None if mask is None else np.asarray(mask))
            if batch.labels is not None:
                if labels_output is None:
                    labels_output = next(
                        (n for n, r in zip(self.names, ref, strict=True) if is_class_scores(np.asarray(r))), ""
                    )
                if labels_output:
                    k = self.names.index(labels_output)
                    if np.asarray(ref[k]).shape[0] == batch.labels.shape[0]:
                        accuracy["reference"].add(np.asarray(ref[k]), batch.labels)
                        accuracy["candidate"].add(np.asarray(got[k]), batch.labels)
            samples += batch.num_samples
        if first_pass and self._cache is not None:
            self._cache_complete = True
            self._ref_session = None
        del session
        metric = self.spec.metric if self.spec is not None else FidelityMetric.AUTO
        unknown = sorted(wanted - set(self.names)) if wanted else []
        if unknown:
            raise EngineError(
                "invalid_recipe",
                f"fidelity.outputs names output(s) the model does not have: {', '.join(unknown)}.",
                {"field": "fidelity.outputs", "unknown": unknown, "outputs": self.names},
            )
        outputs = []
        for name in self.names:
            acc = accs[name]
            chosen = _AUTO_METRIC[acc.kind] if metric == FidelityMetric.AUTO else metric
            if chosen == FidelityMetric.AGREEMENT and acc.kind not in (
                OutputKind.CLASS_SCORES,
                OutputKind.SEQUENCE_SCORES,
            ):
                chosen = FidelityMetric.COSINE  # agreement means nothing for embeddings
            outputs.append(
                OutputScore(
                    name=name,
                    kind=acc.kind,
                    metric=chosen,
                    value=acc.value(chosen),
                    floor=floor_of(self.spec, chosen),
                    budgeted=(wanted is None or name in wanted) and acc.problem is None,
                    mean_cosine=acc.mean_cosine,
                    sqnr_db=acc.sqnr_db,
                    agreement=acc.agreement,
                    problem=acc.problem,
                )
            )
        drop = None
        a0, a1 = accuracy["reference"].top1_accuracy, accuracy["candidate"].top1_accuracy
        if a0 is not None and a1 is not None:
            drop = a0 - a1
        return Score(
            outputs=outputs,
            accuracy_drop=drop,
            tolerance=self.tolerance,
            uses_fidelity=drop is None or self.spec is not None,
            samples=samples,
        )

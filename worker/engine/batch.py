"""One feed of a dataset: what `session.run` takes, with the class ids of its samples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Batch:
    """One `session.run` feed and the class ids of the samples in it (or None)."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    # How many dataset samples this feed holds (rows of a batched array, 1 for a stacked sample).
    num_samples: int = 1

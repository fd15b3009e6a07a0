"""Accuracy and agreement per presence pattern, for any predictor (PyTorch, engines, a served model), and the
statistics that compare them: the exact McNemar test of two classifiers on the same samples, spread over seeds."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from ume_edge.data import pattern_key, presence_patterns

Predictor = Callable[[dict[str, np.ndarray | None]], np.ndarray]


def predictions_by_pattern(predict: Predictor, inputs: dict[str, np.ndarray], patterns=None,
                           batch_size: int = 256) -> dict[str, np.ndarray]:
    """Predicted class per sample, for every presence pattern (absent modalities passed as ``None``)."""
    patterns = patterns or presence_patterns(list(inputs))
    count = len(next(iter(inputs.values())))
    results = {}
    for pattern in patterns:
        labels = []
        for start in range(0, count, batch_size):
            batch = {name: (x[start:start + batch_size] if name in pattern else None) for name, x in inputs.items()}
            labels.append(np.asarray(predict(batch)).argmax(1))
        results[pattern_key(pattern)] = np.concatenate(labels)
    return results


def percent_equal(a: np.ndarray, b: np.ndarray) -> float:
    return round(float(np.mean(a == b)) * 100.0, 2)


def accuracy_by_pattern(predict: Predictor, inputs, labels, patterns=None, batch_size: int = 256) -> dict[str, float]:
    """Test accuracy in percent per pattern key (``audio+image``, ``image``, ...)."""
    predicted = predictions_by_pattern(predict, inputs, patterns, batch_size)
    return {key: percent_equal(p, labels) for key, p in predicted.items()}


def mean_over_patterns(table: Mapping[str, float | None]) -> float:
    values = [v for v in table.values() if v is not None]
    return round(float(np.mean(values)), 2)


def discordant_pairs(predicted_a: np.ndarray, predicted_b: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """``(only a right, only b right)``: the samples on which two classifiers disagree about being correct."""
    right_a, right_b = predicted_a == labels, predicted_b == labels
    return int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))


def mcnemar_exact(only_a_right: int, only_b_right: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs against an even split."""
    n = only_a_right + only_b_right
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a_right, only_b_right) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def spread(values) -> dict[str, float | None]:
    """Mean, sample standard deviation (``None`` from a single value), min and max, rounded to 2 decimals."""
    values = np.asarray(list(values), dtype=np.float64)
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": round(float(values.mean()), 2), "sd": None if sd is None else round(sd, 2),
            "min": round(float(values.min()), 2), "max": round(float(values.max()), 2)}

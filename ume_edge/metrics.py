"""Accuracy and agreement per presence pattern, for any predictor (PyTorch, engines, a served model)."""

from __future__ import annotations

from typing import Callable

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


def mean_over_patterns(table: dict[str, float | None]) -> float:
    values = [v for v in table.values() if v is not None]
    return round(float(np.mean(values)), 2)

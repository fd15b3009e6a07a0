"""How to read the counters that know presence patterns, served on Triton's metrics endpoint by the entry model.

Both entry models (pipeline and BLS) keep, with ``contract.EntryMetrics`` through Triton's custom-metrics API
(``pb_utils.MetricFamily``):

| counter | labels | counts |
| --- | --- | --- |
| ``ume_requests_total`` | ``pattern`` | answered requests |
| ``ume_rows_total`` | ``pattern`` | their rows |
| ``ume_request_duration_us_total`` | ``pattern`` | cumulative microseconds of the entry model's run, per request |
| ``ume_rejected_total`` | ``reason`` | refused requests (``nan``, ``shape``, ``no_modality``, ``mask``, ...) |
| ``ume_batches_total`` | | calls of the pipeline |
| ``ume_batch_rows_total`` | | the rows those calls held |

A pattern is the present modalities' names, sorted and joined with ``+`` (``audio+image``). A request whose rows
carry different patterns (with a ``present`` mask) counts once per pattern, with that pattern's rows.
"""

from __future__ import annotations

import re

from ume_edge.serving.contract import BATCH_ROWS, BATCHES, DURATION, REJECTED, REQUESTS, ROWS, EntryMetrics

__all__ = ["BATCHES", "BATCH_ROWS", "DURATION", "REJECTED", "REQUESTS", "ROWS", "EntryMetrics", "by_label",
           "difference", "parse", "total"]

_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> ``{(name, ((label, value), ...)): value}`` for the ``ume_*`` samples."""
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match and match["name"].startswith("ume_"):
            labels = tuple(sorted(_LABEL.findall(match["labels"] or "")))
            samples[match["name"], labels] = float(match["value"])
    return samples


def by_label(samples: dict, name: str, label: str) -> dict[str, float]:
    """``{label value: total}`` of one counter (summed over other labels, such as Triton's model and version)."""
    totals: dict[str, float] = {}
    for (sample_name, labels), value in samples.items():
        found = dict(labels).get(label)
        if sample_name == name and found is not None:
            totals[found] = totals.get(found, 0.0) + value
    return totals


def total(samples: dict, name: str) -> float:
    return sum(value for (sample_name, _), value in samples.items() if sample_name == name)


def difference(after: dict, before: dict) -> dict:
    """What the counters counted between two scrapes."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}

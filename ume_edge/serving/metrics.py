"""Counters that know presence patterns, served on Triton's metrics endpoint by the entry model, and how to read them.

The entry model (Python backend) keeps, through Triton's custom-metrics API (``pb_utils.MetricFamily``):

| counter | labels | counts |
| --- | --- | --- |
| ``ume_requests_total`` | ``pattern`` | answered requests |
| ``ume_rows_total`` | ``pattern`` | their rows |
| ``ume_request_duration_us_total`` | ``pattern`` | cumulative microseconds of the entry model's execution, per request |
| ``ume_rejected_total`` | ``reason`` | refused requests (``nan``, ``shape``, ``no_modality``, ``mask``, ...) |
| ``ume_batches_total`` | | calls of the pipeline |
| ``ume_batch_rows_total`` | | the rows those calls held |

A pattern is the present modalities' names, sorted and joined with ``+`` (``audio+image``). A request whose rows
carry different patterns (with a ``present`` mask) counts once per pattern, with that pattern's rows.
"""

from __future__ import annotations

import re
import threading
from collections import Counter

REQUESTS = "ume_requests_total"
ROWS = "ume_rows_total"
DURATION = "ume_request_duration_us_total"
REJECTED = "ume_rejected_total"
BATCHES = "ume_batches_total"
BATCH_ROWS = "ume_batch_rows_total"
DESCRIPTIONS = {
    REQUESTS: "Requests answered, by presence pattern",
    ROWS: "Rows of the answered requests, by presence pattern",
    DURATION: "Cumulative microseconds of entry-model execution per request, by presence pattern",
    REJECTED: "Requests refused, by reason",
    BATCHES: "Pipeline calls of the entry model",
    BATCH_ROWS: "Rows of those pipeline calls",
}
_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class EntryMetrics:
    """The entry model's counters; ``pb_utils`` is Triton's ``triton_python_backend_utils`` (only the stub has it).

    Each update of a Triton metric is a round trip from the Python stub to the server (measured here: about 90 us),
    so the counts are kept here and handed to Triton by a background thread every ``FLUSH_S`` seconds (and at
    ``close``): the endpoint lags the requests by at most that, and a request pays nothing for being counted."""

    FLUSH_S = 0.1

    def __init__(self, pb_utils):
        kind = pb_utils.MetricFamily.COUNTER
        self._families = {name: pb_utils.MetricFamily(name=name, description=text, kind=kind)
                          for name, text in DESCRIPTIONS.items()}
        self._metrics, self._pending, self._lock = {}, Counter(), threading.Lock()
        for name in (BATCHES, BATCH_ROWS):
            self._add(name, 0)
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_until_stopped, name="ume-metrics", daemon=True)
        self._flusher.start()

    def _add(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._pending[name, tuple(sorted(labels.items()))] += value

    def _flush_until_stopped(self) -> None:
        while not self._stop.wait(self.FLUSH_S):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, Counter()
        for (name, labels), value in pending.items():
            if (name, labels) not in self._metrics:
                self._metrics[name, labels] = self._families[name].Metric(labels=dict(labels))
            self._metrics[name, labels].increment(value)

    def close(self) -> None:
        self._stop.set()
        self._flusher.join()
        self.flush()

    def answered(self, patterns: list[str], duration_us: float) -> None:
        """One answered request whose rows have ``patterns``; the entry model took ``duration_us`` for its batch."""
        for pattern, rows in Counter(patterns).items():
            self._add(REQUESTS, 1, pattern=pattern)
            self._add(ROWS, rows, pattern=pattern)
            self._add(DURATION, duration_us, pattern=pattern)

    def rejected(self, reason: str) -> None:
        self._add(REJECTED, 1, reason=reason)

    def batch(self, rows: int) -> None:
        self._add(BATCHES, 1)
        self._add(BATCH_ROWS, rows)


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

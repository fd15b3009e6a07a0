"""Per-sensor health from a ``SensorSync``'s ``stats()``: a Markdown table for a report, and Prometheus metrics for
a robot's monitoring.

    print(sensor_table(sync.stats(), duration_s))  # after a replay of duration_s seconds
    metrics = SensorMetrics(sync)
    metrics.start(9108, "0.0.0.0")                 # http://robot:9108/metrics, until metrics.stop()

The table has a row per sensor: readings received per second over ``duration_s``, the share of them included in an
emitted frame, the frames that held an older reading (hold-last), the age at emit (p50 and p99, ms) and the readings
dropped by reason. ``ume_edge.sync`` defines each figure.

The metrics carry the same figures, each labelled by ``modality``, read from ``stats()`` when Prometheus scrapes
(a collector, so they are never stale and cost nothing between scrapes), in a registry of their own:

- ``ume_sensor_readings_received_total``, ``ume_sensor_readings_included_total``, ``ume_sensor_readings_held_total``
  (counters) and ``ume_sensor_readings_pending`` (a gauge: readings in frames still open);
- ``ume_sensor_readings_dropped_total``, labelled by ``reason`` as well;
- ``ume_sensor_age_seconds``, a gauge labelled by ``quantile`` (``0.5``, ``0.99``): the age at emit in seconds,
  Prometheus's unit, absent until a reading has been emitted;
- the frames, not labelled by modality: ``ume_sensor_frames_emitted_total``, ``ume_sensor_frames_evicted_total``,
  ``ume_sensor_frames_dropped_total`` (by ``reason``) and ``ume_sensor_frames_open``.

The rate of readings is Prometheus's to compute (``rate(ume_sensor_readings_received_total[1m])``).
``prometheus-client`` is imported only when a ``SensorMetrics`` is made, so the client runs without it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from ume_edge.sync import SensorSync

LOGGER = logging.getLogger(__name__)

COLUMNS = ("sensor", "readings/s", "included", "held", "age p50 ms", "age p99 ms", "dropped")
QUANTILES = (("0.5", "p50"), ("0.99", "p99"))


def sensor_table(stats: dict[str, Any], duration_s: float | None) -> str:
    """A Markdown table of ``SensorSync.stats()``, one row per sensor; rates over ``duration_s`` seconds (``None``:
    no rate, as for a replay not paced in time)."""
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    rows = [COLUMNS, ("---",) * len(COLUMNS)]
    rows += [_sensor_row(name, sensor, duration_s) for name, sensor in stats["modalities"].items()]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _sensor_row(name: str, sensor: dict[str, Any], duration_s: float | None) -> tuple[str, ...]:
    received, ages = sensor["received"], sensor["age_ms"]
    included = f"{100 * sensor['included'] / received:.1f}%" if received else "-"
    dropped = ", ".join(f"{reason} {count}" for reason, count in sensor["dropped"].items() if count) or "0"
    rate = "-" if duration_s is None else f"{received / duration_s:.1f}"
    return (name, rate, included, str(sensor["held"]), _ms(ages["p50"]), _ms(ages["p99"]),
            dropped)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


class SensorMetrics:
    """The figures of ``sync.stats()`` as Prometheus metrics, in a registry of this instance's own."""

    def __init__(self, sync: SensorSync):
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_SyncCollector(sync))
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread (port 0: any free port); returns the port.
        Loopback by default: pass ``"0.0.0.0"`` for a Prometheus on another machine."""
        from prometheus_client import start_http_server

        if self._server is not None:
            raise RuntimeError(f"the sensor metrics are already served on port {self._server.server_port}")
        self._server, self._thread = start_http_server(port, addr, registry=self.registry)
        LOGGER.info("sensor metrics on http://%s:%d/metrics", addr, self._server.server_port)
        return int(self._server.server_port)

    def stop(self) -> None:
        """Stop serving; the port is free when this returns."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None


class _SyncCollector:
    """Reads the sync's statistics at each scrape."""

    def __init__(self, sync: SensorSync):
        self.sync = sync

    def collect(self) -> Iterator[Any]:
        stats = self.sync.stats()
        yield from _sensor_families(stats["modalities"])
        yield from _frame_families(stats["frames"])


def _sensor_families(sensors: dict[str, Any]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    for figure, kind, text in (("received", CounterMetricFamily, "readings pushed"),
                               ("included", CounterMetricFamily, "readings emitted in a frame"),
                               ("held", CounterMetricFamily, "frames that carried an older reading (hold-last)"),
                               ("pending", GaugeMetricFamily, "readings in frames still open")):
        family = kind(f"ume_sensor_readings_{figure}", f"Per sensor: {text}", labels=["modality"])
        for name, sensor in sensors.items():
            family.add_metric([name], sensor[figure])
        yield family
    dropped = CounterMetricFamily("ume_sensor_readings_dropped", "Per sensor: readings left out, by reason",
                                  labels=["modality", "reason"])
    ages = GaugeMetricFamily("ume_sensor_age_seconds", "Per sensor: age at emit, from a reading's arrival to its "
                             "frame's emission, over the last readings", labels=["modality", "quantile"])
    for name, sensor in sensors.items():
        for reason, count in sensor["dropped"].items():
            dropped.add_metric([name, reason], count)
        for quantile, key in QUANTILES:
            if sensor["age_ms"][key] is not None:
                ages.add_metric([name, quantile], sensor["age_ms"][key] / 1e3)
    yield dropped
    yield ages


def _frame_families(frames: dict[str, Any]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    yield CounterMetricFamily("ume_sensor_frames_emitted", "Frames emitted", value=frames["emitted"])
    yield CounterMetricFamily("ume_sensor_frames_evicted", "Frames that left early because too many were open",
                              value=frames["evicted"])
    dropped = CounterMetricFamily("ume_sensor_frames_dropped", "Frames dropped, by reason", labels=["reason"])
    for reason, count in frames["dropped"].items():
        dropped.add_metric([reason], count)
    yield dropped
    yield GaugeMetricFamily("ume_sensor_frames_open", "Frames open now", value=frames["open"])

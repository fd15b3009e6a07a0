"""``ume_edge.client.sensor_health``: the per-sensor table and the Prometheus metrics, both from a real SensorSync's
statistics; the metrics scraped over HTTP from the server they start."""

import math
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from ume_edge.client.sensor_health import SensorMetrics, sensor_table
from ume_edge.sync import SensorSync


@pytest.fixture
def sync(clock):
    """Two frames (the second holds the first's audio), a stale image and a broken audio stamp; lidar is silent."""
    sync = SensorSync(["audio", "image", "lidar"], deadline_ms=30, window_ms=10, clock=clock,
                      max_age_ms={"audio": 200})
    sync.push("image", 1.0, "i0")
    clock.advance_ms(5)
    sync.push("audio", 1.0, "a0")
    clock.advance_ms(30)
    assert len(sync.poll()) == 1  # past its deadline: the image waited 35 ms, the audio 30
    sync.push("image", 1.1, "i1")
    clock.advance_ms(30)
    (held,) = sync.poll()  # the image waited 30 ms
    assert held.held == ("audio",)  # 60 ms after the audio arrived
    sync.push("image", 1.0, "late")
    sync.push("audio", math.nan, "broken")
    return sync


def test_the_table_has_a_row_per_sensor(sync):
    assert sensor_table(sync.stats(), duration_s=2.0) == "\n".join([
        "| sensor | readings/s | included | held | age p50 ms | age p99 ms | dropped |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        "| audio | 1.0 | 50.0% | 1 | 30.0 | 60.0 | non_finite 1 |",
        "| image | 1.5 | 66.7% | 0 | 30.0 | 35.0 | stale 1 |",
        "| lidar | 0.0 | - | 0 | - | - | 0 |",
    ])
    with pytest.raises(ValueError, match="duration_s"):
        sensor_table(sync.stats(), duration_s=0)


def _scrape(port):
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _expected(stats):
    """What the metrics must say, written out from stats()."""
    expected = {}
    for name, sensor in stats["modalities"].items():
        for figure in ("received", "included", "held"):
            expected[(f"ume_sensor_readings_{figure}_total", (("modality", name),))] = sensor[figure]
        expected[("ume_sensor_readings_pending", (("modality", name),))] = sensor["pending"]
        for reason, count in sensor["dropped"].items():
            expected[("ume_sensor_readings_dropped_total", (("modality", name), ("reason", reason)))] = count
        for quantile, key in (("0.5", "p50"), ("0.99", "p99")):
            if sensor["age_ms"][key] is not None:
                labels = (("modality", name), ("quantile", quantile))
                expected[("ume_sensor_age_seconds", labels)] = pytest.approx(sensor["age_ms"][key] / 1e3)
    frames = stats["frames"]
    expected[("ume_sensor_frames_emitted_total", ())] = frames["emitted"]
    expected[("ume_sensor_frames_evicted_total", ())] = frames["evicted"]
    expected[("ume_sensor_frames_open", ())] = frames["open"]
    for reason, count in frames["dropped"].items():
        expected[("ume_sensor_frames_dropped_total", (("reason", reason),))] = count
    return expected


def test_the_metrics_served_over_http_equal_the_stats(sync, clock):
    pytest.importorskip("prometheus_client")
    metrics = SensorMetrics(sync)
    port = metrics.start(0)
    try:
        scraped = _scrape(port)
        assert scraped == _expected(sync.stats())
        assert scraped[("ume_sensor_age_seconds", (("modality", "audio"), ("quantile", "0.99")))] == pytest.approx(0.06)
        assert ("ume_sensor_age_seconds", (("modality", "lidar"), ("quantile", "0.5"))) not in scraped
        sync.push("lidar", 1.2, "l2")  # read at each scrape: a new reading shows at once
        scraped = _scrape(port)
        assert scraped[("ume_sensor_readings_received_total", (("modality", "lidar"),))] == 1
        assert scraped == _expected(sync.stats())
    finally:
        metrics.stop()
    with pytest.raises(urllib.error.URLError):
        _scrape(port)


def test_each_instance_has_its_own_registry(sync):
    prometheus_client = pytest.importorskip("prometheus_client")
    first, second = SensorMetrics(sync), SensorMetrics(sync)  # a shared registry would refuse the second
    assert first.registry is not second.registry
    assert first.registry.get_sample_value("ume_sensor_frames_emitted_total") == 2
    assert prometheus_client.REGISTRY.get_sample_value("ume_sensor_frames_emitted_total") is None
    port = first.start(0)
    try:
        with pytest.raises(RuntimeError, match=f"already served on port {port}"):
            first.start(0)
    finally:
        first.stop()


def test_the_module_imports_without_prometheus_client():
    code = ("import sys; import ume_edge.client.sensor_health; "
            "assert 'prometheus_client' not in sys.modules, 'imported at import time'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

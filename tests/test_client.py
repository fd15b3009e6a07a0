"""``python -m ume_edge.client``: the sensor simulation, and a replay against the PyTriton server."""

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from ume_edge.client import SensorModel, format_report, parse_modality_values, run_client
from ume_edge.data import pattern_key, presence_patterns
from ume_edge.serve import ServeProcess
from ume_edge.tritonserver import free_ports

MODALITIES = ["audio", "image"]


def test_parse_modality_values():
    assert parse_modality_values("image=0.2, audio=0.3", "--drop") == {"image": 0.2, "audio": 0.3}
    assert parse_modality_values("", "--drop") == {}
    for bad in ("image", "image=x", "=0.2"):
        with pytest.raises(ValueError, match="name=value"):
            parse_modality_values(bad, "--drop")


def test_drops_never_produce_an_empty_request():
    sensors = SensorModel(MODALITIES, drop={"audio": 0.9, "image": 0.9}, deadline_ms=2.0,
                          jitter_ms={"audio": 5.0, "image": 5.0})
    rng = np.random.default_rng(0)
    plans = [sensors.plan(i, rng) for i in range(5000)]
    assert all(plan.present for plan in plans)
    assert {pattern_key(plan.present) for plan in plans} == {pattern_key(p) for p in presence_patterns(MODALITIES)}
    for plan in plans:
        assert not set(plan.present) & (set(plan.dropped) | set(plan.late))
        assert plan.wait_s <= 2.0e-3 + 1e-12


def test_drop_rates_and_deadline_follow_the_settings():
    rng = np.random.default_rng(1)
    sensors = SensorModel(MODALITIES, drop={"image": 0.3})
    plans = [sensors.plan(i, rng) for i in range(20000)]
    image_rate = np.mean(["image" in plan.present for plan in plans])
    assert 0.65 < image_rate < 0.75  # 0.7 kept (never re-drawn: audio is always there)
    assert all("audio" in plan.present for plan in plans)
    late = SensorModel(MODALITIES, jitter_ms={"audio": 50.0, "image": 0.01}, deadline_ms=1.0)
    plans = [late.plan(i, rng) for i in range(2000)]
    assert np.mean(["audio" in plan.late for plan in plans]) > 0.9


def test_sensor_settings_are_checked():
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        SensorModel(MODALITIES, drop={"video": 0.1})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SensorModel(MODALITIES, drop={"audio": 1.0})


@pytest.fixture(scope="module")
def server(int8_engines):
    pytest.importorskip("pytriton")  # ships the tritonserver binary
    grpc_port, http_port, metrics_port = free_ports(3)
    process = ServeProcess(int8_engines, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port)
    process.start(timeout_s=180)
    yield process
    assert process.stop(signal.SIGTERM) == 0, process.log_tail()


@pytest.mark.triton
def test_replay_reports_accuracy_per_pattern_and_latency(server, tmp_path):
    out = tmp_path / "summary.json"
    summary = run_client(url=server.grpc_url, drop={"image": 0.3, "audio": 0.3}, concurrency=4, requests=400,
                         seed=3, json_out=out)
    assert summary["requests"] == summary["answered"] == 400 and summary["errors"] == 0
    assert set(summary["per_pattern"]) == {pattern_key(p) for p in presence_patterns(MODALITIES)}
    assert sum(row["count"] for row in summary["per_pattern"].values()) == 400
    for row in summary["per_pattern"].values():
        assert 0.0 <= row["accuracy"] <= 1.0
    latency = summary["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
    assert summary["throughput_rps"] > 0
    assert summary["accuracy"] > 0.5  # the reference model is far better than chance (0.1) on every pattern
    assert json.loads(out.read_text())["per_pattern"] == summary["per_pattern"]
    assert "p50" in format_report(summary) and "audio+image" in format_report(summary)


@pytest.mark.triton
def test_deadline_and_rate_leave_late_sensors_out(server):
    summary = run_client(url=server.grpc_url, jitter_ms={"audio": 20.0, "image": 0.5}, deadline_ms=5.0,
                         rate=400.0, requests=120, seed=5)
    assert summary["errors"] == 0
    assert summary["late"].get("audio", 0) > 40
    assert summary["per_pattern"]["image"]["count"] >= summary["late"]["audio"]
    assert summary["wall_s"] >= 120 / 400.0


@pytest.mark.triton
def test_command_line_prints_the_report(server):
    result = subprocess.run([sys.executable, "-m", "ume_edge.client", "--url", server.grpc_url, "--requests", "50",
                             "--drop", "image=0.5", "--concurrency", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "50/50 answered" in result.stdout and "p99" in result.stdout
    assert "[" in result.stderr and "50/50 requests" in result.stderr  # the progress bar


def test_command_line_explains_an_unreachable_server():
    (port,) = free_ports(1)
    result = subprocess.run([sys.executable, "-m", "ume_edge.client", "--url", f"localhost:{port}",
                             "--requests", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "python -m ume_edge.serve" in result.stderr

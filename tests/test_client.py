"""``python -m ume_edge.client``: the sensor simulation, giving up on a failing server, and a replay against the
PyTriton server."""

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent import futures

import numpy as np
import pytest

from ume_edge.client import ClientOptions, format_report, run_client
from ume_edge.client.cli import main, parse_modality_values
from ume_edge.client.options import DEFAULT_MAX_FAILURES
from ume_edge.client.simulation import MAX_LOST_SAMPLES, SensorModel, SensorReplay
from ume_edge.data import pattern_key, presence_patterns
from ume_edge.serving.server_config import free_ports

MODALITIES = ["audio", "image"]


def replay(sensors, count, seed=0, period_s=60.0, samples=800):
    return SensorReplay(sensors, samples, np.random.default_rng(seed), period_s).requests(count)


def test_parse_modality_values():
    assert parse_modality_values("image=0.2, audio=0.3", "--drop") == {"image": 0.2, "audio": 0.3}
    assert parse_modality_values("", "--drop") == {}
    for bad in ("image", "image=x", "=0.2"):
        with pytest.raises(ValueError, match="name=value"):
            parse_modality_values(bad, "--drop")


def test_frames_become_requests_never_empty_and_never_waiting_past_the_deadline():
    sensors = SensorModel(MODALITIES, drop={"audio": 0.9, "image": 0.9}, deadline_ms=2.0,
                          jitter_ms={"audio": 5.0, "image": 5.0})
    requests = replay(sensors, 3000)
    assert len(requests) == 3000 and all(request.present for request in requests)
    assert {pattern_key(r.present) for r in requests} == {pattern_key(p) for p in presence_patterns(MODALITIES)}
    for request in requests:
        assert not set(request.present) & (set(request.dropped) | set(request.late))
        assert set(request.present) | set(request.dropped) | set(request.late) == set(MODALITIES)
        assert request.sample == round(request.captured_s / 60.0) % 800
    assert [r.captured_s for r in requests] == sorted({r.captured_s for r in requests})
    assert [r.send_at_s for r in requests] == sorted(r.send_at_s for r in requests)


def test_a_frame_leaves_at_the_deadline_counted_from_its_first_reading():
    sensors = SensorModel(MODALITIES, jitter_ms={"audio": 50.0, "image": 0.01}, deadline_ms=1.0)
    for request in replay(sensors, 500):
        wait_s = request.send_at_s - request.captured_s
        if request.late:
            assert request.late == ("audio",) and 1.0e-3 <= wait_s <= 1.5e-3
        else:
            assert wait_s <= 1.5e-3


def test_drop_rates_and_deadline_follow_the_settings():
    requests = replay(SensorModel(MODALITIES, drop={"image": 0.3}), 20000, seed=1)
    image_rate = np.mean(["image" in request.present for request in requests])
    assert 0.65 < image_rate < 0.75  # 0.7 kept (no sample is lost entirely: audio is always there)
    assert all("audio" in request.present for request in requests)
    assert not any(request.late for request in requests)  # the default deadline waits out the jitter
    late = SensorModel(MODALITIES, jitter_ms={"audio": 50.0, "image": 0.01}, deadline_ms=1.0)
    assert np.mean(["audio" in request.late for request in replay(late, 2000, seed=1)]) > 0.9


def test_a_fast_stream_keeps_samples_apart_and_counts_late_readings_in_the_sync():
    sensors = SensorModel(MODALITIES, jitter_ms={"audio": 20.0, "image": 0.5}, deadline_ms=5.0)
    replayed = SensorReplay(sensors, 800, np.random.default_rng(5), period_s=1 / 400)
    requests = replayed.requests(300)
    samples = [r.sample for r in requests]
    assert samples == sorted(set(samples)) and samples[-1] < 310  # one frame per sample, rarely none (all stale)
    late = sum(len(r.late) for r in requests)
    assert 0.6 < late / 300 < 0.9  # P(audio arrives > 5 ms after image) = exp(-5/20) = 0.78
    counted = replayed.sync.dropped
    assert counted["duplicate"] == counted["non_finite"] == 0
    assert abs(counted["stale"] + counted["out_of_order"] - late) <= 20  # the last few are still on their way


def test_sensor_settings_are_checked():
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        SensorModel(MODALITIES, drop={"video": 0.1})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SensorModel(MODALITIES, drop={"audio": 1.0})
    with pytest.raises(ValueError, match="--deadline-ms"):
        SensorModel(MODALITIES, deadline_ms=0)
    assert SensorModel(MODALITIES, jitter_ms={"image": 7.0}).deadline_ms == 80.0  # 10 x the audio default 8 ms
    with pytest.raises(ValueError, match=f"{MAX_LOST_SAMPLES} samples in a row"):
        replay(SensorModel(MODALITIES, drop={"audio": 0.99999, "image": 0.99999}), 1)


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    entries = capsys.readouterr().out.split("options:")[1].split("\n  -")[1:]
    assert len(entries) == 29 and any(entry.startswith("-max-failures") for entry in entries)
    assert any(entry.startswith("-recording") for entry in entries)
    for entry in entries:
        assert entry.startswith("h, --help") or "default" in entry, entry

@pytest.mark.parametrize("flags, message", [
    (["--concurrency", "0"], "--concurrency must be at least 1, got 0"),
    (["--rate", "-5"], "--rate must be positive, got -5.0"),
    (["--timeout-s", "0"], "--timeout-s must be positive, got 0.0"),
    (["--max-failures", "-1"], "--max-failures must be 0 (never stop) or more, got -1"),
])
def test_bad_options_are_one_line_before_anything_is_sent(flags, message, capsys):
    with socket.socket() as listener:  # a server that would take the connection, and must never see one
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0)
        assert main(["--url", f"127.0.0.1:{listener.getsockname()[1]}", "--no-progress", *flags]) == 2
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert capsys.readouterr().err == f"error: {message}\n"



# ---------------------------------------------------------------------------------------------------------------
# servers that fail: the client gives up within --timeout-s, or after --max-failures failed requests in a row


class FakeTriton:
    """A gRPC server on 127.0.0.1 with the ``ume`` model's metadata; it answers the first ``answers`` inferences
    with label 0, then fails (``then="fail"``) or never answers (``"hang"``) the rest."""

    def __init__(self, answers: int, then: str):
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self.answers, self.then, self.calls = answers, then, 0
        self.release = threading.Event()
        self._pb2, self._lock = service_pb2, threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        servicer = type("Servicer", (service_pb2_grpc.GRPCInferenceServiceServicer,),
                        {"ModelMetadata": self.model_metadata, "ModelInfer": self.model_infer})
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer(), self.server)
        self.url = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def stop(self):
        self.release.set()
        self.server.stop(grace=0)

    def model_metadata(self, request, context):
        tensor = self._pb2.ModelMetadataResponse.TensorMetadata
        return self._pb2.ModelMetadataResponse(name=request.name, inputs=[
            tensor(name="audio", datatype="FP32", shape=[-1, 1, 40, 48]),
            tensor(name="image", datatype="FP32", shape=[-1, 1, 28, 28])])

    def model_infer(self, request, context):
        import grpc

        with self._lock:
            self.calls += 1
            call = self.calls
        if call <= self.answers:
            output = self._pb2.ModelInferResponse.InferOutputTensor(name="label", datatype="INT64", shape=[1])
            return self._pb2.ModelInferResponse(model_name=request.model_name, outputs=[output],
                                                raw_output_contents=[np.zeros(1, np.int64).tobytes()])
        if self.then == "hang":
            self.release.wait(timeout=30)
        context.abort(grpc.StatusCode.UNAVAILABLE, "the model is gone")


@pytest.fixture
def fake_triton():
    servers = []

    def start(answers=0, then="fail"):
        servers.append(FakeTriton(answers, then))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def _timed_main(args):
    start = time.monotonic()
    code = main([*args, "--no-progress"])
    return code, time.monotonic() - start


def test_a_server_that_never_answers_costs_one_timeout(capsys):
    with socket.socket() as silent:  # accepts connections (the kernel does), never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        code, elapsed = _timed_main(["--url", f"127.0.0.1:{silent.getsockname()[1]}", "--timeout-s", "1",
                                     "--requests", "50"])
    assert code == 1 and elapsed < 4, elapsed
    assert "python -m ume_edge.serve" in capsys.readouterr().err


def test_max_failures_stops_sending_and_reports_what_came_back(fake_triton, capsys):
    server = fake_triton(answers=5, then="fail")
    code, _ = _timed_main(["--url", server.url, "--requests", "200", "--max-failures", "3"])
    out = capsys.readouterr().out
    assert code == 1 and server.calls == 8
    assert "5/8 answered, 3 errors" in out and "accuracy" in out and "the model is gone" in out
    assert "stopped after 3 failed requests in a row (--max-failures 3); sent 8 of 200" in out


def test_a_server_that_hangs_is_given_up_after_max_failures_timeouts(fake_triton, capsys):
    server = fake_triton(then="hang")
    code, elapsed = _timed_main(["--url", server.url, "--requests", "100", "--timeout-s", "0.5",
                                 "--concurrency", "2", "--max-failures", "2"])
    out = capsys.readouterr().out
    assert code == 1 and server.calls <= 4 and elapsed < 4, (server.calls, elapsed)
    assert f"0/{server.calls} answered" in out and "stopped after 2 failed requests in a row" in out


def test_max_failures_0_never_stops(fake_triton, capsys):
    server = fake_triton(then="fail")
    summary = run_client(ClientOptions(url=server.url, requests=30, max_failures=0))
    assert summary["requests"] == summary["errors"] == server.calls == 30 and summary["stopped"] is None
    assert DEFAULT_MAX_FAILURES == 10


@pytest.fixture(scope="module")
def server(served_reference):
    return served_reference


@pytest.mark.triton
def test_replay_reports_accuracy_per_pattern_and_latency(server, tmp_path):
    out = tmp_path / "summary.json"
    summary = run_client(ClientOptions(url=server.grpc_url, drop={"image": 0.3, "audio": 0.3}, concurrency=4,
                                       requests=400, seed=3, json_out=out))
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
    summary = run_client(ClientOptions(url=server.grpc_url, jitter_ms={"audio": 20.0, "image": 0.5}, deadline_ms=5.0,
                                       rate=400.0, requests=120, seed=5))
    assert summary["errors"] == 0
    assert summary["late"].get("audio", 0) > 40
    assert summary["per_pattern"]["image"]["count"] >= summary["late"]["audio"]
    assert summary["wall_s"] >= 119 / 400.0  # the last sample is captured at 119 / 400 s
    sensors = summary["sensors"]
    for name, sensor in sensors["modalities"].items():
        assert sensor["received"] == sensor["included"] + sensor["pending"] + sum(sensor["dropped"].values()), name
    assert sensors["modalities"]["audio"]["dropped"]["stale"] > 40  # late readings: their frame had left
    assert sensors["frames"]["emitted"] >= summary["requests"] and sensors["duration_s"] >= 119 / 400.0
    table = format_report(summary).split("sensors:")[1]
    assert "| audio |" in table and "| image |" in table and "readings/s" in table


@pytest.mark.triton
def test_command_line_prints_the_report(server):
    result = subprocess.run([sys.executable, "-m", "ume_edge.client", "--url", server.grpc_url, "--requests", "50",
                             "--drop", "image=0.5", "--concurrency", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "50/50 answered" in result.stdout and "p99" in result.stdout
    assert "[" in result.stderr and "50/50 requests" in result.stderr  # the progress bar
    assert "server (entry-model metrics)" not in result.stdout  # --url's host has no metrics on port 8002 here
    assert "sensors:" in result.stdout and "| audio | - |" in result.stdout  # unpaced: no rate to tell


@pytest.mark.triton
def test_metrics_port_serves_the_sensor_figures_while_the_replay_runs(server):
    """What a robot's Prometheus would scrape: ``ume_sensor_*`` by modality, from the replay's SensorSync."""
    parser = pytest.importorskip("prometheus_client.parser")
    (port,) = free_ports(1)
    client = subprocess.Popen([sys.executable, "-m", "ume_edge.client", "--url", server.grpc_url, "--requests", "300",
                               "--rate", "100", "--drop", "image=0.5", "--metrics-port", str(port), "--no-progress",
                               "--metrics-url", "none"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    families = {}
    deadline = time.monotonic() + 30
    while not families and time.monotonic() < deadline and client.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                families = {f.name: f for f in parser.text_string_to_metric_families(response.read().decode())}
        except OSError:
            time.sleep(0.1)
    stdout, stderr = client.communicate(timeout=60)
    assert client.returncode == 0, stderr
    received = {s.labels["modality"]: s.value for s in families["ume_sensor_readings_received"].samples
                if s.name.endswith("_total")}
    assert set(received) == {"audio", "image"} and received["audio"] > 0
    assert "sensors:" in stdout and "| image |" in stdout


@pytest.mark.triton
def test_the_mask_changes_batching_not_answers_and_the_server_counts_it(server):
    plain, masked = (run_client(ClientOptions(url=server.grpc_url, drop={"image": 0.4, "audio": 0.4}, concurrency=8,
                                              requests=200, seed=7, send_mask=mask, metrics_url=server.metrics_url))
                     for mask in (False, True))
    assert masked["errors"] == plain["errors"] == 0
    assert masked["per_pattern"] == plain["per_pattern"]
    for summary in (plain, masked):
        counted = summary["server"]["per_pattern"]
        assert {key: row["requests"] for key, row in counted.items()} == \
            {key: row["count"] for key, row in summary["per_pattern"].items()}
        assert summary["server"]["rows_per_batch"] >= 1.0
    assert "pipeline calls:" in format_report(masked)


def test_command_line_explains_an_unreachable_server():
    (port,) = free_ports(1)
    result = subprocess.run([sys.executable, "-m", "ume_edge.client", "--url", f"localhost:{port}",
                             "--requests", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "python -m ume_edge.serve" in result.stderr

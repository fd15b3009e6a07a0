"""The served model over real gRPC (server started by a fixture, the real tritonserver underneath), per presence
pattern at batch 1, for both serving runtimes; the serving targets; and memory.

Targets (this 2-core machine, one run; the client shares the cores with the server):
- batch-1 gRPC p50 <= in-process ``Pipeline.infer`` p50 + 1.5 ms;
- throughput at concurrency 16 >= 4x that at concurrency 1 (dynamic batching doing its job).
"""

import signal
import time
from pathlib import Path

import pytest

from cases import PATTERNS, Check, Timed, batch_of, case_name, record
from ume_edge.data import pattern_key

grpcclient = pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton")
RUNTIMES = ("pytriton", "python-backend")


@pytest.fixture(scope="module", params=RUNTIMES)
def server(request, engine_dirs):
    from ume_edge.serve import ServeProcess
    from ume_edge.serving.process import Endpoints, free_ports

    process = ServeProcess(engine_dirs["int8"], Endpoints("127.0.0.1", *free_ports(3)), runtime=request.param)
    process.start(timeout_s=180)
    yield process
    process.stop(signal.SIGTERM)


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as connection:
        yield connection


def _request(client, inputs):
    from ume_edge.client import grpc_inputs

    present = {n: x for n, x in inputs.items() if x is not None}
    return lambda: client.infer("ume", grpc_inputs(present))


@pytest.mark.parametrize("pattern", PATTERNS, ids=pattern_key)
def test_served_grpc_round_trip(benchmark, server, client, test_inputs, pattern):
    inputs = batch_of(test_inputs, 1, pattern)
    record(benchmark, "served", pattern_key(pattern), server.runtime, "int8", 1)
    benchmark(_request(client, inputs))


def _descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [int(c) for c in children.read_text().split()] if children.exists() else []
    return found + [grandchild for child in found for grandchild in _descendants(child)]


def _peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a process and everything it started (tritonserver, Python stubs)."""
    total = 0
    for process in [pid, *_descendants(pid)]:
        status = Path(f"/proc/{process}/status")
        if status.exists():
            total += next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM"))
    return total / 1024


def test_memory_of_the_serving_process(benchmark, server, client, test_inputs, engine_dirs):
    request = _request(client, batch_of(test_inputs, 1))
    benchmark(request)
    sizes = {p.name: p.stat().st_size / 1024 for p in engine_dirs["int8"].iterdir() if p.suffix in (".onnx", ".plan")}
    record(benchmark, "memory", f"serving ({server.runtime})", server.runtime, "int8", 1,
           peak_rss_mb=_peak_rss_mb(server.process.pid), engine_kib=sizes)


@pytest.mark.target
def test_batch1_grpc_overhead(benchmark, target_run, server, client, pipelines, test_inputs):
    inputs = batch_of(test_inputs, 1)
    served, local = target_run.interleave(
        Timed(case_name("served", "audio+image", server.runtime, "int8", 1), _request(client, inputs)),
        Timed(case_name("pipeline", "audio+image", "onnxruntime", "int8", 1), lambda: pipelines["int8"].infer(inputs)))
    benchmark(_request(client, inputs))
    target_run.conclude(f"grpc-overhead ({server.runtime})", server.runtime, "int8", 1,
                        Check("served - in-process latency (ms)", (served - local) * 1e3, "<=", 1.5),
                        served_ms=served * 1e3, in_process_ms=local * 1e3)


@pytest.mark.target
def test_concurrency_scaling(benchmark, target_run, server):
    from ume_edge.client import run_client

    def throughput(concurrency):
        return run_client(server.grpc_url, requests=600, concurrency=concurrency)["throughput_rps"]

    one, sixteen = throughput(1), throughput(16)
    benchmark.pedantic(lambda: time.sleep(0), rounds=1)
    target_run.conclude(f"concurrency-16-vs-1 ({server.runtime})", server.runtime, "int8", 1,
                        Check("throughput at concurrency 16 / at 1", sixteen / one, ">=", 4.0),
                        rps_at_1=one, rps_at_16=sixteen)

"""The client across replicas: ``--url`` as a list or a DNS name, round-robin with a back-off, UNAVAILABLE retried
on another replica within the request's ``--timeout-s``, the counts per replica, and a replica killed mid-run."""

import os
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from clocks import ManualClock  # tests/clocks.py

from ume_edge.client import ClientOptions, format_report
from ume_edge.client.cli import main
from ume_edge.client.dataset import read_data_set
from ume_edge.client.replicas import BACKOFF_S, Replicas, resolve_replicas
from ume_edge.client.report import summarize
from ume_edge.client.simulation import UNPACED_PERIOD_S, SensorModel, SensorReplay
from ume_edge.client.streaming import _send_all, stream

pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import InferResult, service_pb2  # noqa: E402  (the serve extra)
from tritonclient.utils import InferenceServerException  # noqa: E402

REAL_GETADDRINFO = socket.getaddrinfo
UNAVAILABLE = "StatusCode.UNAVAILABLE"  # what tritonclient's InferenceServerException.status() gives, str(grpc code)


# ---------------------------------------------------------------------------------------------------------------
# --url: a list, or one name whose records are the replicas


def test_a_list_is_its_replicas_as_written():
    assert resolve_replicas("127.0.0.1:8001, 127.0.0.1:9001") == ["127.0.0.1:8001", "127.0.0.1:9001"]
    assert resolve_replicas("[::1]:8001,localhost:8001") == ["[::1]:8001", "localhost:8001"]


def test_a_name_with_one_address_is_one_server_by_its_name():
    assert socket.getaddrinfo("localhost", 8001, type=socket.SOCK_STREAM)  # resolves (to 127.0.0.1 here)
    assert resolve_replicas("localhost:8001") == ["localhost:8001"]
    assert resolve_replicas("127.0.0.1:8001") == ["127.0.0.1:8001"]


def _records(*addresses):
    """What getaddrinfo gives for a name with these A and AAAA records (the real records of each literal)."""
    return lambda host, port, *args, **kwargs: [record for address in addresses
                                                for record in REAL_GETADDRINFO(address, port, *args, **kwargs)]


def test_a_name_with_several_addresses_is_one_replica_each_ipv4_first(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", _records("fd00::5", "10.0.0.5", "10.0.0.6", "10.0.0.5", "fd00::6"))
    assert resolve_replicas("ume-headless:8001") == ["10.0.0.5:8001", "10.0.0.6:8001"]  # dual stack: each pod once
    monkeypatch.setattr(socket, "getaddrinfo", _records("fd00::5", "fd00::6"))
    assert resolve_replicas("ume-headless:8001") == ["[fd00::5]:8001", "[fd00::6]:8001"]


@pytest.mark.parametrize("url, message", [
    ("localhost", "--url expects HOST:PORT, or several separated by commas (e.g. localhost:8001 or "
                  "10.0.0.5:8001,10.0.0.6:8001), got 'localhost'"),
    ("a:8001,,b:8001", "got ''"),
    ("a:8001,b:99999", "got 'b:99999'"),
    (":8001", "got ':8001'"),
    ("no-such-host.invalid:8001", "--url no-such-host.invalid:8001: cannot resolve 'no-such-host.invalid'"),
])
def test_a_bad_url_is_one_line(url, message, capsys):
    assert main(["--url", url, "--no-progress", "--requests", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------------------------
# the retry policy, on clients that answer as tritonclient does (its InferResult and InferenceServerException)


class FakeReplica:
    """An ``InferenceServerClient`` that answers label 7 with the request's id, or fails every try with
    ``status`` (after ``delay_s``), calling back at once as ``async_infer`` does when the call completes."""

    def __init__(self, address, fails_with=None, delay_s=0.0):
        self.address, self.fails_with, self.delay_s = address, fails_with, delay_s
        self.tries, self.budgets = 0, []

    def async_infer(self, model_name, inputs, callback, outputs=None, request_id="", client_timeout=None):
        self.tries += 1
        self.budgets.append(client_timeout)
        time.sleep(self.delay_s)
        if self.fails_with:
            callback(None, InferenceServerException(f"{self.address}: {self.fails_with}", status=self.fails_with))
            return
        output = service_pb2.ModelInferResponse.InferOutputTensor(name="label", datatype="INT64", shape=[1])
        response = service_pb2.ModelInferResponse(model_name=model_name, id=request_id, outputs=[output],
                                                  raw_output_contents=[np.array([7], np.int64).tobytes()])
        callback(InferResult(response), None)

    def close(self):
        pass


@pytest.fixture(scope="module")
def plan():
    inputs, _ = read_data_set("avdigits", "test")
    replay = SensorReplay(SensorModel(list(inputs)), len(inputs["audio"]), np.random.default_rng(0), UNPACED_PERIOD_S)
    return inputs, replay.requests(40)


def _replay_on(replicas, plan, **options):
    inputs, requests = plan
    datatypes = {name: "FP32" for name in inputs}
    result = _send_all(replicas, ClientOptions(**options), inputs, requests, datatypes)
    return result, summarize(result, None)


def _replicas(*fakes, clock=time.monotonic):
    by_address = {fake.address: fake for fake in fakes}
    return Replicas(list(by_address), make_client=by_address.__getitem__, clock=clock)


def test_unavailable_moves_the_request_to_another_replica_which_is_skipped_for_a_back_off(plan):
    down, up = FakeReplica("a:1", fails_with=UNAVAILABLE), FakeReplica("b:1")
    clock = ManualClock()
    result, summary = _replay_on(_replicas(down, up, clock=clock), plan, max_failures=0)
    assert summary["answered"] == 40 and summary["errors"] == 0
    assert down.tries == 1 and up.tries == 40  # tried once, then in back-off for the whole (frozen) clock
    assert summary["retries"] == 1 and result.outcomes[0].tries == ["a:1", "b:1"]
    assert summary["replicas"] == {"a:1": {"answered": 0, "failed_tries": 1, "retries_to": 0},
                                   "b:1": {"answered": 40, "failed_tries": 0, "retries_to": 1}}
    assert [outcome.answer_id for outcome in result.outcomes] == [str(index) for index in range(40)]
    assert summary["failover_s"] is not None and 0 <= summary["failover_s"] < 1
    table = format_report(summary)
    assert "replica" in table and "failed tries" in table and "retries: 1; failover:" in table


def test_the_back_off_doubles_while_a_replica_keeps_failing_and_ends_when_it_answers():
    clock = ManualClock()
    replicas = _replicas(FakeReplica("a:1"), FakeReplica("b:1"), clock=clock)
    assert [replicas.pick([]) for _ in range(4)] == ["a:1", "b:1", "a:1", "b:1"]
    replicas.failed("a:1")
    assert [replicas.pick([]) for _ in range(3)] == ["b:1"] * 3
    clock.now += BACKOFF_S
    assert replicas.pick([]) == "a:1"  # tried again: it may have come back
    replicas.failed("a:1")
    clock.now += BACKOFF_S
    assert replicas.pick([]) == "b:1"  # the second failure in a row doubled its back-off
    clock.now += BACKOFF_S
    assert replicas.pick(["b:1"]) == "a:1"
    replicas.answered("a:1")
    assert [replicas.pick([]) for _ in range(2)] == ["b:1", "a:1"]
    replicas.failed("b:1")
    assert replicas.pick(["a:1"]) == "b:1"  # in back-off, but the only one left to try
    assert replicas.pick(["a:1", "b:1"]) is None


def test_a_refused_input_is_not_retried(plan):
    refusing, up = FakeReplica("a:1", fails_with="StatusCode.INVALID_ARGUMENT"), FakeReplica("b:1")
    result, summary = _replay_on(_replicas(refusing, up), plan, max_failures=0)
    assert summary["errors"] == 20 and summary["answered"] == 20 and summary["retries"] == 0
    assert all(outcome.tries == ["a:1"] for outcome in result.outcomes if outcome.error)
    assert "INVALID_ARGUMENT" in summary["error_examples"][0]


def test_every_replica_is_tried_once_then_the_request_fails(plan):
    down = [FakeReplica(f"h{index}:1", fails_with=UNAVAILABLE) for index in range(3)]
    result, summary = _replay_on(_replicas(*down), plan, max_failures=2)
    assert summary["answered"] == 0 and summary["requests"] == 2 and "stopped after 2 failed" in summary["stopped"]
    assert [len(outcome.tries) for outcome in result.outcomes] == [3, 3] and summary["failover_s"] is None


def test_one_replica_is_not_retried(plan):
    down = FakeReplica("a:1", fails_with=UNAVAILABLE)
    _, summary = _replay_on(_replicas(down), plan, max_failures=3)
    assert down.tries == 3 and summary["retries"] == 0 and summary["errors"] == 3
    assert "retries" not in format_report(summary).split("error:")[0]  # no replica table for one server


def test_a_retry_gets_only_what_is_left_of_the_timeout_and_none_once_it_is_spent(plan):
    slow_down, up = FakeReplica("a:1", fails_with=UNAVAILABLE, delay_s=0.06), FakeReplica("b:1")
    _replay_on(_replicas(slow_down, up, clock=ManualClock()), plan, timeout_s=0.5)
    assert slow_down.budgets == [pytest.approx(0.5, abs=0.01)]  # then in back-off for the whole (frozen) clock
    assert up.budgets[0] < 0.45 and all(budget == pytest.approx(0.5, abs=0.01) for budget in up.budgets[1:])
    spent, up = FakeReplica("a:1", fails_with=UNAVAILABLE, delay_s=0.06), FakeReplica("b:1")
    _, summary = _replay_on(_replicas(spent, up, clock=ManualClock()), plan, timeout_s=0.05, max_failures=1)
    assert up.tries == 0 and summary["errors"] == 1 and summary["retries"] == 0


# ---------------------------------------------------------------------------------------------------------------
# two real servers from one engine directory, one killed mid-run


def _answered_by(server):
    """Requests the entry model answered, from the server's own metrics."""
    from ume_edge.serving import metrics

    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        return metrics.total(metrics.parse(response.read().decode()), metrics.REQUESTS)


def _kill_tritonserver(server):
    """SIGKILL the tritonserver under ``python -m ume_edge.serve``, with its process group (its Python stubs)."""
    from ume_edge.serving.watchdog import descendants

    (triton,) = [pid for pid in descendants(server.process.pid)
                 if Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver"]
    os.killpg(triton, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.triton
def test_a_replica_killed_mid_run_loses_no_request_and_counts_none_twice(int8_engines):
    from ume_edge.runtime import Pipeline
    from ume_edge.serve import ServeProcess
    from ume_edge.serving.server_config import Endpoints, free_ports

    pytest.importorskip("pytriton")
    started = time.perf_counter()
    servers = [ServeProcess(int8_engines, Endpoints("127.0.0.1", *free_ports(3))) for _ in range(2)]
    try:
        for server in servers:
            server.start(timeout_s=180)
        survivor, victim = servers
        inputs, labels = read_data_set("avdigits", "test")
        sensors = SensorModel(list(inputs), drop={"image": 0.3, "audio": 0.3})
        requests = SensorReplay(sensors, len(labels), np.random.default_rng(1), UNPACED_PERIOD_S).requests(3000)
        options = ClientOptions(url=f"{survivor.grpc_url},{victim.grpc_url}", concurrency=8, timeout_s=30.0)
        results = []
        client = threading.Thread(target=lambda: results.append(stream(options, inputs, requests)))
        sending = time.perf_counter()
        client.start()
        while _answered_by(victim) < 500 and client.is_alive():  # about 1,000 answered, half by each
            time.sleep(0.02)
        killed_at = time.perf_counter()
        _kill_tritonserver(victim)
        client.join(timeout=120)
        client_s = time.perf_counter() - sending
    finally:
        for server in servers:
            server.stop(signal.SIGTERM)
    (result,) = results
    summary = summarize(result, labels)
    outcomes = result.outcomes
    assert summary["requests"] == summary["answered"] == 3000 and summary["errors"] == 0, summary["error_examples"]
    assert sorted(int(outcome.answer_id) for outcome in outcomes) == list(range(3000))  # each request once
    assert all(outcome.answer_id == outcome.request_id for outcome in outcomes)
    rows = summary["replicas"]
    assert rows[victim.grpc_url]["failed_tries"] >= 1 and summary["retries"] >= 1
    assert rows[survivor.grpc_url]["answered"] + rows[victim.grpc_url]["answered"] == 3000
    assert 400 <= rows[victim.grpc_url]["answered"] < 1500, rows
    answered_at = sorted(outcome.sent_s + outcome.latency_s for outcome in outcomes)
    rerouted = [o.sent_s + o.latency_s for o in outcomes
                if o.tries[0] == victim.grpc_url and len(o.tries) > 1 and o.sent_s + o.latency_s > killed_at]
    assert rerouted and all(time_s > killed_at for time_s in rerouted)
    to_first_rerouted_s = min(rerouted) - killed_at
    longest_gap_s = float(np.max(np.diff(answered_at)))
    with Pipeline.load(int8_engines) as pipeline:
        for outcome in outcomes[::97]:
            sample = outcome.request.sample
            arrays = {name: inputs[name][sample:sample + 1] if name in outcome.request.present else None
                      for name in inputs}
            assert outcome.label == int(pipeline.infer(arrays).labels[0]), outcome
    print(f"\nfailover: kill -> first answer, on the survivor, of a request sent to the killed replica "
          f"{to_first_rerouted_s * 1e3:.1f} ms; longest wait of a retried request between its failed try and its "
          f"answer (summary failover_s) {summary['failover_s'] * 1e3:.1f} ms; longest gap between two answers "
          f"{longest_gap_s * 1e3:.1f} ms; client {client_s:.1f} s for 3000 requests, "
          f"test {time.perf_counter() - started:.1f} s")
    print(format_report(summary))
    assert to_first_rerouted_s < 5.0 and summary["failover_s"] < 5.0

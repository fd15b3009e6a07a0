"""Issue 21, the sensor client and SensorSync: the client checks its own data and its ``--json`` path before sending
anything, keeps the summary when the run is cut short or its file cannot be written, and SensorSync keeps using a
sensor whose clock jumped back."""

import json
import logging
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_client import FakeTriton

from ume_edge.client.cli import main
from ume_edge.sync import SensorSync

SAMPLES = 40


class RecordingTriton(FakeTriton):
    """A fake Triton (the external API) that answers every inference with label 0, counts metadata calls (a client
    asks for the model's metadata first, so 0 means it never got that far) and runs ``on_infer`` before answering."""

    def __init__(self, on_infer=None):
        super().__init__(answers=10**9, then="fail")
        self.metadata_calls, self.on_infer = 0, on_infer

    def model_metadata(self, request, context):
        self.metadata_calls += 1
        return super().model_metadata(request, context)

    def model_infer(self, request, context):
        if self.on_infer:
            self.on_infer()
        return super().model_infer(request, context)


@pytest.fixture
def triton():
    servers = []

    def start(on_infer=None):
        servers.append(RecordingTriton(on_infer))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def avdigits_arrays(avdigits_test):
    inputs, labels = avdigits_test
    return {name: array[:SAMPLES] for name, array in inputs.items()}, labels[:SAMPLES]


def save_npz(path, inputs, labels=None):
    np.savez(path, **inputs, **({} if labels is None else {"labels": labels}))
    return str(path)


def run_main(server, *args):
    return main(["--url", server.url, "--metrics-url", "none", "--no-progress", *args])


def assert_refused_before_connecting(capsys, server, code, *expected):
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "server running" not in err
    for text in expected:
        assert text in err, err
    assert server.metadata_calls == 0 and server.calls == 0


# ---------------------------------------------------------------------------------------------------------------
# case 1: --json


@pytest.mark.parametrize("where, expected", [("missing/summary.json", "does not exist"),
                                             ("folder", "is a folder"),
                                             ("a_file/summary.json", "does not exist")])
def test_a_json_path_that_cannot_be_written_is_refused_before_sending(tmp_path, triton, capsys, where, expected):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    server = triton()
    code = run_main(server, "--requests", "5", "--json", str(tmp_path / where))
    assert_refused_before_connecting(capsys, server, code, "--json", expected)


def test_a_json_file_that_fails_at_the_end_still_prints_the_summary(tmp_path, triton, capsys):
    target = tmp_path / "summary.json"
    server = triton(on_infer=lambda: target.mkdir(exist_ok=True))  # the path turns into a folder mid-run
    code = run_main(server, "--requests", "5", "--json", str(target))
    out, err = capsys.readouterr()
    assert code == 2
    assert "5/5 answered, 0 errors" in out and "accuracy" in out
    assert err.strip().splitlines() == [err.strip()] and f"--json {target}: could not write" in err
    assert [path.name for path in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind


def test_the_json_file_is_written_whole(tmp_path, triton, capsys):
    target = tmp_path / "summary.json"
    target.write_text("an older summary")
    assert run_main(triton(), "--requests", "5", "--json", str(target)) == 0
    assert json.loads(target.read_text())["answered"] == 5


# ---------------------------------------------------------------------------------------------------------------
# case 2: labels and inputs of different lengths


@pytest.mark.parametrize("labels", [SAMPLES - 10, SAMPLES + 10])
def test_labels_of_another_length_are_refused_at_load_time(tmp_path, triton, capsys, avdigits_arrays, labels):
    inputs, _ = avdigits_arrays
    path = save_npz(tmp_path / "data.npz", inputs, np.zeros(labels, np.int64))
    server = triton()
    code = run_main(server, "--dataset", path, "--requests", "5")
    assert_refused_before_connecting(capsys, server, code, path, f"{SAMPLES} samples", f"{labels} labels")


def test_modalities_of_different_lengths_are_refused(tmp_path, triton, capsys, avdigits_arrays):
    inputs, labels = avdigits_arrays
    path = save_npz(tmp_path / "data.npz", {**inputs, "image": inputs["image"][:-3]}, labels)
    server = triton()
    code = run_main(server, "--dataset", path, "--requests", "5")
    assert_refused_before_connecting(capsys, server, code, path, f"audio {SAMPLES}", f"image {SAMPLES - 3}")


# ---------------------------------------------------------------------------------------------------------------
# case 3: Ctrl-C


def test_ctrl_c_prints_the_partial_summary_and_exits_130(triton):
    server = triton()
    client = subprocess.Popen([sys.executable, "-m", "ume_edge.client", "--url", server.url, "--metrics-url", "none",
                               "--no-progress", "--rate", "50", "--requests", "100000"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while server.calls < 5 and time.monotonic() < deadline and client.poll() is None:
            time.sleep(0.05)
        assert server.calls >= 5, client.communicate(timeout=5)
        client.send_signal(signal.SIGINT)
        out, err = client.communicate(timeout=30)
    finally:
        client.kill()
    assert client.returncode == 130, err
    assert "Traceback" not in err
    answered, sent = (int(number) for number in out.split(" answered")[0].split("/"))
    assert 5 <= answered <= sent < 100000
    assert "accuracy" in out and "p50" in out and f"interrupted (Ctrl-C); sent {sent} of 100000" in out


# ---------------------------------------------------------------------------------------------------------------
# case 4: the client's own data is not the server's fault


def truncated(tmp_path, inputs, labels):
    path = tmp_path / "data.npz"
    save_npz(path, inputs, labels)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return str(path)


def not_an_npz(tmp_path, inputs, labels):
    path = tmp_path / "data.npz"
    path.write_text("audio,image,label\n")
    return str(path)


def no_samples(tmp_path, inputs, labels):
    return save_npz(tmp_path / "data.npz", {name: array[:0] for name, array in inputs.items()}, labels[:0])


def missing(tmp_path, inputs, labels):
    return str(tmp_path / "nowhere.npz")


def float64_beyond_float32(tmp_path, inputs, labels):
    return save_npz(tmp_path / "data.npz", {**inputs, "audio": inputs["audio"].astype(np.float64) * 1e300}, labels)


@pytest.mark.parametrize("make, problem", [(truncated, "truncated or corrupt"), (not_an_npz, "not a readable .npz"),
                                           (no_samples, "0 samples"), (missing, "no such file"),
                                           (float64_beyond_float32, "beyond float32's range")])
def test_bad_data_is_named_with_its_file_before_connecting(tmp_path, triton, capsys, avdigits_arrays, make, problem):
    path = make(tmp_path, *avdigits_arrays)
    server = triton()
    code = run_main(server, "--dataset", path, "--requests", "5")
    assert_refused_before_connecting(capsys, server, code, path, problem)


def test_float64_data_is_sent_as_the_float32_the_model_takes(tmp_path, triton, capsys, avdigits_arrays):
    inputs, labels = avdigits_arrays
    path = save_npz(tmp_path / "data.npz", {name: array.astype(np.float64) for name, array in inputs.items()}, labels)
    code = run_main(triton(), "--dataset", path, "--requests", "5")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "5/5 answered, 0 errors" in out
    assert f"{path}: audio is float64; sending it as float32" in err


def test_a_dtype_the_model_does_not_take_is_named_not_blamed_on_the_server(tmp_path, triton, capsys, avdigits_arrays):
    inputs, labels = avdigits_arrays
    path = save_npz(tmp_path / "data.npz", {**inputs, "image": (inputs["image"] * 255).astype(np.uint8)}, labels)
    server = triton()
    code = run_main(server, "--dataset", path, "--requests", "5")
    err = capsys.readouterr().err
    assert code == 2 and server.calls == 0
    assert "image is uint8 but model 'ume' takes FP32" in err and "server running" not in err


# ---------------------------------------------------------------------------------------------------------------
# case 5: a sensor clock that jumps back


class SteppedClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def replay_with_a_jump(sync, clock, jump_s, jump_at=5, steps=10, period_s=0.033):
    """Audio and image sampled together every ``period_s``; from ``jump_at`` on, the image clock is ``jump_s``
    behind."""
    frames = []
    for step in range(steps):
        stamp = 1.0 + step * period_s
        frames += sync.push("audio", stamp, ("audio", step))
        frames += sync.push("image", stamp - (jump_s if step >= jump_at else 0.0), ("image", step))
        clock.now += period_s
        frames += sync.poll()
    return frames + sync.flush()


def test_a_sensor_clock_that_jumps_back_is_resynchronised_with_a_warning(caplog):
    clock = SteppedClock()
    sync = SensorSync(["audio", "image"], deadline_ms=30, window_ms=15, clock=clock)
    with caplog.at_level(logging.WARNING, logger="ume_edge.sync"):
        frames = replay_with_a_jump(sync, clock, jump_s=7200.0)
    assert [frame.inputs["image"] for frame in frames] == [("image", step) for step in range(10)]
    assert [frame.present for frame in frames] == [("audio", "image")] * 10
    assert sum(sync.dropped.values()) == 0
    (warning,) = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert "image sensor's clock jumped back 7200.000 s" in warning.getMessage()


def test_the_clock_jump_threshold_is_configurable(caplog):
    clock = SteppedClock()
    sync = SensorSync(["audio", "image"], deadline_ms=30, window_ms=15, clock=clock)  # default: 1 s
    frames = replay_with_a_jump(sync, clock, jump_s=0.5)
    assert sync.dropped["stale"] == 5 and not caplog.records  # half a second back is not a jump by default
    assert [frame.present for frame in frames][5:] == [("audio",)] * 5

    clock = SteppedClock()
    sync = SensorSync(["audio", "image"], deadline_ms=30, window_ms=15, clock=clock, clock_jump_ms=200)
    with caplog.at_level(logging.WARNING, logger="ume_edge.sync"):
        frames = replay_with_a_jump(sync, clock, jump_s=0.5)
    assert [frame.present for frame in frames] == [("audio", "image")] * 10
    assert "jumped back 0.500 s" in caplog.text
    with pytest.raises(ValueError, match="clock_jump_ms"):
        SensorSync(["audio"], deadline_ms=30, clock_jump_ms=0)


@pytest.fixture(scope="module")
def served(served_reference):
    return served_reference


@pytest.mark.triton
def test_a_real_server_answers_float64_data_as_it_answers_float32(served, tmp_path, capsys, avdigits_test):
    inputs, labels = avdigits_test
    summaries = {}
    for dtype in (np.float32, np.float64):
        name = np.dtype(dtype).name
        path = save_npz(tmp_path / f"{name}.npz", {key: array[:200].astype(dtype) for key, array in inputs.items()},
                        labels[:200])
        code = main(["--url", served.grpc_url, "--metrics-url", "none", "--no-progress", "--dataset", path,
                     "--drop", "image=0.3,audio=0.3", "--json", str(tmp_path / f"{name}.json")])
        assert code == 0, capsys.readouterr().err
        summaries[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert summaries["float64"]["answered"] == 200
    assert summaries["float64"]["per_pattern"] == summaries["float32"]["per_pattern"]
    assert "audio is float64; sending it as float32" in capsys.readouterr().err

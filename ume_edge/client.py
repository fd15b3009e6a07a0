"""Replay a data set as sensor streams against a Triton server over gRPC.

    python -m ume_edge.client --url localhost:8001 --drop image=0.2,audio=0.3 --concurrency 16

Every sensor (modality) is a stream on a simulated clock: sample ``i`` is captured at ``i / --rate`` seconds and
stamped with that time; each sensor's reading of it is lost with the ``--drop`` probability, or arrives after a
random delay (exponential, mean ``--jitter-ms``, drawn afresh for every reading). The readings go, in order of
arrival, into a ``SensorSync`` (``ume_edge.sync``) with ``--deadline-ms`` and a window of half the sample period,
and each frame it emits becomes one request, without the modalities missing from the frame: those that were lost
("dropped") and those that arrived after their frame had left ("missed the deadline"). A sample whose every
reading is lost makes no request; ``--requests`` counts requests. With ``--rate`` the requests leave in real time,
when their frame was emitted; without it the samples lie far apart on the simulated clock and the requests leave as
fast as ``--concurrency`` allows. Requests are asynchronous (``tritonclient.grpc``); every call honours
``--timeout-s``, and after ``--max-failures`` failed requests in a row the client stops sending. At the end it
prints accuracy per presence pattern, latency p50/p90/p99 and throughput; ``run_client(...)`` returns the same as a
dict. Ctrl-C stops sending and prints the same for the requests sent so far (exit status 130).

The data set and the ``--json`` path are checked before anything is sent: a file that is not a readable ``.npz``,
no samples, modalities or labels of different lengths, or a ``--json`` path that cannot be written stop the client
with one line (exit status 2). float64 inputs are sent as float32, what the model computes in.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import logging
import os
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ume_edge.cli_common import show_progress
from ume_edge.constants import DEFAULT_METRICS_PORT, PRESENT
from ume_edge.data import load, load_npz, pattern_key
from ume_edge.errors import UmeEdgeError
from ume_edge.serving import metrics
from ume_edge.sync import Frame, SensorSync

DEFAULT_JITTER_MS = {"audio": 8.0, "image": 3.0}
FALLBACK_JITTER_MS = 5.0
DEFAULT_DEADLINE_JITTERS = 10.0  # without --deadline-ms: 10 mean delays of the slowest sensor (late: p < 5e-5)
UNPACED_PERIOD_S = 60.0  # sample spacing on the simulated clock without --rate: samples never meet
MAX_LOST_SAMPLES = 1000
DEFAULT_MAX_FAILURES = 10
INTERRUPT_GRACE_S = 1.0  # after Ctrl-C, how long the requests in flight may still answer
INTERRUPTED_EXIT_STATUS = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C

LOGGER = logging.getLogger(__name__)


class SummaryNotSaved(UmeEdgeError):
    """The run finished but its ``--json`` file could not be written; ``summary`` is the run's summary."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


# ---------------------------------------------------------------------------------------------------------------
# the data set and the --json file, checked before anything is sent


def read_data_set(dataset: str, split: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The inputs and labels to replay, checked: one line naming the data set and the problem otherwise."""
    inputs, labels = _read_npz(Path(dataset)) if dataset.endswith(".npz") else load(dataset, split)
    samples = _count_samples(dataset, inputs)
    if labels is not None and len(labels) != samples:
        raise ValueError(f"{dataset}: {samples} samples but {len(labels)} labels; give one label per sample")
    return {name: _as_float32(dataset, name, array) for name, array in inputs.items()}, labels


def _read_npz(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    try:
        return load_npz(path)
    except FileNotFoundError as error:
        raise ValueError(str(error)) from None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f"{path}: not a readable .npz ({error}); is the file truncated or corrupt?") from None


def _count_samples(dataset: str, inputs: dict[str, np.ndarray]) -> int:
    if not inputs:
        raise ValueError(f"{dataset}: no input arrays (only labels); save one array per modality")
    rows = {name: len(array) if array.ndim else 0 for name, array in inputs.items()}
    if len(set(rows.values())) > 1:
        counts = ", ".join(f"{name} {count}" for name, count in rows.items())
        raise ValueError(f"{dataset}: the modalities have different numbers of samples ({counts})")
    if not any(rows.values()):
        raise ValueError(f"{dataset}: 0 samples; nothing to replay")
    return next(iter(rows.values()))


def _as_float32(dataset: str, name: str, array: np.ndarray) -> np.ndarray:
    """float64 (numpy's default) rounded to the float32 the model computes in; refused if it would overflow."""
    if array.dtype != np.float64:
        return array
    finite = np.abs(array[np.isfinite(array)])
    if finite.size and finite.max() > np.finfo(np.float32).max:
        raise ValueError(f"{dataset}: {name} is float64 with values beyond float32's range (the model takes "
                         f"float32); scale the data before saving it")
    LOGGER.warning("%s: %s is float64; sending it as float32, which the model takes", dataset, name)
    return array.astype(np.float32)


def check_writable(path: Path) -> None:
    """Refuse a ``--json`` path that could not be written at the end of the run."""
    if path.is_dir():
        raise ValueError(f"--json {path}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise ValueError(f"--json {path}: the folder {path.parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"):
            pass
    except OSError as error:
        raise ValueError(f"--json {path}: cannot write in {path.parent} ({error.strerror})") from None


def write_json(path: Path, summary: dict) -> None:
    """Write through a temporary file in the same folder: a failure never leaves half a file at ``path``."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise SummaryNotSaved(f"--json {path}: could not write the summary ({error})", summary) from None


# ---------------------------------------------------------------------------------------------------------------
# sensors: which modalities make it into each request


def parse_modality_values(text: str | None, flag: str) -> dict[str, float]:
    """``"image=0.2,audio=0.3"`` -> ``{"image": 0.2, "audio": 0.3}``."""
    items = filter(None, (part.strip() for part in (text or "").split(",")))
    return dict(_name_value(item, flag) for item in items)


def _name_value(item: str, flag: str) -> tuple[str, float]:
    name, _, number = (part.strip() for part in item.partition("="))
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if not name or np.isnan(value):
        raise ValueError(f"{flag} expects name=value pairs separated by commas (e.g. image=0.2,audio=0.3), "
                         f"got {item!r}")
    return name, value


@dataclass
class Request:
    """One frame from the SensorSync: the sample it holds, its modalities, and the times on the simulated clock
    (the first sample is captured at 0) when it was captured and when the sync emitted it."""

    sample: int  # row of the split
    present: tuple[str, ...]
    captured_s: float
    send_at_s: float
    dropped: tuple[str, ...] = ()
    late: tuple[str, ...] = ()


@dataclass
class SensorModel:
    """Per-sensor loss probability and mean arrival delay, and the deadline after which a frame leaves without a
    sensor (default: ``DEFAULT_DEADLINE_JITTERS`` mean delays of the slowest sensor)."""

    modalities: list[str]
    drop: dict[str, float] = field(default_factory=dict)
    jitter_ms: dict[str, float] = field(default_factory=dict)
    deadline_ms: float | None = None

    def __post_init__(self):
        unknown = sorted((set(self.drop) | set(self.jitter_ms)) - set(self.modalities))
        if unknown:
            raise ValueError(f"unknown modality {unknown[0]!r} in --drop/--jitter-ms; "
                             f"the modalities are {', '.join(self.modalities)}")
        for name, p in self.drop.items():
            if not 0.0 <= p < 1.0:
                raise ValueError(f"--drop {name}={p}: a probability must be in [0, 1)")
        for name in self.modalities:
            if not self.mean_delay_ms(name) >= 0:
                raise ValueError(f"--jitter-ms {name}={self.mean_delay_ms(name)}: a delay must be >= 0")
        if self.deadline_ms is None:
            self.deadline_ms = DEFAULT_DEADLINE_JITTERS * max(map(self.mean_delay_ms, self.modalities))
        if not self.deadline_ms > 0:
            raise ValueError(f"--deadline-ms must be positive, got {self.deadline_ms}")

    def mean_delay_ms(self, name: str) -> float:
        return self.jitter_ms.get(name, DEFAULT_JITTER_MS.get(name, FALLBACK_JITTER_MS))

    def draw(self, rng: np.random.Generator) -> tuple[list[str], dict[str, float]]:
        """One sample: the sensors that lost it, and the arrival delay in seconds of every other one."""
        dropped, delays = [], {}
        for name in self.modalities:
            if rng.random() < self.drop.get(name, 0.0):
                dropped.append(name)
            else:
                delays[name] = rng.exponential(self.mean_delay_ms(name)) / 1e3
        return dropped, delays


class SimulatedClock:
    """The clock the SensorSync reads in a replay: set by the replay, not by time passing."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SensorReplay:
    """The simulated sensors feeding a SensorSync on a simulated clock; the frames it emits become the requests."""

    def __init__(self, sensors: SensorModel, samples: int, rng: np.random.Generator, period_s: float):
        self.sensors, self.samples, self.rng, self.period_s = sensors, samples, rng, period_s
        self.clock = SimulatedClock()
        self.sync = SensorSync(sensors.modalities, sensors.deadline_ms, window_ms=period_s * 1e3 / 2,
                               clock=self.clock)
        self._arrivals: list[tuple[float, int, str, int]] = []  # heap of (arrival_s, order, modality, sample)
        self._order = itertools.count()
        self._lost_by_sample: dict[int, list[str]] = {}
        self._next_sample = self._lost_in_a_row = 0

    def requests(self, count: int) -> list[Request]:
        """Replay until the sync has emitted ``count`` frames."""
        requests: list[Request] = []
        while len(requests) < count:
            self._capture_until_next_arrival()
            requests += self._deliver_next()
        return requests[:count]

    def _capture_until_next_arrival(self) -> None:
        """Capture samples until no later capture can arrive before the earliest pending arrival."""
        while not self._arrivals or self._next_sample * self.period_s <= self._arrivals[0][0]:
            self._capture()

    def _capture(self) -> None:
        index, captured_s = self._next_sample, self._next_sample * self.period_s
        self._next_sample += 1
        lost, delays = self.sensors.draw(self.rng)
        self._lost_in_a_row = 0 if delays else self._lost_in_a_row + 1
        if self._lost_in_a_row >= MAX_LOST_SAMPLES:
            raise ValueError(f"{MAX_LOST_SAMPLES} samples in a row lost every modality; lower --drop")
        if delays:
            self._lost_by_sample[index] = lost
        for name, delay_s in delays.items():
            heapq.heappush(self._arrivals, (captured_s + delay_s, next(self._order), name, index))

    def _deliver_next(self) -> list[Request]:
        """Let the deadlines before the next arrival pass, then push that reading (its payload: the sample index)."""
        arrival_s, _, name, index = heapq.heappop(self._arrivals)
        requests = []
        while (due := self.sync.next_deadline()) is not None and due <= arrival_s:
            self.clock.now = due
            requests += self._as_requests(self.sync.poll())
        self.clock.now = arrival_s
        return requests + self._as_requests(self.sync.push(name, index * self.period_s, index))

    def _as_requests(self, frames: list[Frame]) -> list[Request]:
        requests = []
        for frame in frames:
            index = next(reading for reading in frame.inputs.values() if reading is not None)
            lost = self._lost_by_sample.pop(index)
            late = [name for name in self.sensors.modalities if frame.inputs[name] is None and name not in lost]
            requests.append(Request(index % self.samples, frame.present, frame.timestamp, self.clock.now,
                                    tuple(lost), tuple(late)))
        return requests


# ---------------------------------------------------------------------------------------------------------------
# the gRPC stream


@dataclass
class Outcome:
    request: Request
    sent_s: float
    latency_s: float | None = None
    label: int | None = None
    error: str | None = None


@dataclass
class StreamResult:
    outcomes: list[Outcome]
    wall_s: float
    stopped: str | None = None  # why it stopped before sending every request
    interrupted: bool = False  # by Ctrl-C


class Progress:
    """``[#####.....] 512/1000`` on stderr, redrawn at most every 0.2 s."""

    def __init__(self, total: int, enabled: bool, width: int = 30):
        self.total, self.enabled, self.width = total, enabled, width
        self._last = 0.0

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self._last < 0.2):
            return
        self._last = now
        filled = int(self.width * done / max(1, self.total))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} requests")
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _model_inputs(client, model: str, timeout_s: float) -> dict[str, str]:
    """Input name -> Triton datatype, from the server's model metadata."""
    metadata = client.get_model_metadata(model, as_json=True, client_timeout=timeout_s)
    return {tensor["name"]: tensor["datatype"] for tensor in metadata["inputs"]}


def grpc_inputs(arrays: dict[str, np.ndarray], datatypes: dict[str, str] | None = None) -> list:
    """``tritonclient.grpc.InferInput`` list for ``{name: array}`` (datatype from the array unless given)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    tensors = []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        datatype = (datatypes or {}).get(name) or np_to_triton_dtype(array.dtype)
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def _request_inputs(inputs: dict[str, np.ndarray], request: Request, datatypes: dict[str, str],
                    send_mask: bool = False) -> list:
    """The request's present modalities; with ``send_mask``, every modality (zeros where absent) and the ``present``
    mask, so that the server can batch requests of every presence pattern together."""
    if not send_mask:
        return grpc_inputs({name: inputs[name][request.sample: request.sample + 1] for name in request.present},
                           datatypes)
    order = [name for name in datatypes if name != PRESENT]
    arrays = {name: (inputs[name][request.sample: request.sample + 1] if name in request.present
                     else np.zeros_like(inputs[name][:1])) for name in order}
    arrays[PRESENT] = np.array([[name in request.present for name in order]])
    return grpc_inputs(arrays, datatypes)


def stream(url: str, model: str, inputs: dict[str, np.ndarray], requests: list[Request], *, concurrency: int,
           rate: float | None, timeout_s: float, max_failures: int = DEFAULT_MAX_FAILURES,
           progress: bool = False, send_mask: bool = False) -> StreamResult:
    """Send the requests, at most ``concurrency`` in flight, each call limited to ``timeout_s``; stop sending after
    ``max_failures`` failed requests in a row (0: never)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        datatypes = _model_inputs(client, model, timeout_s)
        missing = [name for request in requests for name in request.present if name not in datatypes][:1]
        if missing:
            raise ValueError(f"model {model!r} at {url} has no input {missing[0]!r} (it has {', '.join(datatypes)})")
        if send_mask and PRESENT not in datatypes:
            raise ValueError(f"model {model!r} at {url} takes no {PRESENT!r} mask; drop --send-mask")
        _check_datatypes(inputs, datatypes, model)
        outputs = [grpcclient.InferRequestedOutput("label")]
        slots = threading.Semaphore(concurrency)
        tally = _Tally(max_failures)
        outcomes: list[Outcome] = []
        bar = Progress(len(requests), progress)
        start = time.perf_counter()
        interrupted = False
        try:
            for request in requests:
                if rate:
                    _sleep_until(start + request.send_at_s)
                request_inputs = _request_inputs(inputs, request, datatypes, send_mask)
                slots.acquire()
                if tally.gave_up:
                    break
                outcome = Outcome(request, time.perf_counter())
                outcomes.append(outcome)
                client.async_infer(model, request_inputs, _on_answer(outcome, slots, tally), outputs=outputs,
                                   client_timeout=timeout_s)
                bar.update(tally.done)
            tally.wait_for(len(outcomes), timeout_s + 5)
        except KeyboardInterrupt:
            interrupted = True
            with contextlib.suppress(KeyboardInterrupt):
                tally.wait_for(len(outcomes), min(timeout_s, INTERRUPT_GRACE_S))
        wall_s = time.perf_counter() - start
        bar.update(tally.done, final=True)
        return StreamResult(outcomes, wall_s, _why_stopped(tally, interrupted, len(outcomes), len(requests)),
                            interrupted)
    finally:
        client.close()


def _check_datatypes(inputs: dict[str, np.ndarray], datatypes: dict[str, str], model: str) -> None:
    from tritonclient.utils import np_to_triton_dtype

    for name, array in inputs.items():
        wanted = datatypes.get(name)
        if wanted and np_to_triton_dtype(array.dtype) != wanted:
            raise ValueError(f"the data set's {name} is {array.dtype} but model {model!r} takes {wanted}; "
                             f"convert it before saving the .npz")


def _why_stopped(tally: _Tally, interrupted: bool, sent: int, scheduled: int) -> str | None:
    if interrupted:
        return f"interrupted (Ctrl-C); sent {sent} of {scheduled}"
    if tally.gave_up:
        return (f"stopped after {tally.max_failures} failed requests in a row (--max-failures {tally.max_failures}); "
                f"sent {sent} of {scheduled}")
    return None


class _Tally:
    """How many answers came back, and whether ``max_failures`` failed in a row (0: never give up)."""

    def __init__(self, max_failures: int):
        self.max_failures = max_failures
        self.done = self.failures_in_a_row = 0
        self.gave_up = False
        self._changed = threading.Condition()

    def add(self, failed: bool) -> None:
        with self._changed:
            self.done += 1
            self.failures_in_a_row = self.failures_in_a_row + 1 if failed else 0
            self.gave_up = self.gave_up or 0 < self.max_failures <= self.failures_in_a_row
            self._changed.notify_all()

    def wait_for(self, count: int, timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.done >= count, timeout=timeout_s)


def _on_answer(outcome: Outcome, slots: threading.Semaphore, tally: _Tally):
    def callback(result, error):
        outcome.latency_s = time.perf_counter() - outcome.sent_s
        if error is not None:
            outcome.error = str(error)
        else:
            outcome.label = int(result.as_numpy("label").reshape(-1)[0])
        tally.add(failed=error is not None)  # before the slot frees: the sender checks gave_up after taking it
        slots.release()
    return callback


def _sleep_until(moment: float) -> None:
    delay = moment - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


# ---------------------------------------------------------------------------------------------------------------
# the report


def summarize(result: StreamResult, labels: np.ndarray | None) -> dict:
    outcomes, wall_s = result.outcomes, result.wall_s
    answered = [o for o in outcomes if o.error is None and o.label is not None]
    latencies_ms = np.array([o.latency_s * 1e3 for o in answered]) if answered else np.zeros(0)
    return {
        "requests": len(outcomes),
        "answered": len(answered),
        "errors": len(outcomes) - len(answered),
        "error_examples": sorted({o.error or "no answer" for o in outcomes if o.label is None or o.error})[:5],
        "accuracy": _accuracy(answered, labels),
        "per_pattern": _per_pattern(answered, labels),
        "latency_ms": {f"p{q}": float(np.percentile(latencies_ms, q)) if len(latencies_ms) else None
                       for q in (50, 90, 99)},
        "throughput_rps": len(answered) / wall_s if wall_s > 0 else 0.0,
        "wall_s": wall_s,
        "dropped": _count(o.request.dropped for o in outcomes),
        "late": _count(o.request.late for o in outcomes),
        "stopped": result.stopped,
        "interrupted": result.interrupted,
    }


def _accuracy(outcomes: list[Outcome], labels: np.ndarray | None) -> float | None:
    if labels is None or not outcomes:
        return None
    return float(np.mean([o.label == labels[o.request.sample] for o in outcomes]))


def _per_pattern(outcomes: list[Outcome], labels: np.ndarray | None) -> dict[str, dict]:
    groups: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        groups.setdefault(pattern_key(outcome.request.present), []).append(outcome)
    return {key: {"count": len(group), "accuracy": _accuracy(group, labels)} for key, group in sorted(groups.items())}


def _count(groups) -> dict[str, int]:
    counts: dict[str, int] = {}
    for names in groups:
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    return counts


def format_report(summary: dict) -> str:
    lines = [f"{summary['answered']}/{summary['requests']} answered, {summary['errors']} errors, "
             f"{summary['throughput_rps']:.1f} requests/s over {summary['wall_s']:.2f} s"]
    latency = summary["latency_ms"]
    if latency["p50"] is not None:
        lines.append(f"latency ms: p50 {latency['p50']:.2f}  p90 {latency['p90']:.2f}  p99 {latency['p99']:.2f}")
    if summary["accuracy"] is not None:
        lines.append(f"accuracy: {summary['accuracy']:.4f}")
    lines.append(f"{'pattern':<24}{'requests':>10}{'accuracy':>10}")
    for key, row in summary["per_pattern"].items():
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(f"{key:<24}{row['count']:>10}{accuracy:>10}")
    if summary["dropped"] or summary["late"]:
        lines.append(f"left out: dropped {summary['dropped']}, missed the deadline {summary['late']}")
    lines += [f"error: {message}" for message in summary["error_examples"]]
    if summary["stopped"]:
        lines.append(summary["stopped"])
    if summary.get("server"):
        lines += ["", *format_server_figures(summary["server"])]
    return "\n".join(lines)


def scrape(metrics_url: str | None, timeout_s: float, settle: bool = False) -> dict | None:
    """The server's ``ume_*`` counters, or None when there is no metrics URL or it does not answer. With ``settle``,
    after the entry model has handed Triton what it counted so far (it does every ``EntryMetrics.FLUSH_S``)."""
    if not metrics_url:
        return None
    import urllib.error
    import urllib.request

    if settle:
        time.sleep(2 * metrics.EntryMetrics.FLUSH_S)
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout_s) as response:
            return metrics.parse(response.read().decode())
    except (urllib.error.URLError, OSError):
        return None


def server_figures(before: dict | None, after: dict | None) -> dict | None:
    """What the server's entry model counted during the run, per presence pattern, from its metrics."""
    if before is None or after is None:
        return None
    counted = metrics.difference(after, before)
    requests = metrics.by_label(counted, metrics.REQUESTS, "pattern")
    rows = metrics.by_label(counted, metrics.ROWS, "pattern")
    duration = metrics.by_label(counted, metrics.DURATION, "pattern")
    batches = metrics.total(counted, metrics.BATCHES)
    return {"per_pattern": {key: {"requests": int(n), "rows": int(rows.get(key, 0)),
                                  "mean_ms": duration.get(key, 0.0) / n / 1e3 if n else None}
                            for key, n in sorted(requests.items()) if n},
            "rejected": {reason: int(n) for reason, n in metrics.by_label(counted, metrics.REJECTED, "reason").items()
                         if n},
            "batches": int(batches),
            "rows_per_batch": metrics.total(counted, metrics.BATCH_ROWS) / batches if batches else None}


def format_server_figures(figures: dict) -> list[str]:
    lines = ["server (entry-model metrics):", f"{'pattern':<24}{'requests':>10}{'rows':>8}{'mean ms':>10}"]
    for key, row in figures["per_pattern"].items():
        mean = "-" if row["mean_ms"] is None else f"{row['mean_ms']:.3f}"
        lines.append(f"{key:<24}{row['requests']:>10}{row['rows']:>8}{mean:>10}")
    if figures["rows_per_batch"] is not None:
        lines.append(f"pipeline calls: {figures['batches']}, {figures['rows_per_batch']:.2f} rows each on average")
    if figures["rejected"]:
        lines.append(f"refused: {figures['rejected']}")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# entry points


def run_client(url: str = "localhost:8001", model: str = "ume", dataset: str = "avdigits", split: str = "test",
               drop: dict[str, float] | None = None, rate: float | None = None, concurrency: int = 1,
               deadline_ms: float | None = None, requests: int | None = None, seed: int = 0,
               jitter_ms: dict[str, float] | None = None, timeout_s: float = 30.0,
               max_failures: int = DEFAULT_MAX_FAILURES, progress: bool = False,
               json_out: str | Path | None = None, send_mask: bool = False,
               metrics_url: str | None = None) -> dict:
    """Replay ``dataset``/``split`` against ``model`` at ``url`` and return the summary dict."""
    if concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
    if rate is not None and rate <= 0:
        raise ValueError(f"--rate must be positive, got {rate}")
    if not timeout_s > 0:
        raise ValueError(f"--timeout-s must be positive, got {timeout_s}")
    if max_failures < 0:
        raise ValueError(f"--max-failures must be 0 (never stop) or more, got {max_failures}")
    if json_out:
        check_writable(Path(json_out))
    inputs, labels = read_data_set(dataset, split)
    sensors = SensorModel(list(inputs), drop or {}, jitter_ms or {}, deadline_ms)
    samples = len(next(iter(inputs.values())))
    replay = SensorReplay(sensors, samples, np.random.default_rng(seed), 1.0 / rate if rate else UNPACED_PERIOD_S)
    scheduled = replay.requests(samples if requests is None else requests)
    before = scrape(metrics_url, timeout_s, settle=True)
    result = stream(url, model, inputs, scheduled, concurrency=concurrency, rate=rate, timeout_s=timeout_s,
                    max_failures=max_failures, progress=progress, send_mask=send_mask)
    summary = summarize(result, labels)
    after = None if result.interrupted else scrape(metrics_url, timeout_s, settle=before is not None)
    summary["server"] = server_figures(before, after)
    summary["sync_dropped"] = replay.sync.dropped
    summary["settings"] = {"url": url, "model": model, "dataset": dataset, "split": split, "drop": drop or {},
                           "jitter_ms": {name: sensors.mean_delay_ms(name) for name in sensors.modalities},
                           "rate": rate, "concurrency": concurrency, "deadline_ms": sensors.deadline_ms,
                           "seed": seed, "timeout_s": timeout_s, "max_failures": max_failures,
                           "send_mask": send_mask, "metrics_url": metrics_url}
    if json_out:
        write_json(Path(json_out), summary)
    return summary


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ume_edge.client",
        description="Replay a data set as one stream per sensor against a Triton server (gRPC): the readings go "
                    "through a SensorSync, and each frame it emits is one request, without the modalities that "
                    "dropped or missed the deadline; report accuracy per presence pattern, latency percentiles "
                    "and throughput.",
    )
    parser.add_argument("--url", default="localhost:8001", help="gRPC address host:port (default localhost:8001)")
    parser.add_argument("--model", default="ume", help="model name (default ume)")
    parser.add_argument("--dataset", default="avdigits", help="data set name or .npz path (default avdigits)")
    parser.add_argument("--split", default="test", help="split to replay (default test)")
    parser.add_argument("--drop", default="", help="loss probability per sensor, e.g. image=0.2,audio=0.3 "
                        "(default: none lost)")
    parser.add_argument("--jitter-ms", default="", help="mean arrival delay per sensor in ms (exponential), e.g. "
                        f"audio=8,image=3 (default {','.join(f'{k}={v:g}' for k, v in DEFAULT_JITTER_MS.items())}, "
                        f"{FALLBACK_JITTER_MS:g} for other sensors)")
    parser.add_argument("--deadline-ms", type=float, default=None,
                        help="a frame leaves this long after its first reading arrived, with whatever arrived "
                             f"(default: {DEFAULT_DEADLINE_JITTERS:g} x the slowest sensor's mean delay, so only "
                             "lost readings are waited for)")
    parser.add_argument("--rate", type=float, default=None, help="samples per second, replayed in real time "
                        "(default: samples far apart, requests as fast as --concurrency allows)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at most (default 1)")
    parser.add_argument("--requests", type=int, default=None, help="requests to send (default: as many as the "
                        "split has samples; more cycles through it)")
    parser.add_argument("--seed", type=int, default=0, help="seed for drops and jitter (default 0)")
    parser.add_argument("--timeout-s", type=float, default=30.0,
                        help="limit for every call to the server, metadata included (default 30)")
    parser.add_argument("--max-failures", type=int, default=DEFAULT_MAX_FAILURES,
                        help="stop sending after this many failed requests in a row and report what came back; "
                             f"0: never stop (default {DEFAULT_MAX_FAILURES})")
    parser.add_argument("--json", dest="json_out", default=None,
                        help="also write the summary as JSON to this file (default: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar on stderr)")
    parser.add_argument("--send-mask", action="store_true",
                        help="send every modality (zeros where absent) and the 'present' mask, so that the server "
                             "batches requests of every presence pattern together (default: absent modalities are "
                             "left out of the request)")
    parser.add_argument("--metrics-url", default=None,
                        help="the server's metrics endpoint, to print what its entry model counted per presence "
                             "pattern (default: http://<host of --url>:8002/metrics; 'none' to skip)")
    return parser.parse_args(argv)


def default_metrics_url(url: str, given: str | None) -> str | None:
    if given is not None:
        return None if given == "none" else given
    host = url.rsplit(":", 1)[0]
    return f"http://{host}:{DEFAULT_METRICS_PORT}/metrics"


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    show_progress()
    try:
        summary = run_client(
            url=args.url, model=args.model, dataset=args.dataset, split=args.split,
            drop=parse_modality_values(args.drop, "--drop"), rate=args.rate, concurrency=args.concurrency,
            deadline_ms=args.deadline_ms, requests=args.requests, seed=args.seed,
            jitter_ms=parse_modality_values(args.jitter_ms, "--jitter-ms"), timeout_s=args.timeout_s,
            max_failures=args.max_failures, progress=not args.no_progress, json_out=args.json_out,
            send_mask=args.send_mask, metrics_url=default_metrics_url(args.url, args.metrics_url),
        )
    except SummaryNotSaved as error:
        print(format_report(error.summary))
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (ValueError, UmeEdgeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED_EXIT_STATUS
    except Exception as error:  # tritonclient raises its own exception types for an unreachable server
        print(f"error: {error}\n(is the server running? start it with: python -m ume_edge.serve)", file=sys.stderr)
        return 1
    print(format_report(summary))
    if summary["interrupted"]:
        return INTERRUPTED_EXIT_STATUS
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

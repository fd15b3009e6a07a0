"""``run_client``: one replay from the data set (or the recording) to the summary."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ume_edge.client.dataset import read_data_set
from ume_edge.client.options import ClientOptions
from ume_edge.client.report import check_writable, summarize, write_json
from ume_edge.client.server_figures import scrape, server_figures
from ume_edge.client.simulation import UNPACED_PERIOD_S, ScheduledRequest, SensorModel, SensorReplay
from ume_edge.client.streaming import model_input_specs, stream
from ume_edge.constants import PRESENT
from ume_edge.sync import SensorSync

LOGGER = logging.getLogger(__name__)


@dataclass
class _Plan:
    """What to send: the requests, the arrays their ``sample`` indexes, the labels, and the sync that made the frames
    (over ``duration_s`` of sensor time)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    requests: list[ScheduledRequest]
    sync: SensorSync
    duration_s: float | None  # None: no sensor rate to tell
    settings: dict


def run_client(options: ClientOptions) -> dict:
    """Replay ``options.dataset``/``options.split`` (or ``options.recording``) against the server and return the
    summary dict (also written to ``options.json_out`` when given). The data set or recording and the ``--json``
    path are checked before anything is sent."""
    if options.json_out:
        check_writable(Path(options.json_out))
    plan = _recording_plan(options) if options.recording is not None else _data_set_plan(options)
    before = scrape(options.metrics_url, options.timeout_s, settle=True)
    with _sensor_metrics(plan.sync, options):
        result = stream(options, plan.inputs, plan.requests)
    summary = summarize(result, plan.labels)
    after = None if result.interrupted else scrape(options.metrics_url, options.timeout_s, settle=before is not None)
    summary["server"] = server_figures(before, after)
    summary["sync_dropped"] = plan.sync.dropped
    summary["sensors"] = {"duration_s": plan.duration_s, **plan.sync.stats()}
    summary["settings"] = plan.settings
    if options.json_out:
        write_json(Path(options.json_out), summary)
    return summary


@contextmanager
def _sensor_metrics(sync: SensorSync, options: ClientOptions) -> Iterator[None]:
    """The sensors' figures as Prometheus metrics on ``options.sensor_metrics_port`` while the replay runs."""
    if options.sensor_metrics_port is None:
        yield
        return
    from ume_edge.client.sensor_health import SensorMetrics

    metrics = SensorMetrics(sync)
    port = metrics.start(options.sensor_metrics_port, options.sensor_metrics_host)
    LOGGER.info("sensor metrics on http://%s:%d/metrics", options.sensor_metrics_host, port)
    try:
        yield
    finally:
        metrics.stop()


def _data_set_plan(options: ClientOptions) -> _Plan:
    inputs, labels = read_data_set(options.dataset, options.split)
    sensors = SensorModel(list(inputs), dict(options.drop), dict(options.jitter_ms), options.deadline_ms)
    samples = len(next(iter(inputs.values())))
    period_s = 1.0 / options.rate if options.rate else UNPACED_PERIOD_S
    replay = SensorReplay(sensors, samples, np.random.default_rng(options.seed), period_s)
    scheduled = replay.requests(samples if options.requests is None else options.requests)
    duration_s = replay.clock.now if options.rate else None  # unpaced samples are a minute apart: no rate
    return _Plan(inputs, labels, scheduled, replay.sync, duration_s, _settings(options, sensors))


def _recording_plan(options: ClientOptions) -> _Plan:
    """The recording's readings, checked against the model's inputs, through a SensorSync on the recording's clock."""
    from tritonclient.utils import triton_to_np_dtype

    from ume_edge.recording.preprocess import check_input
    from ume_edge.recording.replay import RecordingSource, read_readings, replay

    source = RecordingSource(str(options.recording), dict(options.topics), options.label_topic, options.time,
                             options.start_s, options.duration_s, options.loop, dict(options.preprocess),
                             options.audio_format)
    readings = read_readings(source)
    specs = model_input_specs(options)
    missing = sorted(set(options.topics) - set(specs))
    if missing:
        raise ValueError(f"model {options.model!r} at {options.url} has no input {missing[0]!r} (it has "
                         f"{', '.join(specs)}); name the modalities as the model does in --topic")
    unmapped = sorted(set(specs) - set(options.topics) - {PRESENT})
    if options.send_mask and unmapped:
        raise ValueError(f"--send-mask sends every modality the model takes; give --topic {unmapped[0]}=TOPIC too")
    for reading in readings.readings:
        datatype, shape = specs[reading.modality]
        check_input(reading.modality, reading.array, shape, np.dtype(triton_to_np_dtype(datatype)),
                    reading.modality in readings.preprocessed)
    replayed = replay(readings, list(options.topics), options.deadline_ms, options.rate or 0.0)
    requests = replayed.requests if options.requests is None else replayed.requests[:options.requests]
    settings = {"url": options.url, "model": options.model, "recording": str(options.recording),
                "topics": dict(options.topics), "label_topic": options.label_topic, "time": options.time,
                "rate": options.rate or 0.0, "loop": options.loop, "start_s": options.start_s,
                "duration_s": options.duration_s, "preprocess": dict(options.preprocess),
                "audio_format": options.audio_format, "deadline_ms": replayed.deadline_ms,
                "window_ms": replayed.window_ms, "concurrency": options.concurrency, "timeout_s": options.timeout_s,
                "max_failures": options.max_failures, "send_mask": options.send_mask,
                "metrics_url": options.metrics_url}
    return _Plan(replayed.inputs, replayed.labels, requests, replayed.sync, replayed.duration_s or None, settings)


def _settings(options: ClientOptions, sensors: SensorModel) -> dict:
    """The options as the run used them: every sensor's mean delay and the deadline resolved."""
    return {"url": options.url, "model": options.model, "dataset": options.dataset, "split": options.split,
            "drop": dict(options.drop), "jitter_ms": {name: sensors.mean_delay_ms(name) for name in sensors.modalities},
            "rate": options.rate, "concurrency": options.concurrency, "deadline_ms": sensors.deadline,
            "seed": options.seed, "timeout_s": options.timeout_s, "max_failures": options.max_failures,
            "send_mask": options.send_mask, "metrics_url": options.metrics_url}

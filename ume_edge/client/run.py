"""``run_client``: one replay from the data set to the summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ume_edge.client.dataset import read_data_set
from ume_edge.client.options import ClientOptions
from ume_edge.client.report import check_writable, summarize, write_json
from ume_edge.client.server_figures import scrape, server_figures
from ume_edge.client.simulation import UNPACED_PERIOD_S, SensorModel, SensorReplay
from ume_edge.client.streaming import stream


def run_client(options: ClientOptions) -> dict:
    """Replay ``options.dataset``/``options.split`` against the server and return the summary dict (also written to
    ``options.json_out`` when given). The data set and the ``--json`` path are checked before anything is sent."""
    if options.json_out:
        check_writable(Path(options.json_out))
    inputs, labels = read_data_set(options.dataset, options.split)
    sensors = SensorModel(list(inputs), dict(options.drop), dict(options.jitter_ms), options.deadline_ms)
    samples = len(next(iter(inputs.values())))
    period_s = 1.0 / options.rate if options.rate else UNPACED_PERIOD_S
    replay = SensorReplay(sensors, samples, np.random.default_rng(options.seed), period_s)
    scheduled = replay.requests(samples if options.requests is None else options.requests)
    before = scrape(options.metrics_url, options.timeout_s, settle=True)
    result = stream(options, inputs, scheduled)
    summary = summarize(result, labels)
    after = None if result.interrupted else scrape(options.metrics_url, options.timeout_s, settle=before is not None)
    summary["server"] = server_figures(before, after)
    summary["sync_dropped"] = replay.sync.dropped
    summary["settings"] = _settings(options, sensors)
    if options.json_out:
        write_json(Path(options.json_out), summary)
    return summary


def _settings(options: ClientOptions, sensors: SensorModel) -> dict:
    """The options as the run used them: every sensor's mean delay and the deadline resolved."""
    return {"url": options.url, "model": options.model, "dataset": options.dataset, "split": options.split,
            "drop": dict(options.drop), "jitter_ms": {name: sensors.mean_delay_ms(name) for name in sensors.modalities},
            "rate": options.rate, "concurrency": options.concurrency, "deadline_ms": sensors.deadline,
            "seed": options.seed, "timeout_s": options.timeout_s, "max_failures": options.max_failures,
            "send_mask": options.send_mask, "metrics_url": options.metrics_url}

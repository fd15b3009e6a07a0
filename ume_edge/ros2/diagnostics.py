"""The node's health as ``diagnostic_msgs`` statuses: one per sensor (what the node received and what SensorSync
made of it) and one for the inference. Plain records here; ``node.py`` turns them into messages.

Levels: a sensor is STALE before its first message and when none came for ``stale_after_s``, ERROR when its last
message could not be decoded or preprocessed, else OK. The inference is ERROR when its last request failed, WARN
when frames were skipped because every request slot was busy, else OK.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ume_edge.ros2.inference import InferenceCounts

OK, WARN, ERROR, STALE = "OK", "WARN", "ERROR", "STALE"  # the DiagnosticStatus constants' names
STATUS_PREFIX = "ume_edge"


@dataclass
class SensorHealth:
    """What the node saw of one topic, beside SensorSync's own counts."""

    topic: str
    msgtype: str
    messages: int = 0
    rejected: int = 0  # could not be decoded, preprocessed, or did not fit the engine input
    last_message_s: float | None = None  # on time.monotonic
    last_error: str | None = None  # of the last message; None when it was good


@dataclass
class Status:
    level: str
    name: str
    message: str
    hardware_id: str
    values: dict[str, str] = field(default_factory=dict)


def sensor_status(modality: str, health: SensorHealth, sync_figures: dict[str, Any], now_s: float,
                  stale_after_s: float) -> Status:
    values = {"topic": health.topic, "type": health.msgtype, "messages": str(health.messages),
              "rejected": str(health.rejected), **flatten(sync_figures)}
    if health.last_message_s is None:
        level, message = STALE, "no message yet"
    elif now_s - health.last_message_s > stale_after_s:
        level, message = STALE, f"no message for {now_s - health.last_message_s:.1f} s"
    elif health.last_error is not None:
        level, message = ERROR, health.last_error
    else:
        level, message = OK, "receiving"
    return Status(level, f"{STATUS_PREFIX}: sensor {modality}", message, health.topic, values)


def inference_status(url: str, model: str, counts: InferenceCounts, frame_figures: dict[str, Any]) -> Status:
    values = {"url": url, "model": model, **{name: str(value) for name, value in vars(counts).items()
                                             if name != "last_error" and value is not None},
              **flatten(frame_figures, "frames.")}
    if counts.last_error is not None:
        level, message = ERROR, counts.last_error
    elif counts.skipped_busy:
        level, message = WARN, f"{counts.skipped_busy} frames skipped: {counts.in_flight} requests in flight"
    else:
        level, message = OK, f"{counts.answered} frames answered"
    return Status(level, f"{STATUS_PREFIX}: inference", message, url, values)


def flatten(figures: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"dropped": {"stale": 1}}`` -> ``{"dropped.stale": "1"}``; ``None`` (no figure yet) is left out."""
    flat: dict[str, str] = {}
    for name, value in figures.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{name}."))
        elif value is not None:
            flat[f"{prefix}{name}"] = f"{value:.3g}" if isinstance(value, float) else str(value)
    return flat

"""A recording's readings through a ``SensorSync``, on the recording's own clock.

Every reading arrives at its log time (when the recorder received it) and is stamped with ``header.stamp`` (``time
"header"``, when the message has a header) or its log time. The sync's clock is the log time of the reading being
pushed, and deadlines that pass between two readings are polled at their own moment, so the frames and the time each
leaves are the same on every run, whatever the pace of sending. The window is half the readings' sample period (the
median spacing of a topic's stamps, the shortest over the topics) and the deadline, unless given, one period.

A frame's label is the latest label on the label topic stamped at or before the frame's timestamp (-1, unknown,
before the first label). A modality missing from a frame is "late" when the recording has a reading of it within the
window of the frame's timestamp (it arrived after its frame had left), else "dropped" (not in the recording).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from ume_edge.client.simulation import ScheduledRequest, SimulatedClock
from ume_edge.recording import decoders
from ume_edge.recording.preprocess import engine_reading, load_preprocess
from ume_edge.recording.reader import RecordedMessage, Recording, RecordingError
from ume_edge.sync import Frame, SensorSync

LOGGER = logging.getLogger(__name__)

LABEL_TYPES = ("std_msgs/msg/Int32", "std_msgs/msg/UInt8", "std_msgs/msg/String")
UNKNOWN_LABEL = -1
FALLBACK_PERIOD_S = 1.0  # when no topic has two readings to measure a period from


@dataclass(frozen=True)
class RecordingSource:
    """What to read from a recording: ``topics`` maps modality -> topic; ``start_s``/``duration_s`` are seconds
    from the first message of those topics; ``preprocess`` maps modality -> ``module:function``."""

    path: str
    topics: dict[str, str]
    label_topic: str | None = None
    time: str = decoders.HEADER_TIME
    start_s: float = 0.0
    duration_s: float | None = None
    loop: int = 1
    preprocess: dict[str, str] = field(default_factory=dict)
    audio_format: str | None = None


@dataclass(frozen=True)
class Reading:
    arrival_s: float  # log time
    timestamp_s: float
    modality: str
    array: np.ndarray


@dataclass
class Readings:
    """The decoded, preprocessed readings in arrival order, and the labels as (timestamp_s, label) in time order."""

    readings: list[Reading]
    labels: list[tuple[float, int]] | None
    preprocessed: set[str]


@dataclass
class Replayed:
    """One request per frame; ``inputs[name][i]`` is frame ``i``'s reading (zeros where absent)."""

    requests: list[ScheduledRequest]
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    sync: SensorSync  # after the replay: its stats() describe every sensor
    duration_s: float  # the recording's span, first reading to last
    deadline_ms: float
    window_ms: float


def read_readings(source: RecordingSource) -> Readings:
    """Every reading of ``source``, decoded and preprocessed, repeated ``loop`` times; one line on any problem."""
    functions = {name: load_preprocess(name, spec) for name, spec in source.preprocess.items()}
    unknown = sorted(set(functions) - set(source.topics))
    if unknown:
        raise RecordingError(f"--preprocess names {unknown[0]!r}, which no --topic gives; the modalities are "
                             f"{', '.join(source.topics)}")
    with Recording.open(source.path) as recording:
        wanted = [*source.topics.values(), *([source.label_topic] if source.label_topic else [])]
        recording.check_topics(wanted)
        audio_format = _audio_format(recording, source)
        messages = _within(recording.messages(wanted), source.start_s, source.duration_s)
        modality_of = {topic: name for name, topic in source.topics.items()}
        readings, labels = [], []
        for message in messages:
            stamp = decoders.timestamp(message.message, message.log_time_ns, source.time)
            if message.topic == source.label_topic:
                labels.append((stamp, _label(message)))
            if message.topic in modality_of:
                name = modality_of[message.topic]
                array = engine_reading(name, message.message, message.msgtype, audio_format,
                                       source.preprocess.get(name), functions.get(name))
                readings.append(Reading(message.log_time_ns * 1e-9, stamp, name, array))
    if not readings:
        raise RecordingError(f"{source.path}: no readings on {', '.join(source.topics.values())} in the chosen "
                             f"span; check --start and --duration")
    looped, looped_labels = _looped(readings, sorted(labels), source.loop)
    return Readings(looped, looped_labels if source.label_topic else None, set(functions))


def _within(messages: Iterable[RecordedMessage], start_s: float, duration_s: float | None) -> Iterable[RecordedMessage]:
    first_ns = None
    for message in messages:
        first_ns = message.log_time_ns if first_ns is None else first_ns
        offset_s = (message.log_time_ns - first_ns) * 1e-9
        if duration_s is not None and offset_s >= start_s + duration_s:
            return
        if offset_s >= start_s:
            yield message


def _audio_format(recording: Recording, source: RecordingSource) -> decoders.AudioFormat | None:
    """``--audio-format``, else the first AudioInfo message in the recording, else none."""
    if source.audio_format:
        return decoders.AudioFormat.parse(source.audio_format)
    audio = [topic for topic in source.topics.values() if recording.topics[topic] in decoders.AUDIO_TYPES]
    info_topics = [topic for topic, msgtype in recording.topics.items() if msgtype == decoders.AUDIO_INFO_TYPE]
    if not audio or not info_topics:
        return None
    info = next(iter(recording.messages(info_topics[:1])), None)
    return None if info is None else decoders.AudioFormat.from_info(info.message)


def _label(message: RecordedMessage) -> int:
    if message.msgtype not in LABEL_TYPES:
        raise RecordingError(f"label topic {message.topic} is {message.msgtype}; labels must be one of "
                             f"{', '.join(LABEL_TYPES)}")
    try:
        return int(str(message.message.data).strip())
    except ValueError:
        raise RecordingError(f"label topic {message.topic}: {message.message.data!r} is not a class index") from None


def _looped(readings: list[Reading], labels: list[tuple[float, int]],
            loop: int) -> tuple[list[Reading], list[tuple[float, int]]]:
    """``loop`` copies one after another, each shifted by the recording's span and one period."""
    times = [t for r in readings for t in (r.arrival_s, r.timestamp_s)] + [t for t, _ in labels]
    shift = max(times) - min(times) + sample_period_s(readings)
    looped = [Reading(r.arrival_s + i * shift, r.timestamp_s + i * shift, r.modality, r.array)
              for i in range(loop) for r in readings]
    return looped, [(t + i * shift, label) for i in range(loop) for t, label in labels]


def sample_period_s(readings: list[Reading]) -> float:
    """The median spacing of one modality's stamps, the shortest over the modalities."""
    periods = []
    for name in {reading.modality for reading in readings}:
        stamps = np.unique([reading.timestamp_s for reading in readings if reading.modality == name])
        if len(stamps) > 1:
            periods.append(float(np.median(np.diff(stamps))))
    return min(periods, default=FALLBACK_PERIOD_S)


def replay(source: Readings, modalities: list[str], deadline_ms: float | None, rate: float) -> Replayed:
    """Push the readings into a ``SensorSync`` on the recording's clock; each frame becomes a request, paced at
    ``rate`` times real time (0: as fast as possible)."""
    readings = sorted(source.readings, key=lambda reading: reading.arrival_s)
    period_s = sample_period_s(readings)
    deadline_ms = period_s * 1e3 if deadline_ms is None else deadline_ms
    clock = SimulatedClock()
    sync = SensorSync(modalities, deadline_ms, window_ms=period_s * 1e3 / 2, clock=clock)
    frames = _frames(sync, clock, readings)
    start = readings[0].arrival_s
    stamps = {name: sorted(r.timestamp_s for r in readings if r.modality == name) for name in modalities}
    requests = [_request(index, frame, (emitted - start) / rate if rate else emitted - start, start, stamps,
                         sync.window_s) for index, (frame, emitted) in enumerate(frames)]
    return Replayed(requests, _stacked(modalities, [frame for frame, _ in frames]),
                    _frame_labels([frame for frame, _ in frames], source.labels), sync,
                    readings[-1].arrival_s - start, deadline_ms, period_s * 1e3 / 2)


def _frames(sync: SensorSync, clock: SimulatedClock, readings: list[Reading]) -> list[tuple[Frame, float]]:
    """Every frame the sync emits, with the clock time it left."""
    frames: list[tuple[Frame, float]] = []

    def collect(emitted: list[Frame]) -> None:
        frames.extend((frame, clock.now) for frame in emitted)

    for reading in readings:
        _pass_deadlines(sync, clock, reading.arrival_s, collect)
        clock.now = reading.arrival_s
        collect(sync.push(reading.modality, reading.timestamp_s, reading.array))
    _pass_deadlines(sync, clock, float("inf"), collect)
    collect(sync.flush())
    return frames


def _pass_deadlines(sync: SensorSync, clock: SimulatedClock, until: float,
                    collect: Callable[[list[Frame]], None]) -> None:
    while (due := sync.next_deadline()) is not None and due <= until:
        clock.now = max(clock.now, due)
        collect(sync.poll())


def _request(index: int, frame: Frame, send_at_s: float, start: float, stamps: dict[str, list[float]],
             window_s: float) -> ScheduledRequest:
    absent = [name for name, reading in frame.inputs.items() if reading is None]
    late = tuple(name for name in absent if _has_reading_near(stamps[name], frame.timestamp, window_s))
    dropped = tuple(name for name in absent if name not in late)
    return ScheduledRequest(index, frame.present, frame.timestamp - start, send_at_s, dropped, late)


def _has_reading_near(stamps: list[float], moment: float, window_s: float) -> bool:
    position = bisect.bisect_left(stamps, moment - window_s)
    return position < len(stamps) and stamps[position] <= moment + window_s


def _stacked(modalities: list[str], frames: list[Frame]) -> dict[str, np.ndarray]:
    inputs = {}
    for name in modalities:
        example = next((frame.inputs[name] for frame in frames if frame.inputs[name] is not None), None)
        if example is None:
            raise RecordingError(f"no frame has a {name} reading; check --topic {name}=TOPIC")
        inputs[name] = np.stack([np.zeros_like(example) if frame.inputs[name] is None else frame.inputs[name]
                                 for frame in frames])
    return inputs


def _frame_labels(frames: list[Frame], labels: list[tuple[float, int]] | None) -> np.ndarray | None:
    if labels is None:
        return None
    times = [t for t, _ in labels]
    positions = [bisect.bisect_right(times, frame.timestamp) - 1 for frame in frames]
    return np.array([labels[p][1] if p >= 0 else UNKNOWN_LABEL for p in positions], dtype=np.int64)


"""Simulated sensors: which modalities of each sample reach the server, and when the request for it leaves.

Every sensor (modality) is a stream on a simulated clock: sample ``i`` is captured at ``i * period_s`` and stamped
with that time; each sensor's reading of it is lost with its ``drop`` probability, or arrives after a random delay
(exponential, mean ``jitter_ms``, drawn afresh for every reading). The readings go, in order of arrival, into a
``SensorSync`` with the deadline and a window of half the sample period, and each frame it emits becomes one
``ScheduledRequest``, without the modalities missing from the frame: those that were lost ("dropped") and those that
arrived after their frame had left ("missed the deadline"). A sample whose every reading is lost makes no request.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import numpy as np

from ume_edge.sync import Frame, SensorSync

DEFAULT_JITTER_MS = {"audio": 8.0, "image": 3.0}
FALLBACK_JITTER_MS = 5.0
DEFAULT_DEADLINE_JITTERS = 10.0  # without --deadline-ms: 10 mean delays of the slowest sensor (late: p < 5e-5)
UNPACED_PERIOD_S = 60.0  # sample spacing on the simulated clock without --rate: samples never meet
MAX_LOST_SAMPLES = 1000


@dataclass
class ScheduledRequest:
    """One frame from the SensorSync, to be sent: the sample it holds, its modalities, and the times on the
    simulated clock (the first sample is captured at 0) when it was captured and when the sync emitted it."""

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

    def __post_init__(self) -> None:
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

    @property
    def deadline(self) -> float:
        """``deadline_ms``, set by now."""
        assert self.deadline_ms is not None
        return self.deadline_ms

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

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SensorReplay:
    """The simulated sensors feeding a SensorSync on a simulated clock; the frames it emits become the requests."""

    def __init__(self, sensors: SensorModel, samples: int, rng: np.random.Generator, period_s: float):
        self.sensors, self.samples, self.rng, self.period_s = sensors, samples, rng, period_s
        self.clock = SimulatedClock()
        self.sync = SensorSync(sensors.modalities, sensors.deadline, window_ms=period_s * 1e3 / 2, clock=self.clock)
        self._arrivals: list[tuple[float, int, str, int]] = []  # heap of (arrival_s, order, modality, sample)
        self._order = itertools.count()
        self._lost_by_sample: dict[int, list[str]] = {}
        self._next_sample = self._lost_in_a_row = 0

    def requests(self, count: int) -> list[ScheduledRequest]:
        """Replay until the sync has emitted ``count`` frames."""
        requests: list[ScheduledRequest] = []
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

    def _deliver_next(self) -> list[ScheduledRequest]:
        """Let the deadlines before the next arrival pass, then push that reading (its payload: the sample index)."""
        arrival_s, _, name, index = heapq.heappop(self._arrivals)
        requests = []
        while (due := self.sync.next_deadline()) is not None and due <= arrival_s:
            self.clock.now = due
            requests += self._as_requests(self.sync.poll())
        self.clock.now = arrival_s
        return requests + self._as_requests(self.sync.push(name, index * self.period_s, index))

    def _as_requests(self, frames: list[Frame]) -> list[ScheduledRequest]:
        requests = []
        for frame in frames:
            index = next(reading for reading in frame.inputs.values() if reading is not None)
            lost = self._lost_by_sample.pop(index)
            late = [name for name in self.sensors.modalities if frame.inputs[name] is None and name not in lost]
            requests.append(ScheduledRequest(index % self.samples, frame.present, frame.timestamp, self.clock.now,
                                             tuple(lost), tuple(late)))
        return requests

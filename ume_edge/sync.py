"""Group sensor readings that belong together into frames, waiting for late sensors no longer than a deadline.

    sync = SensorSync(["audio", "image"], deadline_ms=30, window_ms=15)
    frames = sync.push("image", stamp_s, array)  # frames this reading completed, or whose deadline has passed
    frames += sync.poll()                        # call it on a timer: deadlines pass without any reading

A reading joins the open frame whose first reading's timestamp is nearest to its own, if that is within
``window_ms``; otherwise it opens a new frame. A frame is emitted as soon as every modality has a reading in it, or
once ``deadline_ms`` have passed on ``clock`` since its first reading arrived; the modalities that did not arrive
are ``None`` in ``Frame.inputs``. A frame is never empty. Frames leave in timestamp order: when a frame is ready,
every older frame still open leaves with it, incomplete (with in-order sensor streams their missing readings could
only arrive out of order now).

Readings that cannot join are counted in ``dropped`` by reason and left out, never raised:

- ``stale``: the timestamp is at or before the last emitted frame's, or within ``window_ms`` after it (it belongs
  to a frame that has already left);
- ``out_of_order``: the timestamp is before the latest accepted reading of the same modality;
- ``duplicate``: the frame it belongs to already has a reading of this modality (outside the window of every open
  frame, a reading opens a new frame instead);
- ``non_finite``: the timestamp is NaN or infinite.

A sensor whose clock jumps back (a reading stamped more than ``clock_jump_ms`` before that sensor's newest accepted
reading, 1 s by default) would otherwise have every reading dropped as ``stale`` until its clock caught up. Instead
the sync logs a WARNING naming the sensor and the jump, and from then on shifts that sensor's timestamps so that the
reading lands where the sensor's previous reading plus the time passed on ``clock`` puts it; its readings join
frames again. A jump forward cannot be told from a pause in the stream and is not corrected.

Policies, keyword-only; without them the rules above are all there is:

- ``offset_ms={modality: ms}`` is added to that sensor's timestamps before anything else looks at them (the clock
  jump check included): a sensor that stamps its readings 50 ms late joins its frames with ``-50``.
- ``max_age_ms={modality: ms}``, hold-last: a frame that leaves without that modality carries the newest reading of
  it that has already left in an earlier frame, if that reading's timestamp is at most ``ms`` before the frame's
  timestamp. ``Frame.held`` names the modalities so filled. Only frames that have left lend readings, so a frame
  never carries a reading from its future.
- ``required=[...]``: a frame that leaves without one of these modalities (after hold-last) is dropped, not
  emitted, and counted.
- ``max_open=N`` (default ``DEFAULT_MAX_OPEN``, 64): when a reading opens frame N + 1, the oldest open frame leaves
  at once, incomplete, and is counted as evicted. A frame stays open for at most ``deadline_ms``, so a sync holds
  about rate x deadline frames (3 for 30 Hz sensors and a 100 ms deadline; 64 is 640 Hz at 100 ms): the bound
  changes nothing for a working sensor set, and caps what a silent sensor and a stalled clock can pile up (every
  open frame holds its arrays: 64 camera images of 1 MB are 64 MB).

``stats()`` returns plain dicts, for a report or a JSON summary:

- ``modalities[name]``: ``received`` (every push), ``included`` (readings emitted in a frame), ``pending`` (in
  frames still open), ``dropped`` by reason (the four above, and ``required_missing``: the reading was in a frame
  dropped for lack of a required modality), so that received = included + pending + dropped, and pending is 0 after
  ``flush()``. ``held`` counts the emitted frames that carried an older reading by hold-last; a held reading is
  not received again, so it counts in no other figure. ``age_ms``: ``p50`` and ``p99`` of the age at emit, the time
  on ``clock`` from a reading's arrival (its ``push``) to the emission of a frame carrying it, held readings
  included; nearest-rank percentiles over the last ``AGE_WINDOW`` (1024) ages, ``None`` before the first.
- ``frames``: ``emitted``, ``open``, ``dropped`` by reason (``required_missing``), and ``evicted`` (frames that
  left because of ``max_open``, emitted or dropped).

The cost of a push does not grow with the number of open frames: they are kept in a list sorted by timestamp beside
a list of their timestamps, so finding a reading's frame is a bisection; frames open near the end and leave from
the front, which moves at most ``max_open`` pointers (one memmove, under a microsecond at the default). Deadlines
are a heap, so the frames past their deadline are found without a scan; the heap entries of frames that left
early are skipped when they surface and swept once they outnumber the open frames. Memory is bounded by
``max_open`` frames and ``AGE_WINDOW`` ages per modality, whatever the streams do.

An unknown modality name raises ``ValueError``: that is a programming error, not a sensor fault. Timestamps
(``timestamp_s``) and the clock are separate time bases: timestamps only decide which readings belong together,
the clock only measures deadlines and ages. Choose ``window_ms`` below the sensors' sample period (half of it is a
good choice), or consecutive samples merge. ``push``, ``poll``, ``flush`` and ``stats`` hold a lock, so callbacks
may call them from several threads (an rclpy ``MultiThreadedExecutor``, for instance).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

LOGGER = logging.getLogger(__name__)

DROP_REASONS = ("stale", "out_of_order", "duplicate", "non_finite")
FRAME_DROP_REASONS = ("required_missing",)
DEFAULT_CLOCK_JUMP_MS = 1000.0  # far beyond any reordering of readings that can still make a frame
DEFAULT_MAX_OPEN = 64
AGE_WINDOW = 1024


@dataclass(frozen=True)
class Frame:
    """Readings of every modality for one moment: ``inputs[name]`` is ``None`` where a reading did not arrive;
    ``held`` names the modalities whose reading is an older one, reused by hold-last."""

    timestamp: float  # of the frame's first reading
    inputs: dict[str, Any]
    held: tuple[str, ...] = ()

    @property
    def present(self) -> tuple[str, ...]:
        return tuple(name for name, reading in self.inputs.items() if reading is not None)


@dataclass(frozen=True)
class _Reading:
    array: Any
    timestamp: float
    arrived: float  # on the clock


@dataclass
class _OpenFrame:
    timestamp: float
    due: float  # on the clock: when the deadline passes
    readings: dict[str, _Reading] = field(default_factory=dict)
    closed: bool = False


@dataclass
class _SensorCounts:
    received: int = 0
    included: int = 0
    held: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS + FRAME_DROP_REASONS, 0))
    ages_ms: deque[float] = field(default_factory=lambda: deque(maxlen=AGE_WINDOW))


@dataclass
class _FrameCounts:
    emitted: int = 0
    evicted: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FRAME_DROP_REASONS, 0))


class SensorSync:
    """Collects readings of ``modalities`` into frames; see the module docstring for the rules and policies."""

    def __init__(self, modalities: Iterable[str], deadline_ms: float, window_ms: float | None = None,
                 clock: Callable[[], float] = time.monotonic, clock_jump_ms: float = DEFAULT_CLOCK_JUMP_MS, *,
                 max_age_ms: Mapping[str, float] | None = None, required: Iterable[str] = (),
                 offset_ms: Mapping[str, float] | None = None, max_open: int = DEFAULT_MAX_OPEN):
        self.modalities = tuple(modalities)
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"SensorSync needs distinct modality names, got {list(self.modalities)}")
        window_ms = deadline_ms if window_ms is None else window_ms
        if not (math.isfinite(deadline_ms) and deadline_ms > 0):
            raise ValueError(f"deadline_ms must be a positive number, got {deadline_ms}")
        if not (math.isfinite(window_ms) and window_ms >= 0):
            raise ValueError(f"window_ms must be a number >= 0, got {window_ms}")
        if not (math.isfinite(clock_jump_ms) and clock_jump_ms > 0):
            raise ValueError(f"clock_jump_ms must be a positive number, got {clock_jump_ms}")
        if isinstance(max_open, bool) or not isinstance(max_open, int) or max_open < 1:
            raise ValueError(f"max_open must be a whole number >= 1, got {max_open!r}")
        self.deadline_s, self.window_s, self.clock_jump_s = deadline_ms / 1e3, window_ms / 1e3, clock_jump_ms / 1e3
        self.max_age_s = self._seconds_per_modality("max_age_ms", max_age_ms or {}, non_negative=True)
        self.offset_s = self._seconds_per_modality("offset_ms", offset_ms or {}, non_negative=False)
        self.required = tuple(required)
        self._check_known("required", self.required)
        self.max_open = max_open
        self._clock = clock
        self._lock = threading.Lock()
        self._open: list[_OpenFrame] = []  # sorted by timestamp
        self._stamps: list[float] = []  # their timestamps, for bisect
        self._deadlines: list[tuple[float, int, _OpenFrame]] = []  # heap of (due, order, frame)
        self._order = itertools.count()
        self._last_emitted: float | None = None
        self._latest: dict[str, tuple[float, float]] = {}  # modality -> (timestamp, clock time) of its newest reading
        self._shifts = dict.fromkeys(self.modalities, 0.0)  # added to each modality's timestamps since a jump back
        self._last_left: dict[str, _Reading] = {}  # modality -> its newest reading in a frame that has left
        self._sensors = {name: _SensorCounts() for name in self.modalities}
        self._frames = _FrameCounts()

    def _check_known(self, setting: str, names: Iterable[str]) -> None:
        unknown = [name for name in names if name not in self.modalities]
        if unknown:
            raise ValueError(f"{setting} names unknown modalities {unknown}; the modalities are "
                             f"{', '.join(self.modalities)}")

    def _seconds_per_modality(self, setting: str, values_ms: Mapping[str, float],
                              non_negative: bool) -> dict[str, float]:
        self._check_known(setting, values_ms)
        for name, value in values_ms.items():
            if not math.isfinite(value) or (non_negative and value < 0):
                raise ValueError(f"{setting}[{name!r}] must be a finite number{' >= 0' * non_negative}, got {value}")
        return {name: value / 1e3 for name, value in values_ms.items()}

    @property
    def dropped(self) -> dict[str, int]:
        """Readings left out so far, by reason."""
        with self._lock:
            return {reason: sum(sensor.dropped[reason] for sensor in self._sensors.values())
                    for reason in DROP_REASONS}

    def stats(self) -> dict[str, Any]:
        """Per modality and per frame counts and ages, as the module docstring defines them."""
        with self._lock:
            sensors = {name: _sensor_stats(counts, sum(name in frame.readings for frame in self._open))
                       for name, counts in self._sensors.items()}
            frames = self._frames
            return {"modalities": sensors, "frames": {"emitted": frames.emitted, "evicted": frames.evicted,
                                                      "open": len(self._open), "dropped": dict(frames.dropped)}}

    def push(self, modality: str, timestamp_s: float, array: Any) -> list[Frame]:
        """Add one reading; returns the frames this call completed or found past their deadline."""
        if modality not in self.modalities:
            raise ValueError(f"unknown modality {modality!r}; the modalities are {', '.join(self.modalities)}")
        if array is None:
            raise ValueError(f"push a reading for {modality!r}, not None (None marks a missing reading)")
        with self._lock:
            now = self._clock()
            self._sensors[modality].received += 1
            frames = self._take_ready(now)
            timestamp = float(timestamp_s) + self.offset_s.get(modality, 0.0)
            placed = self._place(modality, timestamp, array, now)
            if isinstance(placed, str):
                self._sensors[modality].dropped[placed] += 1
                LOGGER.debug("dropped a %s reading stamped %s: %s", modality, timestamp_s, placed)
                return frames
            return frames + placed

    def poll(self) -> list[Frame]:
        """The frames whose deadline has passed (and any complete ones they held back)."""
        with self._lock:
            return self._take_ready(self._clock())

    def flush(self) -> list[Frame]:
        """Every open frame, incomplete or not: for shutdown."""
        with self._lock:
            return self._leave(len(self._open), self._clock())

    def next_deadline(self) -> float | None:
        """The clock time at which the earliest open frame's deadline passes; ``None`` when no frame is open."""
        with self._lock:
            self._skip_closed_deadlines()
            return self._deadlines[0][0] if self._deadlines else None

    def _place(self, modality: str, timestamp: float, array: Any, now: float) -> str | list[Frame]:
        """Put the reading into its frame; returns why it was dropped, or the frames that left because of it."""
        if not math.isfinite(timestamp):
            return "non_finite"
        timestamp = self._resynchronised(modality, timestamp, now)
        if self._last_emitted is not None and timestamp <= self._last_emitted + self.window_s:
            return "stale"
        if timestamp < self._latest.get(modality, (-math.inf,))[0]:
            return "out_of_order"
        index = self._frame_for(timestamp)
        if index is None:
            return self._open_frame(modality, _Reading(array, timestamp, now), now)
        frame = self._open[index]
        if modality in frame.readings:
            return "duplicate"
        frame.readings[modality] = _Reading(array, timestamp, now)
        self._latest[modality] = (timestamp, now)
        return self._leave(index + 1, now) if len(frame.readings) == len(self.modalities) else []

    def _open_frame(self, modality: str, reading: _Reading, now: float) -> list[Frame]:
        """A new frame holding ``reading``; returns the oldest open frame when the new one is one too many."""
        frame = _OpenFrame(reading.timestamp, now + self.deadline_s, {modality: reading})
        index = bisect.bisect(self._stamps, reading.timestamp)
        self._stamps.insert(index, reading.timestamp)
        self._open.insert(index, frame)
        heapq.heappush(self._deadlines, (frame.due, next(self._order), frame))
        self._latest[modality] = (reading.timestamp, now)
        if len(self._open) <= self.max_open:
            return []
        self._frames.evicted += 1
        LOGGER.debug("%d frames open: the oldest, stamped %s, leaves incomplete", len(self._open), self._stamps[0])
        return self._leave(1, now)

    def _resynchronised(self, modality: str, timestamp: float, now: float) -> float:
        """The timestamp on the modality's own time base, shifted anew when its clock has just jumped back."""
        shift = self._shifts[modality]
        newest, arrived = self._latest.get(modality, (-math.inf, now))
        if timestamp + shift >= newest - self.clock_jump_s:
            return timestamp + shift
        expected = newest + max(0.0, now - arrived)
        self._shifts[modality] = expected - timestamp
        LOGGER.warning("the %s sensor's clock jumped back %.3f s (a reading stamped %.3f s after one stamped %.3f s); "
                       "shifting its timestamps by %+.3f s from now on", modality, expected - timestamp - shift,
                       timestamp, newest - shift, self._shifts[modality])
        return expected

    def _frame_for(self, timestamp: float) -> int | None:
        """The index of the open frame with the nearest first reading within the window (the older one on a tie)."""
        after = bisect.bisect_left(self._stamps, timestamp)
        gap_before = timestamp - self._stamps[after - 1] if after > 0 else math.inf
        gap_after = self._stamps[after] - timestamp if after < len(self._stamps) else math.inf
        if min(gap_before, gap_after) > self.window_s:
            return None
        return after - 1 if gap_before <= gap_after else after

    def _take_ready(self, now: float) -> list[Frame]:
        """The frames past their deadline, with every older one."""
        newest_due: float | None = None
        while self._deadlines and self._deadlines[0][0] <= now:
            frame = heapq.heappop(self._deadlines)[2]
            if not frame.closed:
                newest_due = frame.timestamp if newest_due is None else max(newest_due, frame.timestamp)
        return [] if newest_due is None else self._leave(bisect.bisect_right(self._stamps, newest_due), now)

    def _skip_closed_deadlines(self) -> None:
        while self._deadlines and self._deadlines[0][2].closed:
            heapq.heappop(self._deadlines)

    def _leave(self, count: int, now: float) -> list[Frame]:
        """The first ``count`` open frames leave: those that may, as frames."""
        leaving = self._open[:count]
        del self._open[:count], self._stamps[:count]
        for frame in leaving:
            frame.closed = True
        if len(self._deadlines) > 2 * len(self._open) + 16:
            self._deadlines = [entry for entry in self._deadlines if not entry[2].closed]
            heapq.heapify(self._deadlines)
        if leaving:
            self._last_emitted = leaving[-1].timestamp
        return [frame for frame in (self._finish(frame, now) for frame in leaving) if frame is not None]

    def _finish(self, frame: _OpenFrame, now: float) -> Frame | None:
        """The leaving frame with hold-last applied, or ``None`` when a required modality is missing; counted."""
        readings, held = dict(frame.readings), []
        for name, max_age_s in self.max_age_s.items():
            last = self._last_left.get(name)
            if name not in readings and last is not None and frame.timestamp - last.timestamp <= max_age_s:
                readings[name] = last
                held.append(name)
        self._last_left.update(frame.readings)
        if any(name not in readings for name in self.required):
            self._frames.dropped["required_missing"] += 1
            for name in frame.readings:
                self._sensors[name].dropped["required_missing"] += 1
            return None
        self._frames.emitted += 1
        for name, reading in readings.items():
            sensor = self._sensors[name]
            sensor.ages_ms.append((now - reading.arrived) * 1e3)
            if name in held:
                sensor.held += 1
            else:
                sensor.included += 1
        return Frame(frame.timestamp, {name: readings[name].array if name in readings else None
                                       for name in self.modalities}, tuple(held))


def _sensor_stats(sensor: _SensorCounts, pending: int) -> dict[str, Any]:
    ages = sorted(sensor.ages_ms)
    return {"received": sensor.received, "included": sensor.included, "pending": pending, "held": sensor.held,
            "dropped": dict(sensor.dropped), "age_ms": {"p50": _nearest_rank(ages, 50), "p99": _nearest_rank(ages, 99)}}


def _nearest_rank(ordered: list[float], percent: float) -> float | None:
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)] if ordered else None

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

An unknown modality name raises ``ValueError``: that is a programming error, not a sensor fault. Timestamps
(``timestamp_s``) and the clock are separate time bases: timestamps only decide which readings belong together,
the clock only measures deadlines. Choose ``window_ms`` below the sensors' sample period (half of it is a good
choice), or consecutive samples merge. ``push``, ``poll`` and ``flush`` hold a lock, so callbacks may call them
from several threads (an rclpy ``MultiThreadedExecutor``, for instance).
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

LOGGER = logging.getLogger(__name__)

DROP_REASONS = ("stale", "out_of_order", "duplicate", "non_finite")
DEFAULT_CLOCK_JUMP_MS = 1000.0  # far beyond any reordering of readings that can still make a frame


@dataclass(frozen=True)
class Frame:
    """Readings of every modality for one moment: ``inputs[name]`` is ``None`` where a reading did not arrive."""

    timestamp: float  # of the frame's first reading
    inputs: dict[str, Any]

    @property
    def present(self) -> tuple[str, ...]:
        return tuple(name for name, reading in self.inputs.items() if reading is not None)


@dataclass
class _OpenFrame:
    timestamp: float
    due: float  # on the clock: when the deadline passes
    readings: dict[str, Any] = field(default_factory=dict)


class SensorSync:
    """Collects readings of ``modalities`` into frames; see the module docstring for the rules."""

    def __init__(self, modalities: Iterable[str], deadline_ms: float, window_ms: float | None = None,
                 clock: Callable[[], float] = time.monotonic, clock_jump_ms: float = DEFAULT_CLOCK_JUMP_MS):
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
        self.deadline_s, self.window_s, self.clock_jump_s = deadline_ms / 1e3, window_ms / 1e3, clock_jump_ms / 1e3
        self._clock = clock
        self._lock = threading.Lock()
        self._open: list[_OpenFrame] = []  # sorted by timestamp
        self._last_emitted: float | None = None
        self._latest: dict[str, tuple[float, float]] = {}  # modality -> (timestamp, clock time) of its newest reading
        self._offsets = dict.fromkeys(self.modalities, 0.0)  # added to each modality's timestamps since a jump back
        self._dropped = dict.fromkeys(DROP_REASONS, 0)

    @property
    def dropped(self) -> dict[str, int]:
        """Readings left out so far, by reason."""
        with self._lock:
            return dict(self._dropped)

    def push(self, modality: str, timestamp_s: float, array: Any) -> list[Frame]:
        """Add one reading; returns the frames this call completed or found past their deadline."""
        if modality not in self.modalities:
            raise ValueError(f"unknown modality {modality!r}; the modalities are {', '.join(self.modalities)}")
        if array is None:
            raise ValueError(f"push a reading for {modality!r}, not None (None marks a missing reading)")
        with self._lock:
            now = self._clock()
            frames = self._take_ready(now)
            reason = self._place(modality, float(timestamp_s), array, now)
            if reason:
                self._dropped[reason] += 1
                LOGGER.debug("dropped a %s reading stamped %s: %s", modality, timestamp_s, reason)
            return frames + self._take_ready(now)

    def poll(self) -> list[Frame]:
        """The frames whose deadline has passed (and any complete ones they held back)."""
        with self._lock:
            return self._take_ready(self._clock())

    def flush(self) -> list[Frame]:
        """Every open frame, incomplete or not: for shutdown."""
        with self._lock:
            return self._emit(len(self._open))

    def next_deadline(self) -> float | None:
        """The clock time at which the earliest open frame's deadline passes; ``None`` when no frame is open."""
        with self._lock:
            return min((frame.due for frame in self._open), default=None)

    def _place(self, modality: str, timestamp: float, array: Any, now: float) -> str | None:
        """Put the reading into its frame; returns why it was dropped, or ``None``."""
        if not math.isfinite(timestamp):
            return "non_finite"
        timestamp = self._resynchronised(modality, timestamp, now)
        if self._last_emitted is not None and timestamp <= self._last_emitted + self.window_s:
            return "stale"
        if timestamp < self._latest.get(modality, (-math.inf,))[0]:
            return "out_of_order"
        frame = self._frame_for(timestamp)
        if frame is None:
            frame = _OpenFrame(timestamp, now + self.deadline_s)
            bisect.insort(self._open, frame, key=lambda open_frame: open_frame.timestamp)
        elif modality in frame.readings:
            return "duplicate"
        frame.readings[modality] = array
        self._latest[modality] = (timestamp, now)
        return None

    def _resynchronised(self, modality: str, timestamp: float, now: float) -> float:
        """The timestamp on the modality's own time base, shifted anew when its clock has just jumped back."""
        offset = self._offsets[modality]
        newest, arrived = self._latest.get(modality, (-math.inf, now))
        if timestamp + offset >= newest - self.clock_jump_s:
            return timestamp + offset
        expected = newest + max(0.0, now - arrived)
        self._offsets[modality] = expected - timestamp
        LOGGER.warning("the %s sensor's clock jumped back %.3f s (a reading stamped %.3f s after one stamped %.3f s); "
                       "shifting its timestamps by %+.3f s from now on", modality, expected - timestamp - offset,
                       timestamp, newest - offset, self._offsets[modality])
        return expected

    def _frame_for(self, timestamp: float) -> _OpenFrame | None:
        """The open frame with the nearest first reading within the window (the older one on a tie)."""
        candidates = [frame for frame in self._open if abs(timestamp - frame.timestamp) <= self.window_s]
        return min(candidates, key=lambda frame: abs(timestamp - frame.timestamp), default=None)

    def _take_ready(self, now: float) -> list[Frame]:
        ready = [index for index, frame in enumerate(self._open)
                 if now >= frame.due or len(frame.readings) == len(self.modalities)]
        return self._emit(ready[-1] + 1) if ready else []

    def _emit(self, count: int) -> list[Frame]:
        leaving, self._open = self._open[:count], self._open[count:]
        if leaving:
            self._last_emitted = leaving[-1].timestamp
        return [Frame(frame.timestamp, {name: frame.readings.get(name) for name in self.modalities})
                for frame in leaving]

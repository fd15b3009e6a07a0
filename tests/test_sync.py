"""``ume_edge.sync.SensorSync``: grouping readings into frames, deadlines, and readings it must drop."""

import math
import threading

import pytest

from ume_edge.sync import SensorSync

MODALITIES = ["audio", "image"]


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance_ms(self, ms):
        self.now += ms / 1e3


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def sync(clock):
    return SensorSync(MODALITIES, deadline_ms=30, window_ms=10, clock=clock)


def test_a_frame_leaves_on_the_push_that_completes_it(sync, clock):
    assert sync.push("image", 1.000, "i0") == []
    clock.advance_ms(5)
    assert sync.poll() == []
    (frame,) = sync.push("audio", 1.002, "a0")
    assert frame.timestamp == 1.000
    assert frame.inputs == {"audio": "a0", "image": "i0"}
    assert frame.present == ("audio", "image")
    assert sync.poll() == [] and sync.flush() == []


def test_a_frame_leaves_at_its_deadline_with_none_for_the_missing_modality(sync, clock):
    sync.push("image", 1.0, "i0")
    assert sync.next_deadline() == pytest.approx(100.030)
    clock.advance_ms(29.9)
    assert sync.poll() == []
    clock.advance_ms(0.1)
    (frame,) = sync.poll()
    assert frame.inputs == {"audio": None, "image": "i0"} and frame.present == ("image",)
    assert sync.next_deadline() is None


def test_the_deadline_counts_from_the_first_readings_arrival_not_its_timestamp(sync, clock):
    sync.push("image", 0.5, "i0")  # stamped long ago: only the clock decides the deadline
    clock.advance_ms(20)
    assert sync.poll() == []
    clock.advance_ms(10)
    assert [frame.timestamp for frame in sync.poll()] == [0.5]


def test_a_push_after_the_deadline_emits_the_expired_frame_first(sync, clock):
    sync.push("image", 1.0, "i0")
    clock.advance_ms(40)
    frames = sync.push("audio", 1.001, "a0")  # too late for its frame
    assert [frame.inputs for frame in frames] == [{"audio": None, "image": "i0"}]
    assert sync.dropped["stale"] == 1


def test_window_just_inside_joins_just_outside_opens_a_new_frame(sync, clock):
    sync.push("image", 1.0, "i0")
    (frame,) = sync.push("audio", 1.0099, "a0")
    assert frame.inputs == {"audio": "a0", "image": "i0"}

    sync.push("image", 2.0, "i1")
    assert sync.push("audio", 2.0101, "a1") == []  # outside the window: a frame of its own
    clock.advance_ms(30)
    frames = sync.poll()
    assert [(f.timestamp, f.inputs) for f in frames] == [(2.0, {"audio": None, "image": "i1"}),
                                                        (2.0101, {"audio": "a1", "image": None})]


def test_a_reading_stamped_before_the_first_one_joins_within_the_window(sync):
    sync.push("image", 1.0, "i0")
    (frame,) = sync.push("audio", 0.995, "a0")
    assert frame.timestamp == 1.0 and frame.present == ("audio", "image")


def test_window_defaults_to_the_deadline(clock):
    sync = SensorSync(MODALITIES, deadline_ms=30, clock=clock)
    sync.push("image", 1.0, "i0")
    assert len(sync.push("audio", 1.0299, "a0")) == 1
    sync.push("image", 2.0, "i1")
    assert sync.push("audio", 2.0301, "a1") == []


def test_a_reading_joins_the_nearest_open_frame(sync):
    sync.push("image", 1.000, "i0")
    sync.push("image", 1.015, "i1")
    frames = sync.push("audio", 1.009, "a1")  # within the window of both: nearer to 1.015
    assert [(f.timestamp, f.present) for f in frames] == [(1.000, ("image",)), (1.015, ("audio", "image"))]


def test_an_older_open_frame_leaves_with_a_newer_complete_one(sync):
    sync.push("image", 1.00, "i0")
    sync.push("image", 1.05, "i1")
    frames = sync.push("audio", 1.05, "a1")
    assert [(f.timestamp, f.present) for f in frames] == [(1.00, ("image",)), (1.05, ("audio", "image"))]


def test_duplicate_reading_of_a_modality_is_counted_and_dropped(sync, clock):
    sync.push("image", 1.000, "i0")
    assert sync.push("image", 1.000, "again") == []
    assert sync.push("image", 1.004, "i0b") == []  # later, but within the frame's window
    assert sync.dropped["duplicate"] == 2
    clock.advance_ms(30)
    (frame,) = sync.poll()
    assert frame.inputs["image"] == "i0"


def test_out_of_order_reading_is_counted_and_dropped(sync, clock):
    sync.push("audio", 1.05, "a1")
    assert sync.push("audio", 1.00, "a0") == []
    assert sync.dropped["out_of_order"] == 1
    clock.advance_ms(30)
    assert [f.timestamp for f in sync.poll()] == [1.05]


def test_stale_readings_are_counted_and_dropped(sync, clock):
    (_,) = [*sync.push("image", 1.0, "i0"), *sync.push("audio", 1.0, "a0")]
    for stamp in (1.0, 0.5, 1.0 + 0.009):  # at, before, and within the window after the last emitted frame
        assert sync.push("audio", stamp, "late") == []
    assert sync.dropped == {"stale": 3, "out_of_order": 0, "duplicate": 0, "non_finite": 0}
    assert sync.push("image", 1.02, "i1") == []  # past the window: a new frame
    clock.advance_ms(30)
    assert [f.timestamp for f in sync.poll()] == [1.02]


def test_non_finite_timestamps_are_counted_and_dropped(sync):
    for stamp in (math.nan, math.inf, -math.inf):
        assert sync.push("image", stamp, "bad") == []
    assert sync.dropped["non_finite"] == 3
    assert sync.flush() == []


def test_unknown_modality_and_bad_settings_raise(sync):
    with pytest.raises(ValueError, match="unknown modality 'video'.*audio, image"):
        sync.push("video", 1.0, "v")
    with pytest.raises(ValueError, match="not None"):
        sync.push("audio", 1.0, None)
    with pytest.raises(ValueError, match="deadline_ms"):
        SensorSync(MODALITIES, deadline_ms=0)
    with pytest.raises(ValueError, match="window_ms"):
        SensorSync(MODALITIES, deadline_ms=10, window_ms=math.nan)
    with pytest.raises(ValueError, match="distinct"):
        SensorSync(["audio", "audio"], deadline_ms=10)


def test_flush_emits_every_open_frame_in_timestamp_order(sync):
    sync.push("image", 2.0, "i1")
    sync.push("audio", 1.0, "a0")
    frames = sync.flush()
    assert [(f.timestamp, f.present) for f in frames] == [(1.0, ("audio",)), (2.0, ("image",))]
    assert sync.flush() == []
    assert sync.push("image", 1.5, "old") == [] and sync.dropped["stale"] == 1


def test_never_an_empty_frame(sync, clock):
    frames = []
    for step in range(200):
        stamp = 1.0 + step * 0.004
        frames += sync.push(MODALITIES[step % 2], stamp if step % 7 else math.nan, step)
        if step % 5 == 0:
            frames += sync.push("audio", stamp - 0.5, "old")
        clock.advance_ms(7)
        frames += sync.poll()
    frames += sync.flush()
    assert frames and all(frame.present for frame in frames)
    stamps = [frame.timestamp for frame in frames]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)


def test_pushes_from_several_threads_lose_nothing_uncounted():
    sync = SensorSync(["a", "b", "c", "d"], deadline_ms=2, window_ms=0.4)
    frames, pushed, lock = [], 400, threading.Lock()

    def sensor(name):
        for step in range(pushed):
            emitted = sync.push(name, step * 1e-3, (name, step)) + sync.poll()
            with lock:
                frames.extend(emitted)

    threads = [threading.Thread(target=sensor, args=(name,)) for name in sync.modalities]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    frames += sync.flush()
    readings = [reading for frame in frames for reading in frame.inputs.values() if reading is not None]
    assert len(readings) == len(set(readings))
    assert len(readings) + sum(sync.dropped.values()) == pushed * len(sync.modalities)
    assert all(frame.present for frame in frames)

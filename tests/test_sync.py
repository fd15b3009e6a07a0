"""``ume_edge.sync.SensorSync``: grouping readings into frames, deadlines, readings it must drop, the policies
(hold-last, required, offsets, the bound on open frames) and the statistics."""

import gc
import math
import random
import sys
import threading
import tracemalloc

import pytest

from ume_edge.sync import DEFAULT_MAX_OPEN, SensorSync

MODALITIES = ["audio", "image"]


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


def _stats_add_up(stats):
    for name, sensor in stats["modalities"].items():
        assert sensor["received"] == sensor["included"] + sensor["pending"] + sum(sensor["dropped"].values()), name


def test_hold_last_reuses_a_reading_no_older_than_max_age(clock):
    sync = SensorSync(MODALITIES, deadline_ms=30, window_ms=10, clock=clock, max_age_ms={"audio": 120})
    (first,) = sync.push("image", 1.0, "i0") + sync.push("audio", 1.0, "a0")
    assert first.held == ()
    sync.push("image", 1.1, "i1")
    clock.advance_ms(30)
    (within,) = sync.poll()
    assert within.inputs == {"audio": "a0", "image": "i1"}
    assert within.held == ("audio",) and within.present == ("audio", "image")
    sync.push("image", 1.2, "i2")  # 200 ms after the audio reading
    clock.advance_ms(30)
    (beyond,) = sync.poll()
    assert beyond.inputs == {"audio": None, "image": "i2"} and beyond.held == ()
    audio = sync.stats()["modalities"]["audio"]
    assert (audio["received"], audio["included"], audio["held"]) == (1, 1, 1)


def test_hold_last_lends_only_readings_that_have_left(clock):
    sync = SensorSync(MODALITIES, deadline_ms=30, window_ms=10, clock=clock, max_age_ms={"audio": 1000, "image": 1000})
    sync.push("image", 1.00, "i0")
    sync.push("audio", 1.05, "a1")  # a frame of its own, newer than the image's
    clock.advance_ms(30)
    older, newer = sync.poll()
    assert older.inputs == {"audio": None, "image": "i0"} and older.held == ()
    assert newer.inputs == {"audio": "a1", "image": "i0"} and newer.held == ("image",)


def test_a_frame_without_a_required_modality_is_dropped_and_counted(clock):
    sync = SensorSync(MODALITIES, deadline_ms=30, window_ms=10, clock=clock, required=["image"])
    sync.push("audio", 1.0, "a0")
    clock.advance_ms(30)
    assert sync.poll() == []
    sync.push("image", 1.1, "i1")
    clock.advance_ms(30)
    (frame,) = sync.poll()
    assert frame.inputs == {"audio": None, "image": "i1"}
    stats = sync.stats()
    assert stats["frames"] == {"emitted": 1, "evicted": 0, "open": 0, "dropped": {"required_missing": 1}}
    assert stats["modalities"]["audio"]["dropped"]["required_missing"] == 1
    assert stats["modalities"]["audio"]["included"] == 0
    assert sync.dropped == dict.fromkeys(["stale", "out_of_order", "duplicate", "non_finite"], 0)
    _stats_add_up(stats)


def test_a_held_reading_satisfies_required(clock):
    sync = SensorSync(MODALITIES, deadline_ms=30, window_ms=10, clock=clock, required=["audio"],
                      max_age_ms={"audio": 500})
    sync.push("image", 1.0, "i0")
    sync.push("audio", 1.0, "a0")
    sync.push("image", 1.2, "i1")
    clock.advance_ms(30)
    (frame,) = sync.poll()
    assert frame.inputs == {"audio": "a0", "image": "i1"} and frame.held == ("audio",)


def test_an_offset_moves_a_late_sensor_into_its_frames(clock):
    late_audio = [(1.0 + 0.1 * step, 1.05 + 0.1 * step) for step in range(3)]  # audio stamped 50 ms late
    plain = SensorSync(MODALITIES, deadline_ms=30, window_ms=10, clock=clock)
    shifted = SensorSync(MODALITIES, deadline_ms=30, window_ms=10, clock=clock, offset_ms={"audio": -50})
    frames = {id(plain): [], id(shifted): []}
    for sync in (plain, shifted):
        for image_stamp, audio_stamp in late_audio:
            frames[id(sync)] += sync.push("image", image_stamp, "i") + sync.push("audio", audio_stamp, "a")
        frames[id(sync)] += sync.flush()
    assert [frame.present for frame in frames[id(plain)]] == [("image",), ("audio",)] * 3
    assert [(frame.timestamp, frame.present) for frame in frames[id(shifted)]] == [
        (pytest.approx(stamp), ("audio", "image")) for stamp, _ in late_audio]


def test_policies_refuse_unknown_modalities_and_bad_values():
    with pytest.raises(ValueError, match="required names unknown modalities \\['video'\\]"):
        SensorSync(MODALITIES, deadline_ms=10, required=["video"])
    with pytest.raises(ValueError, match="max_age_ms names unknown"):
        SensorSync(MODALITIES, deadline_ms=10, max_age_ms={"video": 5})
    with pytest.raises(ValueError, match="max_age_ms\\['audio'\\] must be a finite number >= 0"):
        SensorSync(MODALITIES, deadline_ms=10, max_age_ms={"audio": -1})
    with pytest.raises(ValueError, match="offset_ms\\['audio'\\] must be a finite number"):
        SensorSync(MODALITIES, deadline_ms=10, offset_ms={"audio": math.nan})
    with pytest.raises(ValueError, match="max_open"):
        SensorSync(MODALITIES, deadline_ms=10, max_open=0)


def test_max_open_evicts_the_oldest_frame_at_once(clock):
    sync = SensorSync(MODALITIES, deadline_ms=30, window_ms=10, clock=clock, max_open=3)
    for step in range(3):
        assert sync.push("image", 1.0 + 0.1 * step, f"i{step}") == []
    (evicted,) = sync.push("image", 1.3, "i3")
    assert evicted.timestamp == 1.0 and evicted.inputs == {"audio": None, "image": "i0"}
    assert sync.stats()["frames"] == {"emitted": 1, "evicted": 1, "open": 3, "dropped": {"required_missing": 0}}
    (complete,) = sync.push("audio", 1.3, "a3")[-1:]
    assert complete.present == ("audio", "image")


def test_the_default_bound_holds_with_a_silent_sensor_and_a_stalled_clock(clock):
    sync = SensorSync(MODALITIES, deadline_ms=30, window_ms=10, clock=clock)
    emitted = [frame for step in range(DEFAULT_MAX_OPEN + 10) for frame in sync.push("image", step * 0.1, step)]
    assert [frame.inputs["image"] for frame in emitted] == list(range(10))
    assert sync.stats()["frames"]["open"] == DEFAULT_MAX_OPEN
    assert sync.next_deadline() == pytest.approx(clock.now + 0.030)


def test_age_at_emit_is_the_clock_time_since_the_reading_arrived(clock):
    sync = SensorSync(MODALITIES, deadline_ms=30, window_ms=10, clock=clock, max_age_ms={"audio": 1000})
    sync.push("image", 1.0, "i0")
    clock.advance_ms(5)
    sync.push("audio", 1.0, "a0")  # completes the frame: the image waited 5 ms, the audio none
    sync.push("image", 1.1, "i1")
    clock.advance_ms(30)
    sync.poll()  # the audio reading again, held: 30 ms after it arrived
    ages = {name: sensor["age_ms"] for name, sensor in sync.stats()["modalities"].items()}
    assert ages["image"] == {"p50": pytest.approx(5.0), "p99": pytest.approx(30.0)}  # nearest rank of [5, 30]
    assert ages["audio"] == {"p50": pytest.approx(0.0, abs=1e-9), "p99": pytest.approx(30.0)}
    assert SensorSync(MODALITIES, deadline_ms=30).stats()["modalities"]["audio"]["age_ms"] == {"p50": None,
                                                                                               "p99": None}


def test_statistics_add_up_on_a_messy_stream(clock):
    rng = random.Random(18)
    names = ["audio", "image", "lidar"]
    sync = SensorSync(names, deadline_ms=25, window_ms=8, clock=clock, max_age_ms={"lidar": 60}, required=["image"],
                      max_open=6, offset_ms={"audio": -3})
    frames, pushes = [], 0
    for step in range(3000):
        stamp = step * 0.02 + rng.uniform(-0.004, 0.004)
        for name in names:
            if rng.random() < 0.25:
                continue  # this reading is lost
            if rng.random() < 0.05:
                stamp = math.nan if rng.random() < 0.3 else stamp - rng.uniform(0, 0.2)  # broken or out of order
            repeats = 2 if rng.random() < 0.05 else 1  # a duplicate now and then
            for _ in range(repeats):
                frames += sync.push(name, stamp, (name, step))
                pushes += 1
        clock.advance_ms(rng.choice([0, 5, 20, 40]))
        frames += sync.poll()
        if step % 500 == 0:
            _stats_add_up(sync.stats())
    frames += sync.flush()
    stats = sync.stats()
    _stats_add_up(stats)
    sensors = stats["modalities"]
    assert sum(sensor["received"] for sensor in sensors.values()) == pushes
    assert all(sensor["pending"] == 0 for sensor in sensors.values())
    assert stats["frames"]["emitted"] == len(frames) and stats["frames"]["open"] == 0
    assert all(frame.inputs["image"] is not None for frame in frames)
    for name in names:
        fresh = sum(frame.inputs[name] is not None and name not in frame.held for frame in frames)
        assert sensors[name]["included"] == fresh
        assert sensors[name]["held"] == sum(name in frame.held for frame in frames)
        reasons = {reason for reason, count in sensors[name]["dropped"].items() if count}
        assert reasons == ({"stale", "out_of_order", "duplicate", "non_finite"} |
                           ({"required_missing"} if name != "image" else set()))  # the stream hit every reason
        assert 0 <= sensors[name]["age_ms"]["p50"] <= sensors[name]["age_ms"]["p99"]
    assert sensors["lidar"]["held"] > 0 and stats["frames"]["evicted"] > 0
    assert stats["frames"]["dropped"]["required_missing"] > 0
    assert sync.dropped == {reason: sum(sensor["dropped"][reason] for sensor in sensors.values())
                            for reason in sync.dropped}


@pytest.mark.slow
def test_a_million_pushes_with_a_silent_sensor_and_a_stalled_clock_stay_in_bounded_memory():
    sync = SensorSync(MODALITIES, deadline_ms=30, window_ms=1, clock=lambda: 0.0)
    push, reading = sync.push, object()
    for step in range(10_000):  # the bound is reached: from here on, every push evicts a frame
        push("image", step * 0.01, reading)
    gc.collect()
    blocks_before = sys.getallocatedblocks()
    for step in range(10_000, 950_000):
        push("image", step * 0.01, reading)
    tracemalloc.start()
    for step in range(950_000, 1_000_000):
        push("image", step * 0.01, reading)
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    gc.collect()
    # What the last 50,000 pushes left allocated: the 64 open frames that replaced the earlier ones (about 90 KB);
    # one object kept per push would be over 1 MB.
    assert traced < 256 * 1024
    assert sys.getallocatedblocks() - blocks_before < 5_000  # what the last 990,000 left, as the interpreter counts
    stats = sync.stats()
    assert stats["frames"] == {"emitted": 1_000_000 - DEFAULT_MAX_OPEN, "evicted": 1_000_000 - DEFAULT_MAX_OPEN,
                               "open": DEFAULT_MAX_OPEN, "dropped": {"required_missing": 0}}
    _stats_add_up(stats)

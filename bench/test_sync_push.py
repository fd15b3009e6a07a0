"""SensorSync.push with 10 and with 1,000 frames open: the cost of a push does not grow with the open frames.

Every push here opens a frame (one sensor silent, the clock stalled) and so evicts the oldest, the most a push
does: a bisection, an insertion into the open list, a heap push, and a frame leaving from the front.
"""

import itertools

import pytest
from cases import Check, Timed, case_name, record

from ume_edge.sync import SensorSync

FEW, MANY = 10, 1000


def _case(open_frames):
    return "sync", f"push with {open_frames} open", "python", "-", 1


def _pusher(open_frames):
    """A push into a sync that holds ``open_frames`` frames before and after it."""
    sync = SensorSync(["audio", "image"], deadline_ms=30, window_ms=1, clock=lambda: 0.0, max_open=open_frames)
    stamps, reading = itertools.count(), object()

    def push():
        return sync.push("image", next(stamps) * 0.01, reading)

    for _ in range(open_frames):
        push()
    return push


@pytest.mark.parametrize("open_frames", [FEW, MANY])
def test_sync_push(benchmark, open_frames):
    record(benchmark, *_case(open_frames))
    benchmark(_pusher(open_frames))


@pytest.mark.target
def test_push_cost_does_not_grow_with_open_frames(benchmark, target_run):
    few, many = target_run.interleave(Timed(case_name(*_case(FEW)), _pusher(FEW)),
                                      Timed(case_name(*_case(MANY)), _pusher(MANY)))
    benchmark(_pusher(MANY))
    target_run.conclude("sync-push-open-frames", "python", "-", 1,
                        Check(f"push with {MANY} frames open / with {FEW}", many / few, "<=", 2.0))

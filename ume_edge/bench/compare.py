"""Latencies against an older run: what changed, and what counts as a regression."""

from __future__ import annotations

from ume_edge.bench.results import REFERENCE_BACKEND, Case, latencies

# On this shared 2-core VM, runs of the same code differ by up to 61% in a case (the VM's cores, not the code).
DEFAULT_THRESHOLD = 1.0


def change(case: Case, previous: dict[tuple, Case]) -> float | None:
    """Relative change of the median against the same case in the older run (+0.30 = 30% slower)."""
    old = previous.get(case.key)
    return None if old is None else case.median_s / old.median_s - 1


def is_regression(case: Case, previous: dict[tuple, Case], threshold: float) -> bool:
    """A latency of ume-edge (not of the PyTorch reference) whose median is slower than the older run's by more than
    threshold, and whose timings' middle half lies wholly above the older run's (not one noisy stretch)."""
    old = previous.get(case.key)
    if old is None or case.backend == REFERENCE_BACKEND:
        return False
    return case.median_s / old.median_s - 1 > threshold and case.q1_s > old.q3_s


def regressions(cases: list[Case], previous: dict[tuple, Case], threshold: float) -> list[Case]:
    return [c for c in latencies(cases) if is_regression(c, previous, threshold)]


def change_cell(case: Case, previous: dict[tuple, Case], threshold: float) -> str:
    relative = change(case, previous)
    if relative is None:
        return "new"
    if is_regression(case, previous, threshold):
        return f"{relative:+.0%} **REGRESSION**"
    if relative > threshold:
        why = "the reference" if case.backend == REFERENCE_BACKEND else "within the two runs' spread"
        return f"{relative:+.0%} (slower; {why})"
    return f"{relative:+.0%}"


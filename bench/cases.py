"""What every benchmark shares: the cases it sweeps, how it records them for `python -m ume_edge.bench report`, and
how a target case times, cross-checks and judges its ratios."""

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ume_edge.data import presence_patterns

BATCHES = (1, 8, 64)
PATTERNS = presence_patterns(["audio", "image"])
ROUNDS = 15
LATENCY_KINDS = ("engine", "pipeline", "served")
# An interleaved median more than this factor away from the standalone median of the same case is a fault of the
# measurement (another runtime's threads still spinning, a burst of load), not a result: the target is inconclusive.
PLAUSIBLE_FACTOR = 2.0
# Other processes' share of all CPUs while a target ran, above which its ratios say more about them than about
# ume-edge (PyTorch's OpenMP threads, for one, wait for each other at every operator once a core is taken).
BUSY_LIMIT = 0.25


def batch_of(inputs, size, pattern=("audio", "image")):
    """The first ``size`` samples, with the modalities outside ``pattern`` absent (None)."""
    return {name: (np.ascontiguousarray(x[:size]) if name in pattern else None) for name, x in inputs.items()}


def record(benchmark, kind, target, backend, precision, batch, **extra):
    benchmark.extra_info.update(kind=kind, target=target, backend=backend, precision=precision, batch=batch, **extra)


def case_name(kind, target, backend, precision, batch, model="reference"):
    """How a target names the standalone case that times the same work as one of its functions."""
    prefix = "" if model == "reference" else f"{model} "
    return f"{prefix}{kind} {target} {backend} {precision} batch {batch}"


def _timed(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def interleaved_medians(*fns, block_s, rounds=ROUNDS):
    """Median seconds per call of each function, measured in alternating blocks so that drift in the machine's
    load hits all alike. Each block starts with an untimed call: the previous block's runtime (PyTorch's OpenMP
    threads, ONNX Runtime's pool) may still hold the cores for a moment, and that belongs to neither."""
    for fn in fns:
        fn()
    calls = [max(1, int(block_s / max(_timed(fn, 1), 1e-6))) for fn in fns]
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            fn()
            samples[i].append(_timed(fn, calls[i]))
    return [float(np.median(s)) for s in samples]


def _own_ticks(pid: int) -> int:
    """CPU ticks a process and its descendants (servers, their stubs) have run, 0 for one that has exited."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        tasks = Path(f"/proc/{pid}/task").iterdir()
        children = [int(child) for task in tasks for child in (task / "children").read_text().split()]
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12]) + sum(_own_ticks(child) for child in children)


def cpu_ticks() -> tuple[int, int, int] | None:
    """(ticks of all CPUs, of those busy, of this process and its descendants) since boot; None without /proc."""
    try:
        counters = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return None
    idle, iowait = counters[3], counters[4]
    return sum(counters), sum(counters) - idle - iowait, _own_ticks(os.getpid())


def others_share(start, end) -> float | None:
    """Share of all CPUs that other processes (or the hypervisor) took between two ``cpu_ticks()``."""
    if start is None or end is None or end[0] <= start[0]:
        return None
    total, busy, own = (e - s for e, s in zip(end, start, strict=True))
    return max(0.0, (busy - own) / total)


@dataclass(frozen=True)
class Timed:
    """A function a target times, and the ``case_name`` of the standalone benchmark that times the same work."""

    case: str
    call: Callable[[], object]


@dataclass(frozen=True)
class Check:
    """One performance target: ``measured op threshold``, e.g. a ratio ``>=`` 2.0."""

    what: str
    measured: float
    op: str
    threshold: float

    @property
    def met(self) -> bool:
        return self.measured >= self.threshold if self.op == ">=" else self.measured <= self.threshold

    def describe(self) -> str:
        return f"{self.what} {self.measured:.3g} (target {self.op} {self.threshold:.3g})"

    def as_record(self) -> dict:
        return {"what": self.what, "measured": self.measured, "op": self.op, "threshold": self.threshold,
                "met": self.met}


class TargetRun:
    """One target case. It times its functions in alternating blocks, checks each median against the standalone
    median of the same case, watches what other processes take of the CPUs meanwhile, and records a verdict: met,
    missed, or inconclusive (an implausible measurement, or a busy machine). The verdict fails the test only when
    targets are asserted (``pytest bench/ -m target``)."""

    def __init__(self, benchmark, standalone_medians: dict[str, float], asserted: bool, block_s: float,
                 outcomes: list[str]):
        self.benchmark = benchmark
        self.standalone_medians = standalone_medians
        self.asserted = asserted
        self.block_s = block_s
        self.outcomes = outcomes
        self.cross_checks: list[dict] = []
        self.ticks_at_start = cpu_ticks()

    def interleave(self, *timed: Timed, rounds: int = ROUNDS) -> list[float]:
        """Medians of ``rounds`` alternating blocks; fewer rounds for calls so long that each block is one call."""
        medians = interleaved_medians(*(t.call for t in timed), block_s=self.block_s, rounds=rounds)
        self.cross_checks += [self._cross_check(t, median, rounds) for t, median in zip(timed, medians, strict=True)]
        return medians

    def _cross_check(self, timed: Timed, interleaved_s: float, rounds: int) -> dict:
        """The standalone median comes from this run's benchmark of the same case; where the run left that case out
        (``-m target`` deselects it), from timing the function alone here."""
        standalone_s, source = self.standalone_medians.get(timed.case), "benchmark"
        if standalone_s is None:
            standalone_s = interleaved_medians(timed.call, block_s=self.block_s, rounds=rounds)[0]
            source = "timed alone"
        factor = max(interleaved_s, standalone_s) / min(interleaved_s, standalone_s)
        return {"case": timed.case, "interleaved_s": interleaved_s, "standalone_s": standalone_s,
                "standalone_from": source, "plausible": factor <= PLAUSIBLE_FACTOR}

    def conclude(self, target, backend, precision, batch, *checks: Check, **measured):
        busy = others_share(self.ticks_at_start, cpu_ticks())
        faults = [f"{c['case']} took {c['interleaved_s'] * 1e3:.3f} ms interleaved against "
                  f"{c['standalone_s'] * 1e3:.3f} ms standalone (more than {PLAUSIBLE_FACTOR:g}x apart)"
                  for c in self.cross_checks if not c["plausible"]]
        if busy is not None and busy > BUSY_LIMIT:
            faults.append(f"other processes took {busy:.0%} of the CPUs meanwhile (more than {BUSY_LIMIT:.0%})")
        status = "inconclusive" if faults else "met" if all(c.met for c in checks) else "missed"
        record(self.benchmark, "target", target, backend, precision, batch, status=status,
               checks=[c.as_record() for c in checks], cross_checks=self.cross_checks, others_cpu_share=busy,
               faults=faults, **measured)
        outcome = f"{status}: {target}: " + "; ".join([c.describe() for c in checks] + faults)
        self.outcomes.append(outcome)
        if self.asserted and status != "met":
            pytest.fail(outcome, pytrace=False)

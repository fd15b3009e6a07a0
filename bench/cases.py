"""What every benchmark shares: the cases it sweeps, how it records them for `python -m ume_edge.bench report`, and
how a target case times, cross-checks and judges its ratios."""

import time
from dataclasses import dataclass
from typing import Callable

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


def interleaved_medians(*fns, rounds=ROUNDS, block_s=0.05):
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
        return f"{self.what} {self.measured:.2f} (target {self.op} {self.threshold:.3g})"

    def as_record(self) -> dict:
        return {"what": self.what, "measured": self.measured, "op": self.op, "threshold": self.threshold,
                "met": self.met}


class TargetRun:
    """One target case. It times its functions in alternating blocks, checks each median against the standalone
    median of the same case, and records a verdict: met, missed, or inconclusive (an implausible measurement). The
    verdict fails the test only when targets are asserted (``pytest bench/ -m target``)."""

    def __init__(self, benchmark, standalone_medians: dict[str, float], asserted: bool, block_s: float,
                 outcomes: list[str]):
        self.benchmark = benchmark
        self.standalone_medians = standalone_medians
        self.asserted = asserted
        self.block_s = block_s
        self.outcomes = outcomes
        self.cross_checks: list[dict] = []

    def interleave(self, *timed: Timed) -> list[float]:
        medians = interleaved_medians(*(t.call for t in timed), block_s=self.block_s)
        self.cross_checks += [self._cross_check(t, median) for t, median in zip(timed, medians)]
        return medians

    def _cross_check(self, timed: Timed, interleaved_s: float) -> dict:
        """The standalone median comes from this run's benchmark of the same case; where the run left that case out
        (``-m target`` deselects it), from timing the function alone here."""
        standalone_s, source = self.standalone_medians.get(timed.case), "benchmark"
        if standalone_s is None:
            standalone_s, source = interleaved_medians(timed.call, block_s=self.block_s)[0], "timed alone"
        factor = max(interleaved_s, standalone_s) / min(interleaved_s, standalone_s)
        return {"case": timed.case, "interleaved_s": interleaved_s, "standalone_s": standalone_s,
                "standalone_from": source, "plausible": factor <= PLAUSIBLE_FACTOR}

    def conclude(self, target, backend, precision, batch, *checks: Check, **measured):
        implausible = [c for c in self.cross_checks if not c["plausible"]]
        status = "inconclusive" if implausible else "met" if all(c.met for c in checks) else "missed"
        record(self.benchmark, "target", target, backend, precision, batch, status=status,
               checks=[c.as_record() for c in checks], cross_checks=self.cross_checks, **measured)
        outcome = f"{status}: {target}: " + "; ".join(c.describe() for c in checks)
        outcome += "".join(f"; {c['case']} took {c['interleaved_s'] * 1e3:.3f} ms interleaved against "
                           f"{c['standalone_s'] * 1e3:.3f} ms standalone (more than {PLAUSIBLE_FACTOR:g}x apart)"
                           for c in implausible)
        self.outcomes.append(outcome)
        if self.asserted and status != "met":
            pytest.fail(outcome, pytrace=False)

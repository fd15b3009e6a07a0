"""pytest-benchmark results as ``Case`` records: what every report part reads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REFERENCE_BACKEND = "pytorch"
REFERENCE_MODEL = "reference"
LATENCY_KINDS = ("engine", "pipeline", "served")


@dataclass
class Case:
    name: str
    kind: str
    target: str
    backend: str
    precision: str
    batch: int
    median_s: float
    q1_s: float
    q3_s: float
    p90_s: float
    extra: dict

    @property
    def model(self) -> str:
        return self.extra.get("model", REFERENCE_MODEL)

    @property
    def key(self) -> tuple:
        return self.model, self.kind, self.target, self.backend, self.precision, self.batch

    @property
    def throughput(self) -> float:
        return self.batch / self.median_s

    @property
    def label(self) -> str:
        via = "gRPC " if self.kind == "served" else ""
        return f"{via}{self.backend} {self.precision}"


def load_cases(path: Path) -> tuple[list[Case], dict]:
    data = json.loads(Path(path).read_text())
    cases = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "kind" not in info:
            continue
        stats = bench["stats"]
        median, q3 = stats["median"], stats.get("q3", stats["median"])
        cases.append(Case(bench["name"], info["kind"], info["target"], info["backend"], info["precision"],
                          int(info["batch"]), median, stats.get("q1", median), q3, info.get("p90_s", q3), info))
    return cases, data.get("machine_info", {})


def latencies(cases: list[Case]) -> list[Case]:
    return [c for c in cases if c.kind in LATENCY_KINDS]


def reference_for(case: Case, cases: list[Case]) -> Case | None:
    """PyTorch eager fp32 for the same work; a served request compares with the in-process pipeline's."""
    kind = "pipeline" if case.kind == "served" else case.kind
    return next((other for other in cases if other.key == (case.model, kind, case.target, REFERENCE_BACKEND, "fp32",
                                                           case.batch)), None)


def sort_key(case: Case):
    order = {"pipeline": 0, "served": 1, "engine": 2}
    return (case.model != REFERENCE_MODEL, case.model, order.get(case.kind, 9), -case.target.count("+"), case.target,
            case.batch, case.backend, case.precision)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def has_field(cases: list[Case], field: str) -> bool:
    return any(field in c.extra for c in cases)


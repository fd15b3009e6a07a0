"""The summary of a replay: accuracy per presence pattern, latency percentiles and throughput, the requests each
replica answered and the retries, printed as a table and written as JSON (``--json``)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ume_edge.atomic import write_text_atomically
from ume_edge.client.sensor_health import sensor_table
from ume_edge.client.server_figures import format_server_figures
from ume_edge.client.streaming import Outcome, StreamResult
from ume_edge.data import pattern_key
from ume_edge.errors import UmeEdgeError


class SummaryNotSaved(UmeEdgeError):
    """The run finished but its ``--json`` file could not be written; ``summary`` is the run's summary."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def summarize(result: StreamResult, labels: np.ndarray | None) -> dict:
    outcomes, wall_s = result.outcomes, result.wall_s
    answered = [o for o in outcomes if o.answered]
    latencies_ms = np.array([o.latency_s * 1e3 for o in answered if o.latency_s is not None])
    return {
        "requests": len(outcomes),
        "answered": len(answered),
        "errors": len(outcomes) - len(answered),
        "error_examples": sorted({o.error or "no answer" for o in outcomes if o.label is None or o.error})[:5],
        "accuracy": _accuracy(answered, labels),
        "per_pattern": _per_pattern(answered, labels),
        "latency_ms": {f"p{q}": float(np.percentile(latencies_ms, q)) if len(latencies_ms) else None
                       for q in (50, 90, 99)},
        "throughput_rps": len(answered) / wall_s if wall_s > 0 else 0.0,
        "wall_s": wall_s,
        "dropped": _count(o.request.dropped for o in outcomes),
        "late": _count(o.request.late for o in outcomes),
        "stopped": result.stopped,
        "interrupted": result.interrupted,
        "replicas": _per_replica(outcomes, result.replicas),
        "retries": sum(len(o.tries) - 1 for o in outcomes if o.tries),
        "failover_s": _failover_s(outcomes),
    }


def _per_replica(outcomes: list[Outcome], addresses: list[str]) -> dict[str, dict[str, int]]:
    """Per replica: requests it answered, its tries that failed, and the tries sent to it after another failed."""
    rows = {address: {"answered": 0, "failed_tries": 0, "retries_to": 0} for address in addresses}
    for outcome in outcomes:
        for index, address in enumerate(outcome.tries):
            row = rows.setdefault(address, {"answered": 0, "failed_tries": 0, "retries_to": 0})
            last = index == len(outcome.tries) - 1
            row["answered" if last and outcome.answered else "failed_tries"] += 1
            row["retries_to"] += int(index > 0)
    return rows


def _failover_s(outcomes: list[Outcome]) -> float | None:
    """The longest a request answered on another replica waited between its first failed try and its answer (the
    answer arrives ``sent_s + latency_s``); None when no request was answered after a failed try."""
    waits = [o.sent_s + o.latency_s - o.first_failure_s for o in outcomes
             if o.answered and o.first_failure_s is not None and o.latency_s is not None]
    return max(waits) if waits else None


def _accuracy(outcomes: list[Outcome], labels: np.ndarray | None) -> float | None:
    """Over the outcomes whose label is known (a recording's frames before its first label have -1)."""
    if labels is None:
        return None
    known = [o for o in outcomes if labels[o.request.sample] >= 0]
    return float(np.mean([o.label == labels[o.request.sample] for o in known])) if known else None


def _per_pattern(outcomes: list[Outcome], labels: np.ndarray | None) -> dict[str, dict]:
    groups: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        groups.setdefault(pattern_key(outcome.request.present), []).append(outcome)
    return {key: {"count": len(group), "accuracy": _accuracy(group, labels)} for key, group in sorted(groups.items())}


def _count(groups: Iterable[tuple[str, ...]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for names in groups:
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    return counts


def format_report(summary: dict) -> str:
    lines = [f"{summary['answered']}/{summary['requests']} answered, {summary['errors']} errors, "
             f"{summary['throughput_rps']:.1f} requests/s over {summary['wall_s']:.2f} s"]
    latency = summary["latency_ms"]
    if latency["p50"] is not None:
        lines.append(f"latency ms: p50 {latency['p50']:.2f}  p90 {latency['p90']:.2f}  p99 {latency['p99']:.2f}")
    if summary["accuracy"] is not None:
        lines.append(f"accuracy: {summary['accuracy']:.4f}")
    lines.append(f"{'pattern':<24}{'requests':>10}{'accuracy':>10}")
    for key, row in summary["per_pattern"].items():
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(f"{key:<24}{row['count']:>10}{accuracy:>10}")
    if summary["dropped"] or summary["late"]:
        lines.append(f"left out: dropped {summary['dropped']}, missed the deadline {summary['late']}")
    if len(summary.get("replicas", {})) > 1:
        lines += ["", *_replica_table(summary)]
    lines += [f"error: {message}" for message in summary["error_examples"]]
    if summary["stopped"]:
        lines.append(summary["stopped"])
    if summary.get("sensors"):
        sensors = dict(summary["sensors"])
        lines += ["", "sensors:", sensor_table(sensors, sensors.pop("duration_s"))]
    if summary.get("server"):
        lines += ["", *format_server_figures(summary["server"])]
    return "\n".join(lines)


def _replica_table(summary: dict) -> list[str]:
    width = max(len("replica"), *(len(address) for address in summary["replicas"])) + 2
    lines = [f"{'replica':<{width}}{'answered':>10}{'failed tries':>14}{'retries to it':>15}"]
    lines += [f"{address:<{width}}{row['answered']:>10}{row['failed_tries']:>14}{row['retries_to']:>15}"
              for address, row in summary["replicas"].items()]
    failover = "" if summary["failover_s"] is None else f"; failover: {summary['failover_s'] * 1e3:.1f} ms"
    lines.append(f"retries: {summary['retries']}{failover}")
    return lines


def check_writable(path: Path) -> None:
    """Refuse a ``--json`` path that could not be written at the end of the run."""
    if path.is_dir():
        raise ValueError(f"--json {path}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise ValueError(f"--json {path}: the folder {path.parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"):
            pass
    except OSError as error:
        raise ValueError(f"--json {path}: cannot write in {path.parent} ({error.strerror})") from None


def write_json(path: Path, summary: dict) -> None:
    """Write through a temporary file in the same folder: a failure never leaves half a file at ``path``."""
    try:
        write_text_atomically(path, json.dumps(summary, indent=2) + "\n")
    except OSError as error:
        raise SummaryNotSaved(f"--json {path}: could not write the summary ({error})", summary) from None

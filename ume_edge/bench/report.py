"""Write REPORT.md and its plots from a RESULTS.json, and replace the committed baseline."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ume_edge.bench.compare import DEFAULT_THRESHOLD, regressions
from ume_edge.bench.plots import colours_for, plot_latency_per_pattern, plot_throughput
from ume_edge.bench.results import Case, latencies, load_cases
from ume_edge.bench.tables import headline, latency_table, machine_line, memory_section, peak_section, targets_section

logger = logging.getLogger(__name__)


def write_report(results: Path, out: Path, compare: Path | None = None,
           threshold: float = DEFAULT_THRESHOLD) -> tuple[Path, list[Case]]:
    """Write out/REPORT.md and its plots; return the report's path and the latency regressions against compare."""
    cases, machine = load_cases(results)
    if not cases:
        raise ValueError(f"{results}: no ume-edge benchmarks in it (run `pytest bench/ --benchmark-json={results}`)")
    previous = {c.key: c for c in latencies(load_cases(compare)[0])} if compare else None
    out.mkdir(parents=True, exist_ok=True)
    measured = latencies(cases)
    colours = colours_for(measured)
    drawn = (plot_latency_per_pattern(measured, out, colours), plot_throughput(measured, out, colours))
    plots = [plot for plot in drawn if plot is not None]
    parts = ["# ume-edge benchmark report", "", f"Machine: {machine_line(machine, cases)}", "", *headline(measured), "",
             *targets_section(cases), *memory_section(cases), *peak_section(cases), "## All cases", "",
             "Accuracy is the engines' (or PyTorch's) on the build's evaluation data, from the manifest.", "",
             *latency_table(measured, previous, threshold), ""]
    parts += [f"![{p.stem}]({p.name})" for p in plots]
    found = regressions(cases, previous, threshold) if previous is not None else []
    if previous is not None:
        parts += ["", f"Compared with {compare}: {len(found)} latency regression(s) beyond {threshold:.0%} in the "
                      "median (PyTorch eager is the reference, shown but never counted)."]
    path = out / "REPORT.md"
    path.write_text("\n".join(parts) + "\n")
    logger.info("wrote %s and %d plot(s)", path, len(plots))
    return path, found


def update_baseline(results: Path, baseline: Path) -> Path:
    """Copy results into the baseline folder without the raw timings (the report reads only the statistics)."""
    data = json.loads(results.read_text())
    for bench in data.get("benchmarks", []):
        bench.get("stats", {}).pop("data", None)
    baseline.mkdir(parents=True, exist_ok=True)
    path = baseline / "RESULTS.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


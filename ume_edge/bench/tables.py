"""The Markdown parts of REPORT.md: the headline, the targets, memory, fraction of peak, and every latency."""

from __future__ import annotations

from ume_edge.bench.compare import change_cell
from ume_edge.bench.results import REFERENCE_BACKEND, REFERENCE_MODEL, Case, has_field, ms, reference_for, sort_key


def latency_table(cases: list[Case], previous: dict[tuple, Case] | None, threshold: float) -> list[str]:
    models, compute = has_field(cases, "model"), has_field(cases, "gmac_per_s")
    columns = (["model"] if models else []) + ["kind", "target", "backend", "precision", "batch", "median ms",
                                                "p90 ms", "samples/s", "x PyTorch fp32", "accuracy %"]
    columns += (["GMAC/s", "% of peak"] if compute else []) + (["vs baseline"] if previous is not None else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for case in sorted(cases, key=sort_key):
        reference = reference_for(case, cases)
        speedup = f"{reference.median_s / case.median_s:.2f}x" if reference and reference is not case else "-"
        cells = ([case.model] if models else []) + [
            case.kind, case.target, case.backend, case.precision, str(case.batch), ms(case.median_s),
            ms(case.p90_s), f"{case.throughput:,.0f}", speedup, str(case.extra.get("accuracy", "-"))]
        if compute:
            cells += [_number(case.extra.get("gmac_per_s"), "{:.1f}"),
                      _number(case.extra.get("peak_fraction"), "{:.0%}")]
        if previous is not None:
            cells.append(change_cell(case, previous, threshold))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _number(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def targets_section(cases: list[Case]) -> list[str]:
    """One row per check of each target case: what it measured, the threshold, and the verdict."""
    targets = [c for c in cases if c.kind == "target" and "checks" in c.extra]
    if not targets:
        return []
    lines = ["## Targets", "",
             "Each ratio is timed in alternating blocks in one run. A target is inconclusive (not met) when one of "
             "its medians disagrees with the standalone benchmark of the same case, or when other processes took "
             "the CPUs meanwhile.", "",
             "| target | batch | check | measured | required | result |", "|---|---|---|---|---|---|"]
    for case in targets:
        for check in case.extra["checks"]:
            result = case.extra["status"] if case.extra["status"] == "inconclusive" else (
                "met" if check["met"] else "**missed**")
            lines.append(f"| {case.target} | {case.batch} | {check['what']} | {check['measured']:.3g} | "
                         f"{check['op']} {check['threshold']:.3g} | {result} |")
    faults = [f"- {case.target}: {fault}." for case in targets for fault in case.extra.get("faults", [])]
    if faults:
        lines += ["", "Inconclusive because:", "", *faults]
    return [*lines, ""]


def memory_section(cases: list[Case]) -> list[str]:
    rows = [c for c in cases if c.kind == "memory"]
    if not rows:
        return []
    lines = ["## Memory", "", "| process | peak RSS (MiB) | engine files (KiB) |", "|---|---|---|"]
    for case in rows:
        sizes = ", ".join(f"{name} {kib:.0f}" for name, kib in sorted(case.extra.get("engine_kib", {}).items()))
        lines.append(f"| {case.target} | {case.extra.get('peak_rss_mb', float('nan')):.0f} | {sizes} |")
    return [*lines, ""]


def peak_section(cases: list[Case]) -> list[str]:
    """Fraction of the machine's peak per encoder and precision, for the cases that record it, and the peaks: the
    microbenchmarks (kind ``peak``) whose best rate per precision is that precision's peak."""
    rows = [c for c in cases if c.kind == "engine" and "peak_fraction" in c.extra]
    peaks = [c for c in cases if c.kind == "peak" and "gmac_per_s" in c.extra]
    if not rows and not peaks:
        return []
    lines = ["## Fraction of peak", ""]
    if rows:
        batches = sorted({c.batch for c in rows})
        lines += ["Per encoder and precision: % of peak (GMAC/s).", "",
                  "| model | encoder | backend | precision | " + " | ".join(f"batch {b}" for b in batches) + " |",
                  "|" + "---|" * (4 + len(batches))]
        for group in sorted({(c.model, c.target, c.backend, c.precision) for c in rows}):
            by_batch = {c.batch: c for c in rows if (c.model, c.target, c.backend, c.precision) == group}
            cells = [f"{by_batch[b].extra['peak_fraction']:.0%} "
                     f"({by_batch[b].extra.get('gmac_per_s', float('nan')):.1f})" if b in by_batch else "-"
                     for b in batches]
            lines.append("| " + " | ".join([*group, *cells]) + " |")
        lines.append("")
    if peaks:
        best = {p: max(c.extra["gmac_per_s"] for c in peaks if c.precision == p) for p in {c.precision for c in peaks}}
        lines += ["The peak of a precision is the best rate of its microbenchmarks, measured in the same run:", "",
                  "| microbenchmark | backend | precision | input | weight | median ms | GMAC/s | peak |",
                  "|---|---|---|---|---|---|---|---|"]
        for case in sorted(peaks, key=lambda c: (c.precision, c.target)):
            shapes = [" x ".join(map(str, case.extra.get(k, []))) or "-" for k in ("input_shape", "weight_shape")]
            rate = case.extra["gmac_per_s"]
            lines.append(f"| {case.target} | {case.backend} | {case.precision} | {shapes[0]} | {shapes[1]} | "
                         f"{ms(case.median_s)} | {rate:.1f} | {'yes' if rate == best[case.precision] else '-'} |")
        lines.append("")
    return lines


def headline(cases: list[Case]) -> list[str]:
    """The answers a newcomer looks for: INT8 against PyTorch, and what an absent modality saves."""
    full = {c.key: c for c in cases}
    pipeline = [c for c in cases if c.kind == "pipeline" and c.model == REFERENCE_MODEL]
    patterns = sorted({c.target for c in pipeline}, key=lambda t: (-t.count("+"), t))
    if not patterns:
        return []
    everything, lines = patterns[0], []
    for batch in sorted({c.batch for c in pipeline}):
        def get(backend: str, precision: str, pattern: str = everything, batch: int = batch) -> Case | None:
            return full.get((REFERENCE_MODEL, "pipeline", pattern, backend, precision, batch))

        eager = get(REFERENCE_BACKEND, "fp32")
        for precision in ("int8", "fp32"):
            case = get("onnxruntime", precision)
            if case and eager:
                lines.append(f"- batch {batch}, every modality present: ONNX Runtime {precision} takes "
                             f"{ms(case.median_s)} ms against PyTorch eager fp32's {ms(eager.median_s)} ms "
                             f"({eager.median_s / case.median_s:.1f}x faster).")
        for pattern in patterns[1:]:
            int8_full, partial = get("onnxruntime", "int8"), get("onnxruntime", "int8", pattern)
            if int8_full and partial:
                missing = sorted(set(everything.split("+")) - set(pattern.split("+")))
                lines.append(f"- batch {batch}, INT8, {' and '.join(missing)} absent: {ms(partial.median_s)} ms, "
                             f"{1 - partial.median_s / int8_full.median_s:.0%} less than with every modality.")
    return lines


def machine_line(machine: dict, cases: list[Case]) -> str:
    """The machine, and how busy other processes kept it: the closer to its cores, the slower and more scattered
    every number."""
    cpu = machine.get("cpu", {})
    line = (f"{cpu.get('brand_raw', machine.get('processor', 'unknown CPU'))}, {cpu.get('count', '?')} logical cores, "
            f"{machine.get('system', '')} {machine.get('release', '')}, Python {machine.get('python_version', '?')}")
    load = machine.get("load_average_before")
    if load is not None:
        line += f"; 1-minute load average before the run {load:.1f}"
    shares = [c.extra["others_cpu_share"] for c in cases if c.extra.get("others_cpu_share") is not None]
    if shares:
        line += f"; other processes took up to {max(shares):.0%} of the CPUs while a target ran"
    return line


"""``python -m ume_edge.bench report RESULTS.json``: pytest-benchmark results -> REPORT.md and PNG plots.

Run the suites first (``pytest bench/ --benchmark-json=bench/out/RESULTS.json``). The report goes beside the results
(``bench/out/report/``); the committed baseline (``bench/baseline/``) changes only with ``--update-baseline``.

Every benchmark records its case in ``extra_info``: ``kind`` (engine | pipeline | served, the latencies; target |
memory | peak, a microbenchmark of this machine's peak rate), ``target`` (a modality, a presence pattern such as
``audio+image``, or the target's name), ``backend`` (pytorch | onnxruntime | tensorrt | pytriton | python-backend),
``precision`` and ``batch``; optionally ``model`` (``reference`` when absent), ``macs``, ``gmac_per_s`` and
``peak_fraction``. A target case adds ``status`` (met | missed | inconclusive), its ``checks`` and ``cross_checks``.
The report puts each latency beside PyTorch eager fp32 for the same model, kind, target and batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

REFERENCE_BACKEND = "pytorch"
REFERENCE_MODEL = "reference"
LATENCY_KINDS = ("engine", "pipeline", "served")
# On this shared 2-core VM, runs of the same code differ by up to 61% in a case (the VM's cores, not the code).
DEFAULT_THRESHOLD = 1.0
DEFAULT_BASELINE = Path("bench/baseline")


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


def _sort_key(case: Case):
    order = {"pipeline": 0, "served": 1, "engine": 2}
    return (case.model != REFERENCE_MODEL, case.model, order.get(case.kind, 9), -case.target.count("+"), case.target,
            case.batch, case.backend, case.precision)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _has(cases: list[Case], field: str) -> bool:
    return any(field in c.extra for c in cases)


# ---------------------------------------------------------------------------------------------------------------
# comparison with an older run


def change(case: Case, previous: dict[tuple, Case]) -> float | None:
    """Relative change of the median against the same case in the older run (+0.30 = 30% slower)."""
    old = previous.get(case.key)
    return None if old is None else case.median_s / old.median_s - 1


def is_regression(case: Case, previous: dict[tuple, Case], threshold: float) -> bool:
    """A latency of ume-edge (not of the PyTorch reference) whose median is slower than the older run's by more than
    threshold, and whose timings' middle half lies wholly above the older run's (not one noisy stretch)."""
    relative, old = change(case, previous), previous.get(case.key)
    return case.backend != REFERENCE_BACKEND and relative is not None and relative > threshold and case.q1_s > old.q3_s


def regressions(cases: list[Case], previous: dict[tuple, Case], threshold: float) -> list[Case]:
    return [c for c in latencies(cases) if is_regression(c, previous, threshold)]


def _change_cell(case: Case, previous: dict[tuple, Case], threshold: float) -> str:
    relative = change(case, previous)
    if relative is None:
        return "new"
    if is_regression(case, previous, threshold):
        return f"{relative:+.0%} **REGRESSION**"
    if relative > threshold:
        why = "the reference" if case.backend == REFERENCE_BACKEND else "within the two runs' spread"
        return f"{relative:+.0%} (slower; {why})"
    return f"{relative:+.0%}"


# ---------------------------------------------------------------------------------------------------------------
# Markdown


def latency_table(cases: list[Case], previous: dict[tuple, Case] | None, threshold: float) -> list[str]:
    models, compute = _has(cases, "model"), _has(cases, "gmac_per_s")
    columns = (["model"] if models else []) + ["kind", "target", "backend", "precision", "batch", "median ms",
                                                "p90 ms", "samples/s", "x PyTorch fp32", "accuracy %"]
    columns += (["GMAC/s", "% of peak"] if compute else []) + (["vs baseline"] if previous is not None else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for case in sorted(cases, key=_sort_key):
        reference = reference_for(case, cases)
        speedup = f"{reference.median_s / case.median_s:.2f}x" if reference and reference is not case else "-"
        cells = ([case.model] if models else []) + [
            case.kind, case.target, case.backend, case.precision, str(case.batch), _ms(case.median_s),
            _ms(case.p90_s), f"{case.throughput:,.0f}", speedup, str(case.extra.get("accuracy", "-"))]
        if compute:
            cells += [_number(case.extra.get("gmac_per_s"), "{:.1f}"),
                      _number(case.extra.get("peak_fraction"), "{:.0%}")]
        if previous is not None:
            cells.append(_change_cell(case, previous, threshold))
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
                         f"{_ms(case.median_s)} | {rate:.1f} | {'yes' if rate == best[case.precision] else '-'} |")
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
        def get(backend, precision, pattern=everything):
            return full.get((REFERENCE_MODEL, "pipeline", pattern, backend, precision, batch))

        eager = get(REFERENCE_BACKEND, "fp32")
        for precision in ("int8", "fp32"):
            case = get("onnxruntime", precision)
            if case and eager:
                lines.append(f"- batch {batch}, every modality present: ONNX Runtime {precision} takes "
                             f"{_ms(case.median_s)} ms against PyTorch eager fp32's {_ms(eager.median_s)} ms "
                             f"({eager.median_s / case.median_s:.1f}x faster).")
        for pattern in patterns[1:]:
            int8_full, partial = get("onnxruntime", "int8"), get("onnxruntime", "int8", pattern)
            if int8_full and partial:
                missing = sorted(set(everything.split("+")) - set(pattern.split("+")))
                lines.append(f"- batch {batch}, INT8, {' and '.join(missing)} absent: {_ms(partial.median_s)} ms, "
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


# ---------------------------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series_order(labels) -> list[str]:
    """In-process runtimes first (ume-edge's, INT8 first, then the reference), served ones after."""
    return sorted(labels, key=lambda label: (label.startswith("gRPC"), label.startswith(REFERENCE_BACKEND),
                                             not label.endswith("int8"), label))


def _colours(cases: list[Case]) -> dict[str, str]:
    """One colour per runtime and precision, the same in every plot."""
    palette = ["tab:blue", "tab:orange", "tab:olive", "tab:cyan", "tab:red", "tab:purple", "tab:green", "tab:brown",
               "tab:pink", "tab:gray"]
    return {label: palette[i % len(palette)] for i, label in enumerate(_series_order({c.label for c in cases}))}


def _grouped_bars(ax, groups: list, series: dict[str, list[float]], colours: dict[str, str], fmt: str) -> None:
    """Bars per group and series, each bar's value written on it (a value of 0 is no bar), the legend below."""
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label, color=colours[label])
        ax.bar_label(bars, labels=[fmt.format(v) if v else "" for v in values], fontsize=7, padding=2,
                     rotation=0 if len(series) <= 3 else 90)
    ax.set_xticks(range(len(groups)), [str(g) for g in groups])
    ax.margins(y=0.2)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(3, len(series)), frameon=False)


def _plain_log_axis(ax) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def plot_latency_per_pattern(cases: list[Case], out: Path, colours: dict[str, str]) -> Path | None:
    """Median latency per presence pattern: one panel per batch size, in-process and served (gRPC) side by side."""
    reference = [c for c in cases if c.kind in ("pipeline", "served") and c.model == REFERENCE_MODEL]
    presence_patterns = {c.target for c in reference if c.kind == "pipeline"}
    shown = [c for c in reference if c.target in presence_patterns]  # not Triton's floor (an empty model)
    if not shown:
        return None
    plt = _pyplot()
    batches = sorted({c.batch for c in shown})
    patterns = sorted({c.target for c in shown}, key=lambda t: (-t.count("+"), t))
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        at_batch = [c for c in shown if c.batch == batch]
        series = {label: [next((c.median_s * 1e3 for c in at_batch if c.target == p and c.label == label), 0.0)
                          for p in patterns] for label in _series_order({c.label for c in at_batch})}
        _grouped_bars(ax, patterns, series, colours, "{:.3g}")
        _plain_log_axis(ax)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("modalities present")
        ax.set_ylabel("median latency per call (ms, log scale)")
    fig.suptitle("Latency per presence pattern (an absent modality is never computed; lower is better)")
    fig.tight_layout()
    return _save(fig, out / "latency_per_pattern.png")


def plot_throughput(cases: list[Case], out: Path, colours: dict[str, str]) -> Path | None:
    """Samples per second with every modality present, per batch size."""
    pipeline = [c for c in cases if c.kind == "pipeline" and c.model == REFERENCE_MODEL]
    if not pipeline:
        return None
    plt = _pyplot()
    everything = max({c.target for c in pipeline}, key=lambda t: t.count("+"))
    pipeline = [c for c in pipeline if c.target == everything]
    batches = sorted({c.batch for c in pipeline})
    series = {label: [next((c.throughput for c in pipeline if c.batch == b and c.label == label), 0.0) for b in batches]
              for label in _series_order({c.label for c in pipeline})}
    fig, ax = plt.subplots(figsize=(7, 5))
    _grouped_bars(ax, batches, series, colours, "{:,.0f}")
    _plain_log_axis(ax)
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples / s (log scale)")
    ax.set_title(f"Throughput per batch size, {everything} (higher is better)")
    fig.tight_layout()
    return _save(fig, out / "throughput_vs_batch.png")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# the report and the baseline


def report(results: Path, out: Path, compare: Path | None = None,
           threshold: float = DEFAULT_THRESHOLD) -> tuple[Path, list[Case]]:
    """Write out/REPORT.md and its plots; return the report's path and the latency regressions against compare."""
    cases, machine = load_cases(results)
    if not cases:
        raise ValueError(f"{results}: no ume-edge benchmarks in it (run `pytest bench/ --benchmark-json={results}`)")
    previous = {c.key: c for c in latencies(load_cases(compare)[0])} if compare else None
    out.mkdir(parents=True, exist_ok=True)
    measured = latencies(cases)
    colours = _colours(measured)
    plots = [plot_latency_per_pattern(measured, out, colours), plot_throughput(measured, out, colours)]
    plots = [p for p in plots if p]
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


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ume_edge.bench", description=(
        "Turn pytest-benchmark results into REPORT.md and plots. "
        "First: pytest bench/ --benchmark-json=bench/out/RESULTS.json"))
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="write REPORT.md and PNG plots from a RESULTS.json",
                         description="Write REPORT.md and PNG plots from a RESULTS.json; exit 1 when --compare finds a "
                                     "latency regression.")
    rep.add_argument("results", type=Path, help="the file written by --benchmark-json")
    rep.add_argument("--out", type=Path, help="folder for REPORT.md and plots (default: report/ beside RESULTS)")
    rep.add_argument("--compare", type=Path, metavar="OLD_RESULTS",
                     help="an older RESULTS.json (e.g. bench/baseline/RESULTS.json): mark latencies whose median got "
                          "slower by more than --threshold with the interquartile ranges apart; ume-edge's are "
                          "regressions (exit 1), PyTorch's are shown (default: none)")
    rep.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                     help="relative slowdown of a median that counts as a regression, a fraction: 1.0 = twice as slow "
                          "(default: %(default)s)")
    rep.add_argument("--update-baseline", action="store_true",
                     help="replace the committed baseline: copy RESULTS into --baseline and write the report there "
                          "(default: off)")
    rep.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE,
                     help="the committed baseline folder, written only with --update-baseline (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"{args.results}: no such file; run `pytest bench/ --benchmark-json={args.results}` first")
    if args.update_baseline and args.out:
        parser.error("--update-baseline writes the report into --baseline; leave out --out")
    out = args.baseline / "report" if args.update_baseline else args.out or args.results.parent / "report"
    if not args.update_baseline and _inside(out, args.baseline):
        parser.error(f"{out} is in the committed baseline {args.baseline}; give --out elsewhere, or pass "
                     "--update-baseline to replace the baseline")
    if args.compare and not args.compare.is_file():
        parser.error(f"--compare {args.compare}: no such file")
    try:
        path, found = report(args.results, out, args.compare, args.threshold)
    except ValueError as error:
        parser.error(str(error))
    if args.update_baseline:
        print(f"wrote {update_baseline(args.results, args.baseline)}", file=sys.stderr)
    print(path.read_text())
    print(f"wrote {path}", file=sys.stderr)
    if found:
        print(f"{len(found)} latency regression(s) beyond {args.threshold:.0%}: "
              f"{', '.join(c.name for c in found)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()

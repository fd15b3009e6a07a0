"""``python -m ume_edge.bench report RESULTS.json``: pytest-benchmark results -> a Markdown table and PNG plots.

Run the suites first (``pytest bench/ --benchmark-json=RESULTS.json``). Every benchmark there records its case in
``extra_info``: ``kind`` (engine | pipeline | served), ``target`` (a modality, or a presence pattern such as
``audio+image``), ``backend`` (pytorch | onnxruntime | tensorrt | triton), ``precision`` and ``batch``. The
report puts each case beside PyTorch eager fp32 for the same kind, target and batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

BASELINE_BACKEND = "pytorch"


@dataclass
class Case:
    name: str
    kind: str
    target: str
    backend: str
    precision: str
    batch: int
    median_s: float
    p90_s: float
    extra: dict

    @property
    def key(self) -> tuple:
        return self.kind, self.target, self.backend, self.precision, self.batch

    @property
    def throughput(self) -> float:
        return self.batch / self.median_s

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"


def load_cases(path: str | Path) -> tuple[list[Case], dict]:
    data = json.loads(Path(path).read_text())
    cases = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "kind" not in info:
            continue
        stats = bench["stats"]
        cases.append(Case(bench["name"], info["kind"], info["target"], info["backend"], info["precision"],
                          int(info["batch"]), stats["median"], info.get("p90_s", stats["q3"]), info))
    return cases, data.get("machine_info", {})


def baseline_for(case: Case, cases: list[Case]) -> Case | None:
    kind = "pipeline" if case.kind == "served" else case.kind
    for other in cases:
        if (other.kind, other.target, other.backend, other.batch) == (kind, case.target, BASELINE_BACKEND, case.batch):
            return other
    return None


def _sort_key(case: Case):
    order = {"pipeline": 0, "served": 1, "engine": 2}
    return order.get(case.kind, 9), case.target.count("+") * -1, case.target, case.batch, case.backend, case.precision


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def table(cases: list[Case], old: dict[str, Case] | None = None, threshold: float = 0.10) -> str:
    header = "| kind | target | backend | precision | batch | median ms | p90 ms | samples/s | x PyTorch fp32 | accuracy % |"
    if old is not None:
        header += " vs old |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for case in sorted(cases, key=_sort_key):
        base = baseline_for(case, cases)
        speedup = f"{base.median_s / case.median_s:.2f}x" if base and case.backend != BASELINE_BACKEND else "-"
        accuracy = case.extra.get("accuracy")
        row = (f"| {case.kind} | {case.target} | {case.backend} | {case.precision} | {case.batch} | "
               f"{_fmt_ms(case.median_s)} | {_fmt_ms(case.p90_s)} | {case.throughput:,.0f} | {speedup} | "
               f"{accuracy if accuracy is not None else '-'} |")
        if old is not None:
            row += f" {_compare_cell(case, old.get(case.name), threshold)} |"
        lines.append(row)
    return "\n".join(lines)


def _compare_cell(case: Case, previous: Case | None, threshold: float) -> str:
    if previous is None:
        return "new"
    change = case.median_s / previous.median_s - 1
    mark = " **REGRESSION**" if change > threshold else ""
    return f"{change:+.0%}{mark}"


CASE_FIELDS = {"kind", "target", "backend", "precision", "batch", "p90_s"}


def targets_table(cases: list[Case]) -> list[str]:
    """The ratios the target benchmarks measured (alternating rounds in one run) and asserted."""
    rows = [c for c in cases if c.kind == "target"]
    if not rows:
        return []
    lines = ["| target | batch | measured |", "|---|---|---|"]
    for case in rows:
        measured = ", ".join(f"{k} {v:.2f}" for k, v in case.extra.items()
                             if k not in CASE_FIELDS and isinstance(v, float))
        lines.append(f"| {case.target} | {case.batch} | {measured} |")
    return ["## Targets", "", *lines, ""]


def memory_table(cases: list[Case]) -> list[str]:
    rows = [c for c in cases if c.kind == "memory"]
    if not rows:
        return []
    lines = ["## Memory", "", "| process | peak RSS (MiB) | engine files (KiB) |", "|---|---|---|"]
    for case in rows:
        sizes = ", ".join(f"{name} {kib:.0f}" for name, kib in sorted(case.extra.get("engine_kib", {}).items()))
        lines.append(f"| {case.target} | {case.extra.get('peak_rss_mb', float('nan')):.0f} | {sizes} |")
    return [*lines, ""]


def regressions(cases: list[Case], old: dict[str, Case], threshold: float) -> list[str]:
    return [c.name for c in cases if c.name in old and c.median_s / old[c.name].median_s - 1 > threshold]


def headline(cases: list[Case]) -> list[str]:
    """The answers a newcomer looks for: INT8 against PyTorch, and what an absent modality saves."""
    lines = []
    full = {c.key: c for c in cases}
    patterns = sorted({c.target for c in cases if c.kind == "pipeline"}, key=lambda t: -t.count("+"))
    if not patterns:
        return lines
    everything = patterns[0]
    for batch in sorted({c.batch for c in cases if c.kind == "pipeline"}):
        torch_case = full.get(("pipeline", everything, BASELINE_BACKEND, "fp32", batch))
        for precision in ("int8", "fp32"):
            case = full.get(("pipeline", everything, "onnxruntime", precision, batch))
            if case and torch_case:
                lines.append(f"- batch {batch}, every modality present: ONNX Runtime {precision} takes "
                             f"{_fmt_ms(case.median_s)} ms against PyTorch eager fp32's {_fmt_ms(torch_case.median_s)} ms "
                             f"({torch_case.median_s / case.median_s:.1f}x faster).")
        int8_full = full.get(("pipeline", everything, "onnxruntime", "int8", batch))
        for pattern in patterns[1:]:
            partial = full.get(("pipeline", pattern, "onnxruntime", "int8", batch))
            if int8_full and partial:
                missing = sorted(set(everything.split("+")) - set(pattern.split("+")))
                lines.append(f"- batch {batch}, INT8, {' and '.join(missing)} absent: {_fmt_ms(partial.median_s)} ms, "
                             f"{1 - partial.median_s / int8_full.median_s:.0%} less than with every modality.")
    return lines


def plot_latency_per_pattern(cases: list[Case], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipeline = [c for c in cases if c.kind == "pipeline"]
    if not pipeline:
        return None
    batches = sorted({c.batch for c in pipeline})
    patterns = sorted({c.target for c in pipeline}, key=lambda t: (-t.count("+"), t))
    labels = sorted({c.label for c in pipeline})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            values = [next((c.median_s * 1e3 for c in pipeline if c.target == p and c.label == label
                            and c.batch == batch), 0.0) for p in patterns]
            ax.bar([x + i * width for x in range(len(patterns))], values, width, label=label)
        ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(patterns))], patterns)
        ax.set_yscale("log")
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("median latency (ms, log scale)")
    axes[0][0].legend()
    fig.suptitle("Latency per presence pattern (an absent modality is never computed)")
    fig.tight_layout()
    path = out / "latency_per_pattern.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput(cases: list[Case], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = sorted({c.target for c in cases if c.kind == "pipeline"}, key=lambda t: -t.count("+"))
    if not patterns:
        return None
    everything = patterns[0]
    pipeline = [c for c in cases if c.kind == "pipeline" and c.target == everything]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in sorted({c.label for c in pipeline}):
        points = sorted((c.batch, c.throughput) for c in pipeline if c.label == label)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples / s")
    ax.set_title(f"Throughput against batch size ({everything})")
    ax.legend()
    fig.tight_layout()
    path = out / "throughput_vs_batch.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def machine_line(machine: dict) -> str:
    cpu = machine.get("cpu", {})
    return (f"{cpu.get('brand_raw', machine.get('processor', 'unknown CPU'))}, {cpu.get('count', '?')} logical cores, "
            f"{machine.get('system', '')} {machine.get('release', '')}, Python {machine.get('python_version', '?')}")


def report(results: Path, out: Path, compare: Path | None = None, threshold: float = 0.10) -> tuple[Path, list[str]]:
    cases, machine = load_cases(results)
    if not cases:
        raise SystemExit(f"{results}: no ume-edge benchmarks in it (run `pytest bench/ --benchmark-json={results}`)")
    out.mkdir(parents=True, exist_ok=True)
    old = {c.name: c for c in load_cases(compare)[0]} if compare else None
    plots = [p for p in (plot_latency_per_pattern(cases, out), plot_throughput(cases, out)) if p]
    measured = [c for c in cases if c.kind not in ("target", "memory")]
    parts = ["# ume-edge benchmark report", "", f"Machine: {machine_line(machine)}", "", *headline(measured), "",
             *targets_table(cases), *memory_table(cases), "## All cases", "",
             "Accuracy is the engines' (or PyTorch's) on the build's evaluation data, from the manifest.", "",
             table(measured, old, threshold), ""]
    parts += [f"![{p.stem}]({p.name})" for p in plots]
    found = regressions(cases, old, threshold) if old else []
    if old is not None:
        parts += ["", f"Compared with {compare}: {len(found)} regression(s) beyond {threshold:.0%} in the median."]
    path = out / "REPORT.md"
    path.write_text("\n".join(parts) + "\n")
    return path, found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ume_edge.bench", description=(
        "Turn pytest-benchmark results into a Markdown table and plots. "
        "First: pytest bench/ --benchmark-json=RESULTS.json"))
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="write REPORT.md and PNG plots from a RESULTS.json")
    rep.add_argument("results", type=Path, help="the file written by --benchmark-json")
    rep.add_argument("--out", type=Path, default=Path("bench/report"), help="folder for REPORT.md and plots")
    rep.add_argument("--compare", type=Path, help="an older RESULTS.json: mark cases whose median got slower")
    rep.add_argument("--threshold", type=float, default=0.10, help="slowdown that counts as a regression (0.10 = 10%%)")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"{args.results}: no such file; run `pytest bench/ --benchmark-json={args.results}` first")
    path, found = report(args.results, args.out, args.compare, args.threshold)
    print(path.read_text())
    print(f"wrote {path}", file=sys.stderr)
    if found:
        print(f"{len(found)} regression(s): {', '.join(found)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""The report's PNG plots: latency per presence pattern, and throughput per batch size."""

from __future__ import annotations

from pathlib import Path

from ume_edge.bench.results import REFERENCE_BACKEND, REFERENCE_MODEL, Case


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series_order(labels) -> list[str]:
    """In-process runtimes first (ume-edge's, INT8 first, then the reference), served ones after."""
    return sorted(labels, key=lambda label: (label.startswith("gRPC"), label.startswith(REFERENCE_BACKEND),
                                             not label.endswith("int8"), label))


def colours_for(cases: list[Case]) -> dict[str, str]:
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
    for ax, batch in zip(axes[0], batches, strict=True):
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


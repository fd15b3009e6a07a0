"""What the server's entry model counted during a replay, from its ``ume_*`` metrics (before and after)."""

from __future__ import annotations

import time

from ume_edge.serving import metrics


def scrape(metrics_url: str | None, timeout_s: float, settle: bool = False) -> dict | None:
    """The server's ``ume_*`` counters, or None when there is no metrics URL or it does not answer. With ``settle``,
    after the entry model has handed Triton what it counted so far (it does every ``EntryMetrics.FLUSH_S``)."""
    if not metrics_url:
        return None
    import urllib.error
    import urllib.request

    if settle:
        time.sleep(2 * metrics.EntryMetrics.FLUSH_S)
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout_s) as response:
            return metrics.parse(response.read().decode())
    except (urllib.error.URLError, OSError):
        return None


def server_figures(before: dict | None, after: dict | None) -> dict | None:
    """Requests, rows and mean time per presence pattern, refusals by reason, and rows per pipeline call."""
    if before is None or after is None:
        return None
    counted = metrics.difference(after, before)
    requests = metrics.by_label(counted, metrics.REQUESTS, "pattern")
    rows = metrics.by_label(counted, metrics.ROWS, "pattern")
    duration = metrics.by_label(counted, metrics.DURATION, "pattern")
    batches = metrics.total(counted, metrics.BATCHES)
    return {"per_pattern": {key: {"requests": int(n), "rows": int(rows.get(key, 0)),
                                  "mean_ms": duration.get(key, 0.0) / n / 1e3 if n else None}
                            for key, n in sorted(requests.items()) if n},
            "rejected": {reason: int(n) for reason, n in metrics.by_label(counted, metrics.REJECTED, "reason").items()
                         if n},
            "batches": int(batches),
            "rows_per_batch": metrics.total(counted, metrics.BATCH_ROWS) / batches if batches else None}


def format_server_figures(figures: dict) -> list[str]:
    lines = ["server (entry-model metrics):", f"{'pattern':<24}{'requests':>10}{'rows':>8}{'mean ms':>10}"]
    for key, row in figures["per_pattern"].items():
        mean = "-" if row["mean_ms"] is None else f"{row['mean_ms']:.3f}"
        lines.append(f"{key:<24}{row['requests']:>10}{row['rows']:>8}{mean:>10}")
    if figures["rows_per_batch"] is not None:
        lines.append(f"pipeline calls: {figures['batches']}, {figures['rows_per_batch']:.2f} rows each on average")
    if figures["rejected"]:
        lines.append(f"refused: {figures['rejected']}")
    return lines

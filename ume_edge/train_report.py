"""The training report: per seed, accuracy per presence pattern for every model, ceiling gaps, the UME-or-MMA
selection with how sure it is, the paired UME-vs-MMA test and the data-set targets; over seeds, their spread.

Everything here works on predicted classes (NumPy), so it does not care how the models were run.
"""

from __future__ import annotations

import math

import numpy as np

from ume_edge.scoring import discordant_pairs, mcnemar_exact, mean_over_patterns, percent_equal, spread

FUSED = ("naive", "ume", "mma")
SELECTION_RULES = ("prefer-ume", "prefer-mma", "higher-mean")
NOISE_Z = 1.96  # within noise: the validation difference is under 1.96 paired standard errors (two-sided 5%)
ALONE_RANGE = (60.0, 90.0)  # data-set target: each modality alone is unreliable but useful
TOGETHER_MARGIN = 5.0  # data-set target: both present beat the best modality alone by at least this many points
BY_CONSTRUCTION = ("UME's single-modality ceiling gaps are 0 by construction: with one modality present UME is "
                   "the uni-modal model (identical logits). They are not evidence of robustness; MMA's and the "
                   "naive baseline's gaps are.")
BEST_EPOCH = ("Every stage (uni-modal pre-training, MMA fine-tuning, the naive baseline) keeps the weights of its "
              "epoch with the best validation accuracy, averaged over presence patterns (a uni-modal model has one).")


def select(ume_correct: np.ndarray, mma_correct: np.ndarray, rule: str = "prefer-ume") -> dict:
    """Choose UME or MMA from their validation correctness (bool ``[patterns, samples]``, the same samples).

    The score is the mean accuracy over patterns. Its UME-MMA difference is paired per sample: each sample's share
    of patterns answered right, MMA's minus UME's; the standard error is that difference's over samples. Within
    noise (``|difference| <= NOISE_Z * standard error``), ``prefer-ume`` keeps the simpler UME and ``prefer-mma``
    keeps MMA; ``higher-mean`` takes the higher mean whatever the noise (UME on a tie)."""
    if rule not in SELECTION_RULES:
        raise ValueError(f"selection rule must be one of {', '.join(SELECTION_RULES)}, not {rule!r}")
    per_sample = mma_correct.mean(0) - ume_correct.mean(0)
    difference = 100.0 * float(per_sample.mean())
    standard_error = 100.0 * float(per_sample.std(ddof=1)) / math.sqrt(len(per_sample)) if len(per_sample) > 1 else 0.0
    within_noise = abs(difference) <= NOISE_Z * standard_error
    if rule == "higher-mean" or not within_noise:
        selected = "mma" if difference > 0 else "ume"
    else:
        selected = "ume" if rule == "prefer-ume" else "mma"
    return {"rule": rule, "selected": selected, "within_noise": bool(within_noise), "noise_z": NOISE_Z,
            "mma_minus_ume": round(difference, 2), "standard_error": round(standard_error, 2),
            "val_mean_accuracy": {"ume": round(100.0 * float(ume_correct.mean()), 2),
                                  "mma": round(100.0 * float(mma_correct.mean()), 2)}}


def seed_report(val_predictions: dict, test_predictions: dict, val_labels: np.ndarray, test_labels: np.ndarray,
                names: list[str], patterns: list[str], rule: str = "prefer-ume") -> dict:
    """One seed's results. ``*_predictions[role][pattern]`` are predicted classes; roles are ``uni:<modality>``
    (one pattern, its modality) and the fused ``naive``, ``ume``, ``mma``."""
    selection = select(_correct(val_predictions["ume"], val_labels, patterns),
                       _correct(val_predictions["mma"], val_labels, patterns), rule)
    selected = selection["selected"]
    val_tables = _tables(val_predictions, val_labels, names, patterns, selected)
    tables = _tables(test_predictions, test_labels, names, patterns, selected)
    gaps = {role: {n: _ceiling_gap(tables, role, n) for n in names} for role in (*FUSED, "selected")}
    return {
        "models": tables, "selected": selected, "val_mean_accuracy": selection["val_mean_accuracy"],
        "selection": selection, "ceiling_gaps": gaps,
        "ceiling_gaps_by_construction": ["ume", "selected"] if selected == "ume" else ["ume"],
        "ume_vs_mma": _paired_test(test_predictions["ume"], test_predictions["mma"], test_labels, patterns),
        "val_models": val_tables, "targets": dataset_targets(val_tables, names, patterns[0]),
    }


def _ceiling_gap(tables: dict[str, dict[str, float | None]], role: str, name: str) -> float:
    """Points the uni-modal model on ``name`` alone scores above ``role`` with only ``name`` present."""
    ceiling, fused = tables[f"uni:{name}"][name], tables[role][name]
    # A uni-modal model answers the pattern of its own modality and a fused model answers every pattern.
    assert ceiling is not None and fused is not None
    return round(ceiling - fused, 2)


def _correct(predictions: dict[str, np.ndarray], labels: np.ndarray, patterns: list[str]) -> np.ndarray:
    return np.stack([predictions[p] == labels for p in patterns])


def _tables(predictions, labels, names, patterns, selected) -> dict[str, dict[str, float | None]]:
    """Accuracy per pattern for every model; a uni-modal model answers a pattern that holds its modality."""
    tables = {}
    for name in names:
        accuracy = percent_equal(predictions[f"uni:{name}"][name], labels)
        tables[f"uni:{name}"] = {p: (accuracy if name in p.split("+") else None) for p in patterns}
    for role in FUSED:
        tables[role] = {p: percent_equal(predictions[role][p], labels) for p in patterns}
    tables["selected"] = tables[selected]
    return tables


def _paired_test(ume: dict, mma: dict, labels: np.ndarray, patterns: list[str]) -> dict:
    """Per pattern: the samples only UME answers right, only MMA answers right, and the exact McNemar p."""
    tests = {}
    for p in patterns:
        ume_only, mma_only = discordant_pairs(ume[p], mma[p], labels)
        tests[p] = {"ume_only_correct": ume_only, "mma_only_correct": mma_only,
                    "p": round(mcnemar_exact(ume_only, mma_only), 4)}
    return tests


def dataset_targets(val_tables: dict, names: list[str], all_present: str) -> dict:
    """The data set's targets, on validation: each modality alone in ``ALONE_RANGE``, the selected model with all
    present at least ``TOGETHER_MARGIN`` points above the best modality alone."""
    alone = {n: val_tables[f"uni:{n}"][n] for n in names}
    margin = round(val_tables["selected"][all_present] - max(alone.values()), 2)
    met = all(ALONE_RANGE[0] <= a <= ALONE_RANGE[1] for a in alone.values()) and margin >= TOGETHER_MARGIN
    return {"split": "val", "alone": alone, "alone_range": list(ALONE_RANGE), "together_margin": margin,
            "min_together_margin": TOGETHER_MARGIN, "met": met}


def multi_seed_report(entries: list[dict], shipped_seed: int, dataset: str, patterns: list[str],
                      train_seconds: float) -> dict:
    """The report: the shipped seed's results at the top level (the checkpoint is that seed's model), every seed's
    under ``seeds`` and their spread under ``summary``."""
    shipped = next(e for e in entries if e["seed"] == shipped_seed)
    top = {k: v for k, v in shipped.items() if k not in ("seed", "train_seconds")}
    return {"dataset": dataset, "split": "test", "patterns": patterns, "shipped_seed": shipped_seed, **top,
            "train_seconds": train_seconds, "seeds": entries, "summary": summarize(entries, patterns),
            "notes": [BY_CONSTRUCTION, BEST_EPOCH]}


def summarize(entries: list[dict], patterns: list[str]) -> dict:
    """Mean, sd, min and max over seeds of every accuracy and ceiling gap; the paired tests and selections."""
    roles = list(entries[0]["models"])
    names = list(entries[0]["ceiling_gaps"]["ume"])
    return {
        "seeds": [e["seed"] for e in entries],
        "models": {role: {p: _spread_or_none([e["models"][role][p] for e in entries]) for p in patterns}
                   for role in roles},
        "mean_over_patterns": {role: spread(mean_over_patterns(e["models"][role]) for e in entries)
                               for role in (*FUSED, "selected")},
        "ceiling_gaps": {role: {n: spread(e["ceiling_gaps"][role][n] for e in entries) for n in names}
                         for role in FUSED},
        "ceiling_gaps_by_construction": ["ume"],
        "ume_vs_mma": {p: _paired_summary([e["ume_vs_mma"][p] for e in entries]) for p in patterns},
        "selected": [e["selected"] for e in entries],
        "selection_within_noise": [e["selection"]["within_noise"] for e in entries],
        "targets": {"split": "val", "met_on_every_seed": all(e["targets"]["met"] for e in entries),
                    "alone": {n: spread(e["targets"]["alone"][n] for e in entries) for n in names},
                    "together_margin": spread(e["targets"]["together_margin"] for e in entries)},
    }


def _spread_or_none(values: list[float | None]) -> dict | None:
    return None if any(v is None for v in values) else spread(values)


def _paired_summary(tests: list[dict]) -> dict:
    ume_better = sum(t["ume_only_correct"] > t["mma_only_correct"] for t in tests)
    mma_better = sum(t["ume_only_correct"] < t["mma_only_correct"] for t in tests)
    return {"ume_better_seeds": ume_better, "mma_better_seeds": mma_better,
            "even_seeds": len(tests) - ume_better - mma_better,
            "p_by_seed": [t["p"] for t in tests], "min_p": min(t["p"] for t in tests)}


# ------------------------------------------------------------------ Markdown

def format_report(report: dict) -> str:
    """The report as Markdown: accuracy, ceiling gaps and the paired test over seeds, then the selections."""
    summary = report["summary"]
    seeds = ", ".join(map(str, summary["seeds"]))
    return "\n\n".join([
        f"Test accuracy (%) over seeds {seeds}, mean ± sd:", format_accuracy(summary, report["patterns"]),
        "Ceiling gap (uni-modal accuracy minus the fused model's, one modality present; lower is better), "
        "mean ± sd (min to max):", format_gaps(summary),
        "UME against MMA on test, per seed: samples only UME / only MMA answers right, exact McNemar p:",
        format_paired(report), "Selection on validation (mean accuracy over patterns):", format_selection(report),
        format_targets(report),
    ])


def _mean_sd(cell: dict | None) -> str:
    if cell is None:
        return "-"
    return f"{cell['mean']:.2f}" if cell["sd"] is None else f"{cell['mean']:.2f} ± {cell['sd']:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def format_accuracy(summary: dict, patterns: list[str]) -> str:
    rows = []
    for role, cells in summary["models"].items():
        mean = summary["mean_over_patterns"].get(role)
        label = "selected (" + ", ".join(summary["selected"]) + ")" if role == "selected" else role
        rows.append([label, *(_mean_sd(cells[p]) for p in patterns), _mean_sd(mean)])
    return _table(["model", *patterns, "mean"], rows)


def format_gaps(summary: dict) -> str:
    by_construction = summary["ceiling_gaps_by_construction"]
    rows = []
    for role, gaps in summary["ceiling_gaps"].items():
        cells = ["0 by construction" if role in by_construction else _gap_spread(g) for g in gaps.values()]
        rows.append([role, *cells])
    return _table(["model", *next(iter(summary["ceiling_gaps"].values()))], rows)


def _gap_spread(gap: dict) -> str:
    sd = "" if gap["sd"] is None else f" ± {gap['sd']:.2f}"
    return f"{gap['mean']:+.2f}{sd} ({gap['min']:+.2f} to {gap['max']:+.2f})"


def format_paired(report: dict) -> str:
    rows = []
    for pattern in report["patterns"]:
        cells = [f"{t['ume_only_correct']} / {t['mma_only_correct']}, p = {t['p']:.3f}"
                 for t in (e["ume_vs_mma"][pattern] for e in report["seeds"])]
        rows.append([pattern, *cells])
    return _table(["pattern", *(f"seed {e['seed']}" for e in report["seeds"])], rows)


def format_selection(report: dict) -> str:
    rows = []
    for e in report["seeds"]:
        s = e["selection"]
        rows.append([str(e["seed"]), f"{s['val_mean_accuracy']['ume']:.2f}", f"{s['val_mean_accuracy']['mma']:.2f}",
                     f"{s['mma_minus_ume']:+.2f} ± {s['standard_error']:.2f}", "yes" if s["within_noise"] else "no",
                     f"{e['selected']} ({s['rule']})" + (" shipped" if e["seed"] == report["shipped_seed"] else "")])
    return _table(["seed", "UME", "MMA", "MMA - UME ± SE", f"within noise ({NOISE_Z} SE)", "selected"], rows)


def format_targets(report: dict) -> str:
    targets = report["summary"]["targets"]
    alone = ", ".join(f"{n} alone {_mean_sd(s)}" for n, s in targets["alone"].items())
    verdict = "met on every seed" if targets["met_on_every_seed"] else "NOT met on every seed"
    low, high = ALONE_RANGE
    return (f"Data-set targets on validation (each alone {low:g}-{high:g}%, together at least {TOGETHER_MARGIN:g} "
            f"points more): {alone}; together minus the best alone {_mean_sd(targets['together_margin'])} points; "
            f"{verdict}.")

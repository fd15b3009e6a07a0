"""``python -m ume_edge.bench report``: the flags, and where the report may be written."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ume_edge.bench.compare import DEFAULT_THRESHOLD
from ume_edge.bench.report import update_baseline, write_report

DEFAULT_BASELINE = Path("bench/baseline")


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
        path, found = write_report(args.results, out, args.compare, args.threshold)
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

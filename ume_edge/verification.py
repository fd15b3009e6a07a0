"""The verification record of an engine directory, and the check of a deployment against it.

The build writes ``verification.npz`` (``Golden``): a few fixed rows of the evaluation data per modality, and for
every presence pattern the fp32 PyTorch logits and the engines' own logits on them. ``run_engines`` runs an engine
directory on this machine and ``run_served`` a served ``ume`` model over gRPC, each on the golden inputs, every
pattern both ways a client may send it (only the present modalities, and every modality with the ``present`` mask,
patterns mixed in one request); ``compare`` holds the answers to the record and gives the verdict.

Tolerances (``tolerances``), chosen from what the build measured. The same engines on another machine differ from the
recorded answers by rounding only; an engine built another way (other precision flags, a stale calibration cache,
another file) differs by about its whole quantization error, the largest |engines - fp32| the build measured. So
``vs_build`` is a share of that error (a quarter for the engines themselves, half when the record comes from ONNX
Runtime running the files another runtime builds from), never below a floor per precision; ``vs_fp32`` is the
measured error plus ``vs_build``, which a deployment within ``vs_build`` of the record cannot exceed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ume_edge.constants import LOGITS, PARTIAL_LOGITS, PRESENT
from ume_edge.data import pattern_key, presence_patterns

LOGGER = logging.getLogger(__name__)

RECORD_FILE = "verification.npz"
MAX_ROWS = 32
MAX_BYTES = 16 << 20  # of golden inputs: enough rows to mean something, small enough to ship beside the engines
ROUTE_INPUTS = "inputs"  # each pattern as a request of the present modalities only
ROUTE_MASK = "mask"  # every modality and the ``present`` mask, the patterns mixed in each request
ROUTES = (ROUTE_INPUTS, ROUTE_MASK)
FLOOR = {"fp32": 1e-3, "fp16": 1e-2, "int8": 1e-2}  # |Δlogit| that rounding alone may cause, per precision
SHARE_SAME_ENGINES = 0.25
SHARE_OTHER_RUNTIME = 0.5

Logits = dict[str, np.ndarray]  # presence pattern -> float32 [R, C]


@dataclass
class Golden:
    """The contents of ``verification.npz``."""

    inputs: dict[str, np.ndarray]  # modality -> [R, *shape]
    fp32: Logits
    engines: Logits
    partials: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> the engine's [R, C]

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values())))

    def save(self, path: Path) -> None:
        arrays = {f"input/{n}": x for n, x in self.inputs.items()}
        arrays.update({f"fp32/{p}": x for p, x in self.fp32.items()})
        arrays.update({f"engines/{p}": x for p, x in self.engines.items()})
        arrays.update({f"partial/{n}": x for n, x in self.partials.items()})
        with open(path, "wb") as file:
            np.savez(file, **arrays)

    @classmethod
    def load(cls, path: Path) -> Golden:
        groups: dict[str, dict[str, np.ndarray]] = {"input": {}, "fp32": {}, "engines": {}, "partial": {}}
        with np.load(path, allow_pickle=False) as arrays:
            for key in arrays.files:
                group, _, name = key.partition("/")
                groups[group][name] = arrays[key]
        return cls(groups["input"], groups["fp32"], groups["engines"], groups["partial"])


def golden_rows(inputs: dict[str, np.ndarray], max_batch: int) -> tuple[dict[str, np.ndarray], str]:
    """Evenly spaced rows of the evaluation inputs, at most ``MAX_ROWS`` (and ``max_batch``) and ``MAX_BYTES``."""
    count = len(next(iter(inputs.values())))
    row_bytes = sum(x[:1].nbytes for x in inputs.values())
    rows = max(1, min(MAX_ROWS, max_batch, count, MAX_BYTES // max(row_bytes, 1)))
    index = np.linspace(0, count - 1, rows).round().astype(np.int64)
    return {name: np.ascontiguousarray(x[index]) for name, x in inputs.items()}, f"{rows} evenly spaced rows of {count}"


def tolerances(measured_vs_fp32: dict[str, float], precisions: Iterable[str],
               same_engines: bool) -> tuple[float, dict[str, float]]:
    """``(vs_build, vs_fp32 per pattern)`` for engines of ``precisions`` whose recorded answers differ from fp32 by
    ``measured_vs_fp32``; ``same_engines`` when the recorded answers are the engines' own (see the module doc)."""
    share = SHARE_SAME_ENGINES if same_engines else SHARE_OTHER_RUNTIME
    vs_build = max(max(FLOOR[p] for p in precisions), share * max(measured_vs_fp32.values()))
    return float(vs_build), {p: float(d + vs_build) for p, d in measured_vs_fp32.items()}


def how_chosen(same_engines: bool) -> str:
    share = SHARE_SAME_ENGINES if same_engines else SHARE_OTHER_RUNTIME
    floors = ", ".join(f"{p} {v:g}" for p, v in FLOOR.items())
    return (f"vs_build: {share:g} x the largest |engines - fp32| logit measured at build (an engine built another way "
            f"differs by about that whole error; the same engine elsewhere by rounding), at least the floor of the "
            f"lowest precision ({floors}); vs_fp32: the measured |engines - fp32| of the pattern + vs_build")


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max())


# ---------------------------------------------------------------------------------------------------------------
# running the golden inputs


def _pattern_rows(golden: dict[str, np.ndarray], order: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray, list]:
    """Every pattern's rows in one batch: the inputs tiled once per pattern and the bool ``[R * P, M]`` mask."""
    patterns = presence_patterns(order)
    rows = len(next(iter(golden.values())))
    tiled = {name: np.concatenate([x] * len(patterns)) for name, x in golden.items()}
    mask = np.concatenate([np.tile([name in pattern for name in order], (rows, 1)) for pattern in patterns])
    return tiled, mask, patterns


def _chunks(total: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def run_both_routes(infer_inputs: Callable[[dict[str, np.ndarray]], np.ndarray],
                    infer_masked: Callable[[dict[str, np.ndarray], np.ndarray], np.ndarray],
                    golden: dict[str, np.ndarray], order: list[str], max_batch: int) -> dict[str, Logits]:
    """``{route: {pattern: logits}}`` from ``infer_inputs(present inputs)`` and ``infer_masked(all inputs, mask)``."""
    by_inputs = {}
    for pattern in presence_patterns(order):
        present = {name: golden[name] for name in pattern}
        rows = len(golden[pattern[0]])
        by_inputs[pattern_key(pattern)] = np.concatenate(
            [infer_inputs({n: x[part] for n, x in present.items()}) for part in _chunks(rows, max_batch)])
    tiled, mask, patterns = _pattern_rows(golden, order)
    masked = np.concatenate([infer_masked({n: x[part] for n, x in tiled.items()}, mask[part])
                             for part in _chunks(len(mask), max_batch)])
    rows = len(next(iter(golden.values())))
    by_mask = {pattern_key(p): masked[i * rows:(i + 1) * rows] for i, p in enumerate(patterns)}
    return {ROUTE_INPUTS: by_inputs, ROUTE_MASK: by_mask}


def run_engines(pipeline, golden: dict[str, np.ndarray]) -> tuple[dict[str, Logits], dict[str, np.ndarray]]:
    """An open ``runtime.Pipeline`` on the golden inputs: ``({route: {pattern: logits}}, {modality: partial})``."""
    order = pipeline.modality_names

    def masked(inputs, mask):
        return pipeline.infer(inputs, present={n: mask[:, i] for i, n in enumerate(order)}).logits

    logits = run_both_routes(lambda inputs: pipeline.infer(inputs).logits, masked, golden, order, pipeline.max_batch)
    partials = {}
    for name in order:
        encoder = pipeline.open_encoder(name)
        try:
            partials[name] = np.concatenate([encoder.infer({name: golden[name][part]})[PARTIAL_LOGITS]
                                             for part in _chunks(len(golden[name]), pipeline.max_batch)])
        finally:
            encoder.close()
    return logits, partials


def run_served(client, model: str, golden: dict[str, np.ndarray], order: list[str], max_batch: int,
               timeout_s: float = 60.0) -> dict[str, Logits]:
    """A served ``model`` (a ``tritonclient.grpc.InferenceServerClient``) on the golden inputs, both routes."""
    from ume_edge.client.streaming import grpc_inputs

    def send(arrays: dict[str, np.ndarray]) -> np.ndarray:
        return client.infer(model, grpc_inputs(arrays), client_timeout=timeout_s).as_numpy(LOGITS)

    return run_both_routes(send, lambda inputs, mask: send({**inputs, PRESENT: mask}), golden, order, max_batch)


# ---------------------------------------------------------------------------------------------------------------
# comparing


@dataclass
class Row:
    """One pattern on one route (or, with ``route`` "encoder", one modality's partial logits)."""

    route: str
    pattern: str
    vs_build: float
    tolerance_vs_build: float
    vs_fp32: float | None
    tolerance_vs_fp32: float | None
    labels_vs_build: float  # % of rows whose label equals the recorded engines' label
    labels_vs_fp32: float | None

    @property
    def holds(self) -> bool:
        within_fp32 = self.vs_fp32 is None or self.tolerance_vs_fp32 is None or self.vs_fp32 <= self.tolerance_vs_fp32
        return self.vs_build <= self.tolerance_vs_build and within_fp32


@dataclass
class Verdict:
    rows: list[Row]
    holds: bool
    message: str

    def to_json(self) -> dict:
        return {"holds": self.holds, "message": self.message,
                "rows": [{**vars(row), "holds": row.holds} for row in self.rows]}


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return round(100.0 * float((a.argmax(1) == b.argmax(1)).mean()), 2)


def compare(record, golden: Golden, observed: dict[str, Logits],
            partials: dict[str, np.ndarray] | None = None) -> Verdict:
    """The answers ``observed`` (``{route: {pattern: logits}}``) and, when run locally, each engine's ``partials``,
    held to the record (``engine_dir.VerificationRecord``) and its ``golden`` arrays."""
    rows = []
    for name, partial in sorted((partials or {}).items()):
        if name in golden.partials:
            recorded = golden.partials[name]
            rows.append(Row("encoder", name, max_abs(partial, recorded), record.tolerance_vs_build, None, None,
                            _agreement(partial, recorded), None))
    for route, answers in observed.items():
        for pattern, logits in answers.items():
            fp32 = golden.fp32[pattern]
            rows.append(Row(route, pattern, max_abs(logits, golden.engines[pattern]), record.tolerance_vs_build,
                            max_abs(logits, fp32), record.tolerance_vs_fp32[pattern],
                            _agreement(logits, golden.engines[pattern]), _agreement(logits, fp32)))
    return Verdict(rows, all(row.holds for row in rows), _verdict_message(rows))


def _verdict_message(rows: list[Row]) -> str:
    failed = [row for row in rows if not row.holds]
    if not failed:
        worst = max(rows, key=lambda row: row.vs_build / row.tolerance_vs_build)
        return (f"holds: every pattern on every route within tolerance (closest: {worst.route} {worst.pattern}, "
                f"|Δlogit| {worst.vs_build:.3g} of {worst.tolerance_vs_build:.3g} allowed)")
    encoders = [row.pattern for row in failed if row.route == "encoder"]
    patterns = sorted({row.pattern for row in failed if row.route != "encoder"})
    suspects = encoders or _common_modalities(patterns, [row.pattern for row in rows if row.holds
                                                          and row.route != "encoder"])
    worst = max(failed, key=lambda row: row.vs_build / row.tolerance_vs_build)
    culprit = (f"the {' and '.join(suspects)} engine{'s differ' if len(suspects) > 1 else ' differs'}" if suspects
               else "the engines differ")
    return (f"FAILED: {culprit} from the build; patterns {', '.join(patterns) or '(none)'} fail (worst: {worst.route} "
            f"{worst.pattern}, |Δlogit| {worst.vs_build:.3g} against the build, {worst.tolerance_vs_build:.3g} "
            f"allowed)")


def _common_modalities(failing: list[str], passing: list[str]) -> list[str]:
    """The modalities every failing pattern has and no passing pattern has: the engines that can explain it."""
    if not failing:
        return []
    common = set.intersection(*(set(p.split("+")) for p in failing))
    cleared = {name for p in passing for name in p.split("+")}
    return sorted(common - cleared)


def table(verdict: Verdict) -> str:
    """The rows as a Markdown table."""
    lines = ["| route | pattern | max \\|Δlogit\\| vs build | allowed | max \\|Δlogit\\| vs fp32 | allowed | "
             "labels = build | labels = fp32 | |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in verdict.rows:
        fp32 = "" if row.vs_fp32 is None else f"{row.vs_fp32:.4f}"
        fp32_allowed = "" if row.tolerance_vs_fp32 is None else f"{row.tolerance_vs_fp32:.4f}"
        fp32_labels = "" if row.labels_vs_fp32 is None else f"{row.labels_vs_fp32:.1f}%"
        lines.append(f"| {row.route} | {row.pattern} | {row.vs_build:.4f} | {row.tolerance_vs_build:.4f} | {fp32} | "
                     f"{fp32_allowed} | {row.labels_vs_build:.1f}% | {fp32_labels} | "
                     f"{'ok' if row.holds else 'FAIL'} |")
    return "\n".join(lines)


def load_golden(directory: Path, manifest) -> Golden:
    """The golden arrays of a loaded directory (``engine_dir.load`` checked the file's hash), or ``EngineMismatch``
    saying how to get a record."""
    from ume_edge.errors import EngineMismatch

    if manifest.verification is None:
        raise EngineMismatch(f"{directory} has no verification record: it was built before ume-edge 0.3 (schema "
                             "version 2). Rebuild it with `python -m ume_edge.build` to be able to verify it")
    return Golden.load(directory / manifest.verification.file.path)

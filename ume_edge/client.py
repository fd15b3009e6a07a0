"""Replay a data set as sensor streams against a Triton server over gRPC.

    python -m ume_edge.client --url localhost:8001 --drop image=0.2,audio=0.3 --concurrency 16

Each sample of the split becomes one request. Every sensor (modality) is a stream: its reading of a sample is
lost with the ``--drop`` probability, and arrives with a random delay (exponential, mean ``--jitter-ms``). With
``--deadline-ms`` the request leaves when every surviving reading is in or the deadline passes, whichever is
first, and readings later than the deadline are left out. A request never goes out empty: if every reading of a
sample is lost, the sample is drawn again. Requests are asynchronous (``tritonclient.grpc``), at most
``--concurrency`` in flight, paced at ``--rate`` per second if given. At the end it prints accuracy per presence
pattern, latency p50/p90/p99 and throughput; ``run_client(...)`` returns the same as a dict.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ume_edge.data import load, pattern_key

DEFAULT_JITTER_MS = {"audio": 8.0, "image": 3.0}
FALLBACK_JITTER_MS = 5.0
MAX_REDRAWS = 1000


# ---------------------------------------------------------------------------------------------------------------
# sensors: which modalities make it into each request


def parse_modality_values(text: str | None, flag: str) -> dict[str, float]:
    """``"image=0.2,audio=0.3"`` -> ``{"image": 0.2, "audio": 0.3}``."""
    items = filter(None, (part.strip() for part in (text or "").split(",")))
    return dict(_name_value(item, flag) for item in items)


def _name_value(item: str, flag: str) -> tuple[str, float]:
    name, _, number = (part.strip() for part in item.partition("="))
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if not name or np.isnan(value):
        raise ValueError(f"{flag} expects name=value pairs separated by commas (e.g. image=0.2,audio=0.3), "
                         f"got {item!r}")
    return name, value


@dataclass
class SensorPlan:
    """When the request for one sample leaves, and which modalities it carries."""

    sample: int
    present: tuple[str, ...]
    wait_s: float  # after the sample's nominal time: the last arrival, capped by the deadline
    dropped: tuple[str, ...] = ()
    late: tuple[str, ...] = ()


@dataclass
class SensorModel:
    """Per-sensor loss probability and mean arrival delay, and the deadline after which a reading is left out."""

    modalities: list[str]
    drop: dict[str, float] = field(default_factory=dict)
    jitter_ms: dict[str, float] = field(default_factory=dict)
    deadline_ms: float | None = None

    def __post_init__(self):
        unknown = sorted((set(self.drop) | set(self.jitter_ms)) - set(self.modalities))
        if unknown:
            raise ValueError(f"unknown modality {unknown[0]!r} in --drop/--jitter-ms; "
                             f"the modalities are {', '.join(self.modalities)}")
        for name, p in self.drop.items():
            if not 0.0 <= p < 1.0:
                raise ValueError(f"--drop {name}={p}: a probability must be in [0, 1)")

    def plan(self, sample: int, rng: np.random.Generator) -> SensorPlan:
        """Draw drops and arrival delays until at least one modality is present."""
        for _ in range(MAX_REDRAWS):
            plan = self._draw(sample, rng)
            if plan.present:
                return plan
        raise ValueError(f"{MAX_REDRAWS} draws in a row lost every modality; lower --drop or raise --deadline-ms")

    def _draw(self, sample: int, rng: np.random.Generator) -> SensorPlan:
        dropped, late, present, arrivals = [], [], [], []
        for name in self.modalities:
            if rng.random() < self.drop.get(name, 0.0):
                dropped.append(name)
                continue
            arrival_ms = rng.exponential(self.jitter_ms.get(name, DEFAULT_JITTER_MS.get(name, FALLBACK_JITTER_MS)))
            if self.deadline_ms is not None and arrival_ms > self.deadline_ms:
                late.append(name)
                continue
            present.append(name)
            arrivals.append(arrival_ms)
        wait_ms = max(arrivals, default=0.0)
        if late:
            wait_ms = self.deadline_ms
        return SensorPlan(sample, tuple(present), wait_ms / 1e3, tuple(dropped), tuple(late))


# ---------------------------------------------------------------------------------------------------------------
# the gRPC stream


@dataclass
class Outcome:
    plan: SensorPlan
    sent_s: float
    latency_s: float | None = None
    label: int | None = None
    error: str | None = None


class Progress:
    """``[#####.....] 512/1000`` on stderr, redrawn at most every 0.2 s."""

    def __init__(self, total: int, enabled: bool, width: int = 30):
        self.total, self.enabled, self.width = total, enabled, width
        self._last = 0.0

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self._last < 0.2):
            return
        self._last = now
        filled = int(self.width * done / max(1, self.total))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} requests")
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _model_inputs(client, model: str) -> dict[str, str]:
    """Input name -> Triton datatype, from the server's model metadata."""
    metadata = client.get_model_metadata(model, as_json=True)
    return {tensor["name"]: tensor["datatype"] for tensor in metadata["inputs"]}


def grpc_inputs(arrays: dict[str, np.ndarray], datatypes: dict[str, str] | None = None) -> list:
    """``tritonclient.grpc.InferInput`` list for ``{name: array}`` (datatype from the array unless given)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    tensors = []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        datatype = (datatypes or {}).get(name) or np_to_triton_dtype(array.dtype)
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def _request_inputs(inputs: dict[str, np.ndarray], plan: SensorPlan, datatypes: dict[str, str]) -> list:
    return grpc_inputs({name: inputs[name][plan.sample: plan.sample + 1] for name in plan.present}, datatypes)


def stream(url: str, model: str, inputs: dict[str, np.ndarray], plans: list[SensorPlan], *, concurrency: int,
           rate: float | None, timeout_s: float, progress: bool) -> tuple[list[Outcome], float]:
    """Send one request per plan, at most ``concurrency`` in flight; returns the outcomes and the wall time."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        datatypes = _model_inputs(client, model)
        missing = [name for plan in plans for name in plan.present if name not in datatypes][:1]
        if missing:
            raise ValueError(f"model {model!r} at {url} has no input {missing[0]!r} (it has {', '.join(datatypes)})")
        outputs = [grpcclient.InferRequestedOutput("label")]
        slots = threading.Semaphore(concurrency)
        tally = _Tally()
        outcomes: list[Outcome] = []
        bar = Progress(len(plans), progress)
        start = time.perf_counter()
        for index, plan in enumerate(plans):
            if rate:
                _sleep_until(start + index / rate + plan.wait_s)
            request_inputs = _request_inputs(inputs, plan, datatypes)
            slots.acquire()
            outcome = Outcome(plan, time.perf_counter())
            outcomes.append(outcome)
            client.async_infer(model, request_inputs, _on_answer(outcome, slots, tally), outputs=outputs,
                               client_timeout=timeout_s)
            bar.update(tally.done)
        tally.wait_for(len(plans), timeout_s + 5)
        wall_s = time.perf_counter() - start
        bar.update(tally.done, final=True)
        return outcomes, wall_s
    finally:
        client.close()


class _Tally:
    """How many answers came back; the stream waits on it at the end."""

    def __init__(self):
        self.done = 0
        self._changed = threading.Condition()

    def add(self) -> None:
        with self._changed:
            self.done += 1
            self._changed.notify_all()

    def wait_for(self, count: int, timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.done >= count, timeout=timeout_s)


def _on_answer(outcome: Outcome, slots: threading.Semaphore, tally: _Tally):
    def callback(result, error):
        outcome.latency_s = time.perf_counter() - outcome.sent_s
        if error is not None:
            outcome.error = str(error)
        else:
            outcome.label = int(result.as_numpy("label").reshape(-1)[0])
        slots.release()
        tally.add()
    return callback


def _sleep_until(moment: float) -> None:
    delay = moment - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


# ---------------------------------------------------------------------------------------------------------------
# the report


def summarize(outcomes: list[Outcome], labels: np.ndarray | None, wall_s: float) -> dict:
    answered = [o for o in outcomes if o.error is None and o.label is not None]
    latencies_ms = np.array([o.latency_s * 1e3 for o in answered]) if answered else np.zeros(0)
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
        "dropped": _count(o.plan.dropped for o in outcomes),
        "late": _count(o.plan.late for o in outcomes),
    }


def _accuracy(outcomes: list[Outcome], labels: np.ndarray | None) -> float | None:
    if labels is None or not outcomes:
        return None
    return float(np.mean([o.label == labels[o.plan.sample] for o in outcomes]))


def _per_pattern(outcomes: list[Outcome], labels: np.ndarray | None) -> dict[str, dict]:
    groups: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        groups.setdefault(pattern_key(outcome.plan.present), []).append(outcome)
    return {key: {"count": len(group), "accuracy": _accuracy(group, labels)} for key, group in sorted(groups.items())}


def _count(groups) -> dict[str, int]:
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
    lines += [f"error: {message}" for message in summary["error_examples"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# entry points


def run_client(url: str = "localhost:8001", model: str = "ume", dataset: str = "avdigits", split: str = "test",
               drop: dict[str, float] | None = None, rate: float | None = None, concurrency: int = 1,
               deadline_ms: float | None = None, requests: int | None = None, seed: int = 0,
               jitter_ms: dict[str, float] | None = None, timeout_s: float = 30.0, progress: bool = False,
               json_out: str | Path | None = None) -> dict:
    """Replay ``dataset``/``split`` against ``model`` at ``url`` and return the summary dict."""
    if concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
    if rate is not None and rate <= 0:
        raise ValueError(f"--rate must be positive, got {rate}")
    inputs, labels = load(dataset, split)
    sensors = SensorModel(list(inputs), drop or {}, jitter_ms or {}, deadline_ms)
    total = len(next(iter(inputs.values())))
    count = total if requests is None else requests
    rng = np.random.default_rng(seed)
    plans = [sensors.plan(index % total, rng) for index in range(count)]
    outcomes, wall_s = stream(url, model, inputs, plans, concurrency=concurrency, rate=rate, timeout_s=timeout_s,
                              progress=progress)
    summary = summarize(outcomes, labels, wall_s)
    summary["settings"] = {"url": url, "model": model, "dataset": dataset, "split": split, "drop": drop or {},
                           "rate": rate, "concurrency": concurrency, "deadline_ms": deadline_ms, "seed": seed}
    if json_out:
        Path(json_out).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ume_edge.client",
        description="Replay a data set as one stream per sensor against a Triton server (gRPC), leaving out the "
                    "modalities that dropped or missed the deadline; report accuracy per presence pattern, "
                    "latency percentiles and throughput.",
    )
    parser.add_argument("--url", default="localhost:8001", help="gRPC address host:port (default localhost:8001)")
    parser.add_argument("--model", default="ume", help="model name (default ume)")
    parser.add_argument("--dataset", default="avdigits", help="data set name or .npz path (default avdigits)")
    parser.add_argument("--split", default="test", help="split to replay (default test)")
    parser.add_argument("--drop", default="", help="loss probability per sensor, e.g. image=0.2,audio=0.3")
    parser.add_argument("--jitter-ms", default="", help="mean arrival delay per sensor in ms (exponential), e.g. "
                        f"audio=8,image=3 (default {','.join(f'{k}={v:g}' for k, v in DEFAULT_JITTER_MS.items())})")
    parser.add_argument("--deadline-ms", type=float, default=None,
                        help="leave out readings that arrive later than this after the sample (default: wait)")
    parser.add_argument("--rate", type=float, default=None, help="samples per second (default: as fast as allowed)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at most (default 1)")
    parser.add_argument("--requests", type=int, default=None, help="requests to send (default: the whole split; "
                        "more cycles through it)")
    parser.add_argument("--seed", type=int, default=0, help="seed for drops and jitter (default 0)")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="per-request timeout (default 30)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the summary as JSON to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        summary = run_client(
            url=args.url, model=args.model, dataset=args.dataset, split=args.split,
            drop=parse_modality_values(args.drop, "--drop"), rate=args.rate, concurrency=args.concurrency,
            deadline_ms=args.deadline_ms, requests=args.requests, seed=args.seed,
            jitter_ms=parse_modality_values(args.jitter_ms, "--jitter-ms"), timeout_s=args.timeout_s,
            progress=not args.no_progress, json_out=args.json_out,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # tritonclient raises its own exception types for an unreachable server
        print(f"error: {error}\n(is the server running? start it with: python -m ume_edge.serve)", file=sys.stderr)
        return 1
    print(format_report(summary))
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

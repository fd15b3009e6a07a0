"""The ``ume`` request contract: what a request may hold, every refusal with its text and reason, and the counters.

One module for ``Pipeline``, the pipeline and BLS entry models, the Python encoder models and the TensorRT path.
It imports numpy and the standard library only: ``triton_repo`` copies it beside each Python-backend ``model.py``
as ``ume_contract.py`` (Triton's stub puts the model's version folder on ``sys.path``), so a repository runs where
ume-edge is not installed.

A request maps modality names to arrays ``[rows, *shape]`` of the manifest's dtype. Optionally it also carries
``present``, a bool ``[rows, M]`` mask over the fusion's modality order; then it carries every modality, and rows of a
modality marked absent may hold anything (they are zeroed, and never computed).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

import numpy as np

PRESENT = "present"
LOGITS = "logits"
PROBS = "probs"
LABEL = "label"
ENTRY_MODEL = "ume"
CONTRACT_FILE = "ume_contract.py"  # its name beside a model.py

# Why a request was refused: the ``reason`` label of ``ume_rejected_total``.
UNKNOWN_INPUT = "unknown_input"
NO_MODALITY = "no_modality"
SHAPE = "shape"
DTYPE = "dtype"
BATCH_SIZE = "batch_size"
NAN = "nan"
RANGE = "range"
MASK = "mask"
FAILED = "failed"  # the engines failed on the request; not a problem of its input
REASONS = (UNKNOWN_INPUT, NO_MODALITY, SHAPE, DTYPE, BATCH_SIZE, NAN, RANGE, MASK, FAILED)

REQUESTS = "ume_requests_total"
ROWS = "ume_rows_total"
DURATION = "ume_request_duration_us_total"
REJECTED = "ume_rejected_total"
BATCHES = "ume_batches_total"
BATCH_ROWS = "ume_batch_rows_total"
METRIC_DESCRIPTIONS = {
    REQUESTS: "Requests answered, by presence pattern",
    ROWS: "Rows of the answered requests, by presence pattern",
    DURATION: "Cumulative microseconds of entry-model execution per request, by presence pattern",
    REJECTED: "Requests refused, by reason",
    BATCHES: "Pipeline calls of the entry model",
    BATCH_ROWS: "Rows of those pipeline calls",
}


class Refused(ValueError):
    """A request the contract refuses: the message says what is wrong and how to fix it; ``reason`` is one of
    ``REASONS``."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    value_range: tuple[int, int] | None = None  # valid integer ids [low, high), when the build could tell


def pattern_key(names) -> str:
    """``('image', 'audio') -> 'audio+image'``: a presence pattern as every report and metric names it."""
    return "+".join(sorted(names))


def _rows(flags: np.ndarray) -> list[int]:
    return np.flatnonzero(flags)[:8].tolist()


def check_values(spec: ModalitySpec, x: np.ndarray) -> None:
    """Refuse what the engines would answer wrongly: NaN or Inf, and integer ids outside the modality's range (an
    ONNX Gather wraps negative ids around and fails on ids past the table; ids below 0 are refused without one)."""
    if spec.dtype.kind == "f" and not np.isfinite(x).all():
        count = int(np.count_nonzero(~np.isfinite(x)))
        rows = _rows(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
        raise Refused(f"modality {spec.name!r}: {count} NaN or Inf value(s) in rows {rows}; send finite values, or "
                      f"leave {spec.name!r} out (or mark it absent) where that sensor has no reading", NAN)
    if spec.dtype.kind not in "iu":
        return
    low, high = spec.value_range or (0, None)
    outside = (x < low) if high is None else (x < low) | (x >= high)
    if outside.any():
        rows = _rows(outside.reshape(len(x), -1).any(axis=1))
        valid = f"[{low}, {high})" if high is not None else f"{low} or more"
        raise Refused(f"modality {spec.name!r}: value {x[outside][0]} (rows {rows}) is outside the valid ids {valid}; "
                      "send ids the model was trained with", RANGE)


def check_array(spec: ModalitySpec, x, max_batch: int) -> np.ndarray:
    """``x`` as one modality's contiguous batch, or ``Refused``."""
    if type(x) is not np.ndarray:  # a masked array, a matrix or a memmap subclass would hide or change values
        raise Refused(f"modality {spec.name!r}: expected a plain numpy array, got {type(x).__name__}; pass "
                      "np.asarray(...) of the values you mean (fill masked values first)", DTYPE)
    if x.dtype != spec.dtype:
        raise Refused(f"modality {spec.name!r}: expected dtype {spec.dtype}, got {x.dtype}", DTYPE)
    if x.ndim != len(spec.shape) + 1 or tuple(x.shape[1:]) != spec.shape:
        raise Refused(f"modality {spec.name!r}: expected shape [batch, {', '.join(map(str, spec.shape))}], got "
                      f"{list(x.shape)}", SHAPE)
    if len(x) == 0:
        raise Refused(f"modality {spec.name!r}: empty batch (0 rows); leave it out instead", SHAPE)
    if len(x) > max_batch:
        raise Refused(f"modality {spec.name!r}: batch of {len(x)} is above the built maximum {max_batch}; split it, "
                      f"or rebuild with --max-batch {len(x)}", BATCH_SIZE)
    check_values(spec, x)
    return np.ascontiguousarray(x)


def check_inputs(inputs, specs: list[ModalitySpec], max_batch: int) -> tuple[dict[str, np.ndarray], int]:
    """``Pipeline.infer``'s inputs (modality -> array, or None where absent) as ``(given arrays, batch)``."""
    names = [spec.name for spec in specs]
    if not isinstance(inputs, dict):
        raise Refused(f"inputs must be a dict of modality name -> array, got {type(inputs).__name__}", UNKNOWN_INPUT)
    _refuse_unknown(inputs, names)
    given = {spec.name: check_array(spec, inputs[spec.name], max_batch) for spec in specs
             if inputs.get(spec.name) is not None}
    if not given:
        raise Refused(f"no modality present; send at least one of {', '.join(names)}", NO_MODALITY)
    return given, _same_rows({name: len(x) for name, x in given.items()})


def _refuse_unknown(inputs: dict, names: list[str]) -> None:
    unknown = sorted(map(repr, set(inputs) - set(names)))
    if unknown:
        raise Refused(f"unknown modality {', '.join(unknown)}; the inputs are {', '.join(names)} (and {PRESENT!r})",
                      UNKNOWN_INPUT)


def _same_rows(rows: dict[str, int]) -> int:
    if len(set(rows.values())) != 1:
        raise Refused(f"batch sizes differ between modalities: {rows}; send the same rows for each", SHAPE)
    return next(iter(rows.values()))


def _no_empty_rows(mask: np.ndarray) -> np.ndarray:
    empty = ~mask.any(axis=1)
    if empty.any():
        raise Refused(f"rows {_rows(empty)} have no modality present; drop them or mark at least one modality present",
                      NO_MODALITY)
    return mask


def check_mask(mask, names: list[str], rows: int | None = None, what: str = PRESENT) -> np.ndarray:
    """``mask`` as a bool ``[rows, M]`` presence mask over ``names`` (any number of rows above 0 when ``rows`` is
    None) in which every row has a modality present, or ``Refused``."""
    expected = (rows, len(names)) if rows is not None else (len(mask) if np.ndim(mask) == 2 else 0, len(names))
    if type(mask) is not np.ndarray or mask.dtype != bool or mask.shape != expected or not len(mask):
        found = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise Refused(f"{what!r} must be a bool array [{'rows' if rows is None else rows}, {len(names)}] (rows x "
                      f"modalities {', '.join(names)}), got {found}", MASK)
    return _no_empty_rows(mask)


def check_present_rows_given(given: dict[str, np.ndarray], mask: np.ndarray, names: list[str]) -> None:
    """Every modality with a present row in ``mask`` must be in ``given`` with all of the mask's rows."""
    for i, name in enumerate(names):
        if mask[:, i].any() and (name not in given or len(given[name]) != len(mask)):
            raise Refused(f"modality {name!r} has present rows, so its input must hold all {len(mask)} rows of the "
                          "batch", MASK)


def presence_mask(given: dict[str, np.ndarray], present, names: list[str], batch: int) -> np.ndarray:
    """The bool ``[batch, M]`` mask of ``Pipeline.infer``'s ``present`` (modality -> bool ``[batch]``; a modality
    given and not named is present in every row)."""
    if not isinstance(present, dict):
        raise Refused(f"present must be a dict of modality name -> bool array of shape ({batch},), got "
                      f"{type(present).__name__}", MASK)
    unknown = sorted(map(repr, set(present) - set(names)))
    if unknown:
        raise Refused(f"present names unknown modality {', '.join(unknown)}", MASK)
    mask = np.zeros((batch, len(names)), bool)
    for i, name in enumerate(names):
        rows = present.get(name)
        if name not in given:
            if rows is not None and np.any(rows):
                raise Refused(f"present[{name!r}] marks rows present but no {name!r} input was given", MASK)
        elif rows is None:
            mask[:, i] = True
        elif type(rows) is not np.ndarray or rows.shape != (batch,) or rows.dtype != bool:
            raise Refused(f"present[{name!r}] must be a bool numpy array of shape ({batch},), got "
                          f"{getattr(rows, 'dtype', type(rows).__name__)} {list(np.shape(rows))}", MASK)
        else:
            mask[:, i] = rows
    return _no_empty_rows(mask)


@dataclass
class Request:
    """A checked request: the arrays of the modalities present in any of its rows, and its rows' presence."""

    arrays: dict[str, np.ndarray]
    mask: np.ndarray  # bool [rows, M], modalities in fusion order

    @property
    def rows(self) -> int:
        return len(self.mask)

    def patterns(self, names: list[str]) -> list[str]:
        """The presence pattern of each row (``audio+image``, ...)."""
        return [pattern_key(name for name, on in zip(names, row, strict=True) if on) for row in self.mask]


def check_request(arrays: dict[str, np.ndarray], specs: list[ModalitySpec], max_batch: int) -> Request:
    """One served request (input name -> array, ``present`` optional) as a ``Request``, or ``Refused``."""
    names = [spec.name for spec in specs]
    if PRESENT not in arrays:
        given, rows = check_inputs(arrays, specs, max_batch)
        return Request(given, np.tile(np.array([name in given for name in names]), (rows, 1)))
    inputs = {name: array for name, array in arrays.items() if name != PRESENT}
    _refuse_unknown(inputs, names)
    missing = [name for name in names if name not in inputs]
    if missing:
        raise Refused(f"with {PRESENT!r}, send every modality (zeros where absent); missing {', '.join(missing)}", MASK)
    rows = _same_rows({name: len(array) if np.ndim(array) else 0 for name, array in inputs.items()})
    mask = check_mask(np.asarray(arrays[PRESENT]).astype(bool), names, rows)
    present = {name: _zero_absent(inputs[name], mask[:, i]) for i, name in enumerate(names) if mask[:, i].any()}
    return Request(check_inputs(present, specs, max_batch)[0], mask)


def _zero_absent(array, rows: np.ndarray):
    """``array`` with the rows marked absent zeroed (they may hold anything, NaN included)."""
    if rows.all() or type(array) is not np.ndarray:  # check_array refuses a non-array with its own text
        return array
    return np.where(rows.reshape(-1, *[1] * (array.ndim - 1)), array, np.zeros((), array.dtype))


def check_fusion_presence(present: np.ndarray) -> None:
    """The fusion's float ``present [B, M]`` must say, per row, which modalities are present: 0 or 1 each, and at
    least one 1."""
    not_binary = ((present != 0) & (present != 1)).any(axis=1)
    if not_binary.any():
        raise Refused(f"input {PRESENT!r}: rows {_rows(not_binary)} hold values other than 0 and 1; mark each "
                      "modality 1 (present) or 0 (absent)", MASK)
    empty = ~(present == 1).any(axis=1)
    if empty.any():
        raise Refused(f"input {PRESENT!r}: rows {_rows(empty)} have no modality present; the fusion cannot predict "
                      "from nothing: mark at least one modality 1", NO_MODALITY)


def failed(error: Exception) -> Refused:
    """The refusal of a request the engines failed on."""
    return Refused(f"inference failed: {error}", FAILED)


def error_response(pb_utils, model_name: str, message: str, reason: str):
    """Triton's error response for one request: INVALID_ARG for a refused input, else Triton's default code."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if reason != FAILED else None
    text = f"{model_name}: {message}"
    error = pb_utils.TritonError(text, code) if code is not None else pb_utils.TritonError(text)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class EntryMetrics:
    """The entry model's counters; ``pb_utils`` is Triton's ``triton_python_backend_utils`` (only the stub has it).

    Each update of a Triton metric is a round trip from the Python stub to the server (measured here: about 90 us),
    so the counts are kept here and handed to Triton by a background thread every ``FLUSH_S`` seconds (and at
    ``close``): the endpoint lags the requests by at most that, and a request pays nothing for being counted."""

    FLUSH_S = 0.1

    def __init__(self, pb_utils):
        kind = pb_utils.MetricFamily.COUNTER
        self._families = {name: pb_utils.MetricFamily(name=name, description=text, kind=kind)
                          for name, text in METRIC_DESCRIPTIONS.items()}
        self._metrics: dict = {}
        self._pending: Counter = Counter()
        self._lock = threading.Lock()
        for name in (BATCHES, BATCH_ROWS):
            self._add(name, 0)
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_until_stopped, name="ume-metrics", daemon=True)
        self._flusher.start()

    def _add(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._pending[name, tuple(sorted(labels.items()))] += value  # type: ignore[assignment]  # typeshed: int

    def _flush_until_stopped(self) -> None:
        while not self._stop.wait(self.FLUSH_S):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, Counter()
        for (name, labels), value in pending.items():
            if (name, labels) not in self._metrics:
                self._metrics[name, labels] = self._families[name].Metric(labels=dict(labels))
            self._metrics[name, labels].increment(value)

    def close(self) -> None:
        self._stop.set()
        self._flusher.join()
        self.flush()

    def answered(self, patterns: list[str], duration_us: float) -> None:
        """One answered request whose rows have ``patterns``; the entry model took ``duration_us`` for its batch."""
        for pattern, rows in Counter(patterns).items():
            self._add(REQUESTS, 1, pattern=pattern)
            self._add(ROWS, rows, pattern=pattern)
            self._add(DURATION, duration_us, pattern=pattern)

    def rejected(self, reason: str) -> None:
        self._add(REJECTED, 1, reason=reason)

    def batch(self, rows: int) -> None:
        self._add(BATCHES, 1)
        self._add(BATCH_ROWS, rows)

"""Answering one batch of requests with one ``Pipeline.infer``: shared by the pipeline entry and PyTriton.

Each request is checked by ``contract.check_request`` (with ``present``, requests of every presence pattern have the
same inputs, so Triton's dynamic batcher puts them into one batch). The valid requests are stacked with per-row
presence masks, an absent row is never computed, and a request that cannot be answered gets a ``Rejected`` of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ume_edge.errors import InputError
from ume_edge.serving import contract
from ume_edge.serving.contract import FAILED, LABEL, LOGITS, PROBS, Request

LOGGER = logging.getLogger(__name__)


@dataclass
class Rejected:
    """A request that gets an error response instead of outputs, and why in one word (for metrics; ``FAILED`` when
    the engines failed on it rather than its input being refused)."""

    message: str
    reason: str  # one of contract.REASONS


def check_request(request: dict, pipeline) -> Request | Rejected:
    """``contract.check_request`` against ``pipeline``'s modalities, a refusal as a ``Rejected``."""
    try:
        return contract.check_request(request, pipeline.modalities, pipeline.max_batch)
    except contract.Refused as refused:
        return Rejected(str(refused), refused.reason)


def answer_requests(pipeline, requests: list[dict[str, np.ndarray]]) -> list[dict | Rejected]:
    """Outputs (or the reason for refusing) for each request of one batch, with one ``Pipeline.infer`` call.
    If the stack fails (a value problem such as NaN, or the engines failing on some rows), each request is answered
    alone so the error lands on the request that caused it."""
    return answer_checked(pipeline, [check_request(r, pipeline) for r in requests])


def answer_checked(pipeline, checked: list[Request | Rejected]) -> list[dict | Rejected]:
    answers: list = list(checked)
    valid = [i for i, item in enumerate(checked) if isinstance(item, Request)]
    requests = [item for item in checked if isinstance(item, Request)]
    for index, answer in zip(valid, _answer_valid(pipeline, requests), strict=True):
        answers[index] = answer
    return answers


def _answer_valid(pipeline, batch: list[Request]) -> Sequence[dict | Rejected]:
    if not batch:
        return []
    try:
        return _infer_stacked(pipeline, batch)
    except Exception as error:  # whatever failed, only the request that caused it may get the error
        if len(batch) == 1:
            return [_rejection(error)]
        if not isinstance(error, InputError):
            LOGGER.warning("a batch of %d requests failed; answering each alone", len(batch), exc_info=True)
        return [_answer_alone(lambda r=request: _infer_stacked(pipeline, [r])[0]) for request in batch]


def _answer_alone(infer) -> dict | Rejected:
    try:
        return infer()
    except Exception as error:  # its message goes to this request alone
        return _rejection(error)


def _rejection(error: Exception) -> Rejected:
    if isinstance(error, InputError):
        return Rejected(str(error), error.reason)
    return Rejected(str(contract.failed(error)), FAILED)


def _infer_stacked(pipeline, batch: list[Request]) -> list[dict]:
    bounds = np.cumsum([0] + [request.rows for request in batch])
    mask = np.concatenate([request.mask for request in batch])
    inputs: dict[str, np.ndarray | None] = {}
    present: dict[str, np.ndarray] = {}
    for i, name in enumerate(pipeline.modality_names):
        if not mask[:, i].any():
            inputs[name] = None  # absent from the whole batch: its encoder does not run
            continue
        inputs[name] = _stack(name, batch, bounds)
        present[name] = mask[:, i]
    result = pipeline.infer(inputs, present=present)
    labels = result.labels.astype(np.int64).reshape(-1, 1)
    return [{LOGITS: result.logits[a:b], PROBS: result.probs[a:b], LABEL: labels[a:b]}
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _stack(name: str, batch: list[Request], bounds: np.ndarray) -> np.ndarray:
    """The modality's rows at their batch positions; rows of requests without it stay zero (and masked out)."""
    holders = [i for i, request in enumerate(batch) if name in request.arrays]
    if len(holders) == len(batch):
        return batch[0].arrays[name] if len(batch) == 1 else np.concatenate([r.arrays[name] for r in batch])
    first = batch[holders[0]].arrays[name]
    stacked = np.zeros((bounds[-1], *first.shape[1:]), first.dtype)
    for i in holders:
        stacked[bounds[i]:bounds[i + 1]] = batch[i].arrays[name]
    return stacked


def answer_encoder_requests(engine, name: str, output_name: str, arrays: list[np.ndarray]) -> list[dict | Rejected]:
    """One modality's engine output for each request, in one call when they all succeed; otherwise (the engine
    refused or failed on some values) each request alone, so only the culprit gets the error."""
    try:
        output = engine.infer({name: np.concatenate(arrays)})[output_name]
    except Exception as error:  # answered below, request by request
        if len(arrays) == 1:
            return [_rejection(error)]
        if not isinstance(error, InputError):
            LOGGER.warning("a batch of %d %r requests failed; answering each alone", len(arrays), name, exc_info=True)
        return [_answer_alone(lambda a=array: {output_name: engine.infer({name: a})[output_name]}) for array in arrays]
    bounds = np.cumsum([0] + [len(array) for array in arrays])
    return [{output_name: output[a:b]} for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

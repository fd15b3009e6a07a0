"""``DevicePipeline``: an engine directory's plans on one GPU, with the partial logits kept there."""

from __future__ import annotations

import numpy as np

from ume_edge.backends.tensorrt import api
from ume_edge.backends.tensorrt.engine import DeviceTensor, TensorRTEngine
from ume_edge.constants import LOGITS, PARTIAL_LOGITS, PRESENT, PROBS
from ume_edge.errors import EngineMismatch, refusals_as_input_errors
from ume_edge.serving import contract


def present_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of consecutive present rows: ``[1, 1, 0, 1]`` -> ``[(0, 2), (3, 4)]``."""
    edges = np.diff(np.concatenate(([0], np.asarray(rows, np.int8), [0])))
    return [(int(a), int(b)) for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True)]


class DevicePipeline:
    """``Pipeline.infer`` on one GPU with the partial logits kept there. Only the present rows of each modality go
    through its encoder; strided device-to-device copies place the encoder's ``partial_logits [rows, C]`` at
    ``[row, i, :]`` of the fusion engine's own ``partial_logits [B, M, C]`` input buffer (one 2D copy per run of
    consecutive present rows); the fusion engine runs; only ``logits`` and ``probs`` come back to the host.

    Each engine keeps its own CUDA stream, so the encoders of different modalities may overlap on the GPU. An encoder
    queues its input copy, its run and its 2D copies on its stream and then records an event; the fusion stream waits
    for those events before it runs. ``infer`` ends by waiting for the fusion stream, which by then has waited for every
    encoder, so the next ``infer`` never overwrites a buffer still in use. The pipeline owns the engines: ``close``
    closes them.
    """

    def __init__(self, engines: dict[str, TensorRTEngine], fusion: TensorRTEngine, modality_order: list[str],
                 num_classes: int):
        self.engines, self.fusion = engines, fusion
        self.modality_order, self.num_classes = list(modality_order), int(num_classes)
        _check_pipeline_engines(engines, fusion, self.modality_order, self.num_classes)
        self._cudart = api.cudart()
        self._row_bytes = self.num_classes * np.dtype(np.float32).itemsize
        self._events = {}
        for name in self.modality_order:
            self._events[name] = api.call(self._cudart.cudaEventCreateWithFlags(self._cudart.cudaEventDisableTiming))

    def infer(self, given: dict[str, np.ndarray], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, probs)``, float32 ``[B, C]``, for presence ``mask`` (bool ``[B, M]``, ``modality_order``) and
        ``given[name]``, the full-batch host input of every modality with at least one present row."""
        mask = self._check(given, mask)
        encoded = {name: self._encode(i, given[name], mask[:, i]) for i, name in enumerate(self.modality_order)
                   if mask[:, i].any()}  # the host inputs stay referenced until the final wait
        for name in encoded:
            api.call(self._cudart.cudaStreamWaitEvent(self.fusion.stream, self._events[name], 0))
        present = mask.astype(np.float32)
        feeds: dict[str, np.ndarray | DeviceTensor] = {
            PARTIAL_LOGITS: self.fusion.input_tensor(PARTIAL_LOGITS, len(mask)), PRESENT: present}
        outputs = self.fusion.enqueue(feeds)
        fused = self.fusion.download({LOGITS: outputs[LOGITS], PROBS: outputs[PROBS]})
        return fused[LOGITS], fused[PROBS]

    def _encode(self, index: int, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Queue modality ``index``'s encoder on its present rows and the copies of its partial logits into place."""
        name = self.modality_order[index]
        engine = self.engines[name]
        x = np.ascontiguousarray(x if rows.all() else x[rows], dtype=engine.dtypes[name])
        partial = engine.enqueue({name: x})[PARTIAL_LOGITS]
        self._scatter(partial.pointer, index, rows, engine.stream)
        api.call(self._cudart.cudaEventRecord(self._events[name], engine.stream))
        return x

    def _scatter(self, source: int, index: int, rows: np.ndarray, stream) -> None:
        """Copy compact ``[rows, C]`` partial logits at ``source`` to ``[row, index, :]`` of the fusion input."""
        pitch = len(self.modality_order) * self._row_bytes
        destination = self.fusion.input_tensor(PARTIAL_LOGITS, len(rows)).pointer + index * self._row_bytes
        done = 0
        for start, stop in present_runs(rows):
            api.call(self._cudart.cudaMemcpy2DAsync(destination + start * pitch, pitch,
                                                 source + done * self._row_bytes, self._row_bytes,
                                                 self._row_bytes, stop - start,
                                                 self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream))
            done += stop - start

    def _check(self, given: dict[str, np.ndarray], mask) -> np.ndarray:
        with refusals_as_input_errors():
            mask = contract.check_mask(mask, self.modality_order, what="mask")
            contract.check_present_rows_given(given, mask, self.modality_order)
        return mask

    def close(self) -> None:
        """Close the engines (each waits for its stream first) and free the events; safe to call twice."""
        for engine in [*self.engines.values(), self.fusion]:
            engine.close()
        for event in self._events.values():
            api.call(self._cudart.cudaEventDestroy(event))
        self._events = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _check_pipeline_engines(engines: dict, fusion: TensorRTEngine, order: list[str], num_classes: int) -> None:
    """Refuse engines whose tensors do not fit ENGINE_FORMAT.md (names, per-sample shapes, float32 partial logits)."""
    problems = [f"no engine for modality {name!r}" for name in order if name not in engines]
    problems += [p for name in order if name in engines for p in _encoder_problems(name, engines[name], num_classes)]
    problems += _fusion_problems(fusion, len(order), num_classes)
    if problems:
        raise EngineMismatch("these engines do not form a pipeline: " + "; ".join(problems))


def _encoder_problems(name: str, engine: TensorRTEngine, num_classes: int) -> list[str]:
    if engine.input_names != [name] or PARTIAL_LOGITS not in engine.output_names:
        return [f"{engine.path.name} has inputs {engine.input_names} and outputs {engine.output_names}; expected "
                f"input {name!r} and output 'partial_logits'"]
    shape, dtype = engine.max_shapes[PARTIAL_LOGITS], engine.dtypes[PARTIAL_LOGITS]
    if shape[1:] != (num_classes,) or dtype != np.float32:
        return [f"{engine.path.name} gives partial_logits {dtype} {list(shape)}, "
                f"expected float32 [batch, {num_classes}]"]
    return []


def _fusion_problems(fusion: TensorRTEngine, num_modalities: int, num_classes: int) -> list[str]:
    expected = {PARTIAL_LOGITS: (num_modalities, num_classes), PRESENT: (num_modalities,)}
    found = {n: fusion.max_shapes[n][1:] for n in fusion.input_names}
    if found != expected or not {LOGITS, PROBS} <= set(fusion.output_names):
        return [f"{fusion.path.name} has inputs {found} and outputs {fusion.output_names}; expected inputs "
                f"{expected} (per sample) and outputs logits and probs"]
    if fusion.dtypes[PARTIAL_LOGITS] != np.float32:
        return [f"{fusion.path.name} takes partial_logits as {fusion.dtypes['partial_logits']}, expected float32"]
    return []

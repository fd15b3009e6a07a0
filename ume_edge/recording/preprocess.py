"""A user's preprocessing per modality (``--preprocess MODALITY=module:function``) and the check that what reaches
the engine is what it takes.

The function is named as ``package.module:function`` (imported) or ``path/to/file.py:function`` (loaded from that
file). It is called with the decoded array (``ume_edge.recording.decoders``), or with the message itself when no
decoder handles its type, and returns the engine's input for one sample (no batch axis), e.g. PCM to log-mel.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ume_edge.recording import decoders
from ume_edge.recording.reader import RecordingError
from ume_edge.user_code import load_file

Preprocess = Callable[[Any], np.ndarray]


def load_preprocess(modality: str, spec: str) -> Preprocess:
    """The function ``spec`` names; one line when it cannot be loaded."""
    location, _, name = spec.rpartition(":")
    if not location or not name:
        raise RecordingError(f"--preprocess {modality}={spec}: expected module:function or file.py:function")
    try:
        module = (load_file(Path(location), f"ume_user_preprocess_{Path(location).stem}") if location.endswith(".py")
                  else importlib.import_module(location))
        found = functools.reduce(getattr, name.split("."), module)
    except (ImportError, AttributeError, FileNotFoundError, SyntaxError) as error:
        raise RecordingError(f"--preprocess {modality}={spec}: cannot be loaded ({type(error).__name__}: "
                             f"{error})") from None
    if not callable(found):
        raise RecordingError(f"--preprocess {modality}={spec}: {name} is a {type(found).__name__}, not a function")
    return found


def engine_reading(modality: str, message: Any, msgtype: str, audio_format: decoders.AudioFormat | None,
                   spec: str | None, function: Preprocess | None) -> np.ndarray:
    """One message as the engine's input for one sample: decoded, then given to the ``--preprocess`` function when
    there is one (the message itself, when no decoder handles its type). The recording replay and the ROS 2 node
    both read sensors through this."""
    if function is None or spec is None:
        return decoders.decode(message, msgtype, audio_format)
    reading = decoders.decode(message, msgtype, audio_format) if msgtype in decoders.supported_types() else message
    return apply(modality, spec, function, reading)


def apply(modality: str, spec: str, function: Preprocess, reading: Any) -> np.ndarray:
    """The function's result as an array; one line naming the modality when it raises."""
    try:
        return np.asarray(function(reading))
    except Exception as error:  # the user's code can raise anything; name it, the modality and the cause
        raise RecordingError(f"--preprocess {modality}={spec} failed ({type(error).__name__}: {error})") from None


def check_input(modality: str, array: np.ndarray, shape: list[int], dtype: np.dtype, preprocessed: bool) -> None:
    """One line when ``array`` is not one sample of the engine input ``shape`` (batch axis first) and ``dtype``."""
    wanted = tuple(shape[1:])
    fits = len(wanted) == array.ndim and all(size in (-1, got) for size, got in zip(wanted, array.shape, strict=True))
    if fits and array.dtype == dtype:
        return
    source = "the --preprocess function returned" if preprocessed else "the decoded reading is"
    hint = "" if preprocessed else f"; convert it with --preprocess {modality}=module:function"
    raise RecordingError(f"{modality}: the engine takes {np.dtype(dtype).name} {list(wanted)} per sample but {source} "
                         f"{array.dtype.name} {list(array.shape)}{hint}")

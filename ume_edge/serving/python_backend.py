"""``serve --runtime python-backend`` (the default): Triton Python-backend models on the ``tritonserver`` that the
nvidia-pytriton wheel ships. For an engine directory the models are generated (``--entry pipeline`` and Python
encoders); ``serve --repository DIR`` serves a repository written by ``python -m ume_edge.triton_repo`` instead.

The bundled server has only the python backend, so a repository's ``onnxruntime_onnx`` models are served as Python
models that run the same ``model.onnx`` with ONNX Runtime (the configs keep their names, inputs, outputs and
batching); TensorRT models need a Triton with the TensorRT backend, on the GPU machine itself.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

from ume_edge.serving.repository import ONNX_TEMPLATE, RepositoryError, python_model_files, write_repository
from ume_edge.serving.tritonserver import TritonServer, make_temp_folder

LOGGER = logging.getLogger(__name__)

# What a Triton config names (its platform, or its backend), as the kind of model file it serves.
TRITON_MODEL_FILES = {"onnxruntime_onnx": "onnx", "onnxruntime": "onnx", "tensorrt_plan": "plan", "tensorrt": "plan"}


def _read_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as error:
        raise RepositoryError(f"{path}: not a Triton model configuration ({error})") from None
    except OSError as error:
        raise RepositoryError(f"{path}: cannot be read ({error.strerror}); it must be a Triton model configuration "
                              "file") from None


def _write_config(path: Path, config) -> None:
    from google.protobuf import text_format

    path.write_text(text_format.MessageToString(config))


def servable_copy(repository: Path, target: Path) -> list[str]:
    """Copy ``repository`` into ``target`` with its ONNX Runtime models turned into Python models; the model names.
    Refuses (one line) what the bundled tritonserver cannot serve."""
    configs = sorted(repository.glob("*/config.pbtxt"))
    if not configs:
        raise RepositoryError(f"{repository} holds no model (no <model>/config.pbtxt); write one with "
                              "python -m ume_edge.triton_repo --out DIR")
    shutil.copytree(repository, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sh"))
    for path in configs:
        config = _read_config(path)
        kind = TRITON_MODEL_FILES.get(config.platform) or TRITON_MODEL_FILES.get(config.backend)
        if kind == "plan":
            raise RepositoryError(f"{path.parent.name} is a TensorRT model: the tritonserver bundled here has only "
                                  "the python backend. Serve this repository on the GPU machine with tritonserver "
                                  f"--model-repository={repository.resolve()}")
        if kind == "onnx":
            _as_python_model(target / path.parent.name, config)
    return [path.parent.name for path in configs]


def _as_python_model(model_dir: Path, config) -> None:
    config.ClearField("platform")
    config.backend = "python"
    for version in [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]:
        if not (version / "model.onnx").is_file():
            raise RepositoryError(f"{version} has no model.onnx to serve")
        for target, source in python_model_files(ONNX_TEMPLATE, version.name).items():
            shutil.copyfile(source, model_dir / target)
    _write_config(model_dir / "config.pbtxt", config)


def serve(options, stop: threading.Event, watchdog, announce) -> int:
    """Serve ``options.engines`` (or ``options.repository``) until ``stop`` is set; 0 on a clean stop."""
    folder = make_temp_folder("models")
    watchdog.watch_path(folder)
    try:
        if options.repository is not None:
            models = servable_copy(options.repository, folder / "repository")
        else:
            written = write_repository(options.engines, folder / "repository", encoder_backend="python",
                                       entry="pipeline", max_queue_delay_us=options.server.max_queue_delay_us,
                                       threads=options.threads)
            models = [path.name for path in written]
        server = TritonServer(folder / "repository", options.server, echo=options.verbose,
                              log_path=options.log_file or folder / "tritonserver.log", keep_log=True)
        with server:
            watchdog.watch_tree(server.child.pid)
            announce(models, server.log_path)
            while not stop.wait(0.5):
                if server.child.poll() is not None:
                    LOGGER.error("error: tritonserver exited (%s):\n%s", server.child.returncode, server.log_tail())
                    return 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0

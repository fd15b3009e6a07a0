"""TensorRT on an NVIDIA GPU or Jetson: S8S8 Q/DQ (or fp16, fp32) ONNX -> one plan per modality and one for the fusion.

Written to the documented TensorRT 10.x / 11.x Python API and cuda-python's runtime bindings, both imported only when
called (``api``), so this package imports on any machine. ``--export-only`` writes the TensorRT-ready ONNX files and
one trtexec script per TensorRT major version instead of plans; ``python -m ume_edge.build --adopt DIR`` then turns
the plans those scripts made on the target into an engine directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ume_edge.backends.base import DEFAULT_OPEN_OPTIONS, Backend, CompiledFiles, CompileJob, OpenOptions, TritonModel
from ume_edge.backends.onnxruntime import device_info as cpu_device_info
from ume_edge.backends.tensorrt import api
from ume_edge.backends.tensorrt.compat import check_plan_compatible, dla_problem
from ume_edge.backends.tensorrt.config import BuildConfig, build_engine
from ume_edge.backends.tensorrt.engine import TensorRTEngine
from ume_edge.backends.tensorrt.options import TensorRTOptions
from ume_edge.backends.tensorrt.pipeline import DevicePipeline
from ume_edge.backends.tensorrt.trtexec import MAJOR_RELEASES, PlanJob, script
from ume_edge.constants import PARTIAL_LOGITS, PRESENT
from ume_edge.engine_dir import Manifest, ModalityRecord
from ume_edge.engine_dir.schema import engine_file
from ume_edge.errors import BuildError, EngineMismatch

FOLDER = "tensorrt"
TIMING_CACHE_ON_TARGET = "timing.cache"


def script_name(major: int) -> str:
    return f"build_plans_trt{major}.sh"


def plan_config(settings: dict, precision: str, max_batch: int, on_gpu: bool = False,
                timing_cache=None) -> BuildConfig:
    """The configuration of one plan from a build's TensorRT settings; the fusion stays on the GPU (no DLA)."""
    config = BuildConfig(precision=precision, max_batch=max_batch, workspace_mb=settings["workspace_mb"],
                         timing_cache=timing_cache, dla_core=None if on_gpu else settings["dla_core"],
                         hardware_compatible=settings["hardware_compatible"],
                         version_compatible=settings["version_compatible"])
    config.validate()
    return config


class TensorRTBackend(Backend[TensorRTOptions]):
    name = "tensorrt"
    options_type = TensorRTOptions
    precisions = ("fp32", "fp16", "int8")
    int8_format = "S8S8"
    fallback_precision = "fp16"
    enforces_tensorrt_rules = True
    can_export_only = True

    def unavailable_reason(self) -> str | None:
        return api.unavailable_reason()

    def version(self) -> str | None:
        return api.version()

    def device(self) -> dict:
        return api.device_info()

    @staticmethod
    def settings(options: TensorRTOptions) -> dict:
        return {"workspace_mb": options.workspace_mb, "dla_core": options.dla_core,
                "timing_cache": str(options.timing_cache) if options.timing_cache else None,
                "hardware_compatible": options.hardware_compatible, "version_compatible": options.version_compatible}

    def check_build_options(self, options: TensorRTOptions, precision: str, max_batch: int, export_only: bool) -> None:
        settings = self.settings(options)
        precisions = {precision} | ({self.fallback_precision} if precision == "int8" else set())
        for each in precisions:
            plan_config(settings, each, max_batch)
        plan_config(settings, "fp32", max_batch, on_gpu=True)
        here = api.version()
        if options.dla_core is not None and not export_only and here and (problem := dla_problem(here)):
            raise BuildError(problem)

    def target_onnx(self, candidate: Any) -> Path:
        return candidate.tensorrt_file

    def _jobs(self, job: CompileJob[TensorRTOptions], settings: dict, on_target: bool) -> dict[str, PlanJob]:
        timing_cache = TIMING_CACHE_ON_TARGET if on_target and settings["timing_cache"] else settings["timing_cache"]
        max_batch, shapes = job.max_batch, job.input_shapes
        jobs = {"fusion": PlanJob(f"{FOLDER}/fusion.onnx", "fusion.plan",
                                  {PARTIAL_LOGITS: (job.num_modalities, job.num_classes),
                                   PRESENT: (job.num_modalities,)},
                                  plan_config(settings, "fp32", max_batch, on_gpu=True, timing_cache=timing_cache))}
        for name, candidate in job.chosen.items():
            jobs[name] = PlanJob(f"{FOLDER}/{name}.onnx", f"{name}.plan", {name: shapes[name]},
                                 plan_config(settings, candidate.precision, max_batch, timing_cache=timing_cache))
        return jobs

    def compile(self, job: CompileJob[TensorRTOptions]) -> CompiledFiles:
        (job.staging / FOLDER).mkdir()
        settings = self.settings(job.options)
        onnx = {"fusion": Path(shutil.copyfile(job.fusion_onnx, job.staging / FOLDER / "fusion.onnx"))}
        calibration = {}
        for name, candidate in job.chosen.items():
            onnx[name] = Path(shutil.copyfile(candidate.tensorrt_file, job.staging / FOLDER / f"{name}.onnx"))
            if candidate.calibration_cache:
                calibration[name] = Path(shutil.copyfile(candidate.calibration_cache,
                                                         job.staging / FOLDER / f"{name}.calibration.json"))
        scripts = self._write_scripts(job.staging, list(self._jobs(job, settings, on_target=True).values()))
        compiled = CompiledFiles(engines=dict.fromkeys(onnx), onnx=onnx, calibration=calibration, scripts=scripts,
                                 settings=settings)
        plan_jobs = self._jobs(job, settings, on_target=False)
        if job.export_only:
            compiled.made_on_target = [j.plan for j in plan_jobs.values()]
            compiled.made_on_target += [TIMING_CACHE_ON_TARGET] if settings["timing_cache"] else []
            compiled.device = {"kind": "gpu", "built": False, "exported_on": cpu_device_info(),
                               **{k: settings[k] for k in ("dla_core", "hardware_compatible", "version_compatible")}}
            return compiled
        for key, plan_job in plan_jobs.items():
            compiled.device = build_engine(job.staging / plan_job.onnx, job.staging / plan_job.plan, plan_job.inputs,
                                           plan_job.config)
            compiled.engines[key] = job.staging / plan_job.plan
        return compiled

    @staticmethod
    def _write_scripts(folder: Path, jobs: list[PlanJob]) -> dict[str, Path]:
        written = {}
        for major in MAJOR_RELEASES:
            path = folder / script_name(major)
            path.write_text(script(jobs, major, "Then: python -m ume_edge.build --adopt $PWD"))
            path.chmod(0o755)
            written[path.name] = path
        return written

    def target_build_scripts(self, manifest: Manifest, targets: dict[str, tuple[str, str]]) -> dict[str, str]:
        """Scripts that build each ``targets[key] = (onnx, plan)`` (``key``: a modality or "fusion") on the target,
        one per TensorRT major, with the directory's settings."""
        settings, max_batch = manifest.backend_settings, manifest.max_batch
        jobs = []
        for key, (onnx, plan) in targets.items():
            if key == "fusion":
                inputs = {PARTIAL_LOGITS: (len(manifest.modalities), manifest.model.num_classes),
                          PRESENT: (len(manifest.modalities),)}
                config = plan_config(settings, "fp32", max_batch, on_gpu=True)
            else:
                modality = manifest.modality(key)
                inputs, config = {key: tuple(modality.shape)}, plan_config(settings, modality.precision, max_batch)
            jobs.append(PlanJob(onnx, plan, inputs, config))
        return {script_name(major): script(jobs, major, "Then start tritonserver on this repository.")
                for major in MAJOR_RELEASES}

    def adopt_engines(self, directory: Path, manifest: Manifest) -> tuple[dict[str, Path], dict]:
        plans = {m.name: directory / f"{m.name}.plan" for m in manifest.modalities}
        plans["fusion"] = directory / "fusion.plan"
        device = {**api.device_info(), **{k: manifest.device.get(k) for k in ("dla_core", "hardware_compatible",
                                                                               "version_compatible")}}
        if device["dla_core"] is not None and (problem := dla_problem(device["tensorrt"])):
            raise BuildError(problem)
        pipeline = self._open_plans(plans, manifest, OpenOptions(), device)
        pipeline.close()
        return plans, device

    def check_compatible(self, manifest: Manifest, options: OpenOptions = DEFAULT_OPEN_OPTIONS) -> None:
        api.require()
        check_plan_compatible(manifest.device, api.device_info(options.device_id))

    def open_engine(self, path: Path, options: OpenOptions, device: dict | None = None) -> TensorRTEngine:
        device = device or {}
        return TensorRTEngine(path, options.device_id, options.cuda_graph_batch_sizes,
                              version_compatible=bool(device.get("version_compatible")),
                              dla_core=device.get("dla_core"))

    def open(self, directory: Path, manifest: Manifest, options: OpenOptions) -> DevicePipeline:
        plans = {m.name: directory / engine_file(m).path for m in manifest.modalities}
        return self._open_plans(plans | {"fusion": directory / engine_file(manifest.fusion).path}, manifest, options,
                                manifest.device)

    def _open_plans(self, plans: dict[str, Path], manifest: Manifest, options: OpenOptions,
                    device: dict) -> DevicePipeline:
        opened = []
        try:
            engines = {}
            for m in manifest.modalities:
                engines[m.name] = self.open_engine(plans[m.name], options, device)
                opened.append(engines[m.name])
                _check_input(engines[m.name], m)
            fusion = self.open_engine(plans["fusion"], options, device)
            opened.append(fusion)
            return DevicePipeline(engines, fusion, manifest.fusion.modality_order, manifest.model.num_classes)
        except BaseException:
            for engine in opened:
                engine.close()
            raise

    def triton_model(self, manifest: Manifest, modality: str | None) -> TritonModel:
        dla_core = manifest.device.get("dla_core")
        secondary = ({"kind": "KIND_NVDLA", "device_id": dla_core},) if modality and dla_core is not None else ()
        return TritonModel(platform="tensorrt_plan", file_name="model.plan", instance_kind="KIND_GPU",
                           secondary_devices=secondary)


def _check_input(engine: TensorRTEngine, modality: ModalityRecord) -> None:
    shape, dtype = tuple(engine.max_shapes.get(modality.name, ())[1:]), engine.dtypes.get(modality.name)
    if shape != tuple(modality.shape) or str(dtype) != modality.dtype:
        raise EngineMismatch(f"{engine.path.name} takes {modality.name!r} as {dtype} {list(shape)}, but the manifest "
                             f"says {modality.dtype} {modality.shape}: the plan does not belong to this directory")


BACKEND = TensorRTBackend()

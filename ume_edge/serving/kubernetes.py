"""Kubernetes manifests for a Triton model repository that ``triton_repo`` wrote: a KServe InferenceService, or plain
objects for clusters without KServe, and a Dockerfile when the stock image cannot load the repository.

Three files and no more, so that one ``kubectl apply -f`` never mixes the two routes:

- ``kserve.yaml``: the InferenceService (``kserve-tritonserver`` runtime, gRPC on 9000 as that runtime configures it);
- ``plain.yaml``: Deployment, Service, headless Service, ServiceMonitor, HorizontalPodAutoscaler, PodDisruptionBudget;
- ``Dockerfile``: only for the pipeline entry or Python-backend encoders, which import more than NumPy.

Every document is JSON, which is valid YAML, so no YAML library is needed. The image is pinned: a TensorRT
directory gets the NGC release whose TensorRT built its plans (``ngc_releases``), any other the default release, and
both routes run the same image. The files are written the way the repository's models are: what is in the way and
was not written by ume-edge is refused before anything is written, and the set is swapped in as a whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ume_edge import __version__, engine_dir
from ume_edge.constants import ENTRY_MODEL, FUSION_MODEL, encoder_model_name
from ume_edge.serving import ngc_releases
from ume_edge.serving.repository_swap import SCRIPT_WRITTEN_BY, RepositoryError, prepare_out, write_and_swap_in

KSERVE_FILE, PLAIN_FILE, DOCKERFILE = "kserve.yaml", "plain.yaml", "Dockerfile"
HEADER = f"# {SCRIPT_WRITTEN_BY} (python -m ume_edge.triton_repo --kubernetes); the next run replaces this file.\n"
DEFAULT_CLAIM = "ume-models"
CONTAINER_REPOSITORY = "/models"
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
KSERVE_GRPC_PORT = 9000  # the kserve-tritonserver runtime starts tritonserver with --grpc-port=9000
SHM_SIZE = "1Gi"  # the Python backend passes tensors through /dev/shm; a container runtime gives 64 MB by default
QUEUE_METRIC = "ume_queue_us_per_request"  # served by prometheus-adapter (the rule is in docs/deploy.md)
QUEUE_TARGET_US = "1000"
MAX_REPLICAS_FACTOR = 4
PIP_REQUIREMENTS = {"python": ("numpy>=1.24,<2", "onnxruntime>=1.17"), "pipeline": (f"ume-edge=={__version__}",)}


class KubernetesError(RepositoryError):
    """Manifests that cannot be written as asked; the message says why and what to do."""


@dataclass(frozen=True)
class KubernetesOptions:
    storage_uri: str | None = None  # s3://, gs:// or pvc://CLAIM/PATH at the repository root
    image: str | None = None  # overrides the NGC image; required when a Dockerfile is written
    replicas: int = 1
    name: str = "ume"


@dataclass(frozen=True)
class ManifestPlan:
    """Everything the manifests are made from, decided before anything is written."""
    name: str
    image: str
    tag: str
    base_image: str
    storage_uri: str
    replicas: int
    gpu: bool
    server_args: tuple[str, ...]
    pip: tuple[str, ...]


def needs_dockerfile(entry: str, encoder_backend: str) -> bool:
    """Whether the stock image cannot load the repository: the pipeline entry imports ume-edge, and Python-backend
    encoders import ONNX Runtime; the BLS entry and the ONNX Runtime or TensorRT backends need nothing more."""
    return entry == "pipeline" or encoder_backend == "python"


def _release(manifest: engine_dir.Manifest) -> ngc_releases.NgcRelease:
    version = manifest.device.get("tensorrt")
    if manifest.backend == "tensorrt" and version:
        return ngc_releases.release_for_tensorrt(str(version))
    return ngc_releases.DEFAULT_RELEASE  # ONNX Runtime, or plans not built yet (built on the target, with its TensorRT)


def _image_tag(image: str) -> str:
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag or tag in ("", "latest"):
        raise KubernetesError(f"--image {image} has no pinned tag; name one (REGISTRY/NAME:TAG, not :latest) so "
                              "that every replica runs the same image")
    return tag


def _check_storage_uri(uri: str, model_names: list[str]) -> str:
    scheme, separator, path = uri.partition("://")
    if not separator or scheme not in ("s3", "gs", "pvc") or not path.strip("/"):
        raise KubernetesError(f"--storage-uri {uri}: give s3://BUCKET/PATH, gs://BUCKET/PATH or pvc://CLAIM/PATH, "
                              "the folder that holds the repository's model folders")
    parts = path.strip("/").split("/")
    if parts[-1] in model_names or parts[-1].isdigit() or parts[-1] == "config.pbtxt":
        raise KubernetesError(f"--storage-uri {uri} points inside the repository (at {parts[-1]}); give the "
                              "repository's root, the folder that holds " + ", ".join(model_names))
    return uri.rstrip("/")


def plan(manifest: engine_dir.Manifest, entry: str, encoder_backend: str, repository_name: str,
         options: KubernetesOptions) -> ManifestPlan:
    """Decide image, storage and resources; refuse what cannot work, before anything is written."""
    model_names = [ENTRY_MODEL, FUSION_MODEL, *(encoder_model_name(name) for name in manifest.modality_names)]
    if options.replicas < 1:
        raise KubernetesError(f"--replicas must be at least 1, got {options.replicas}")
    dockerfile = needs_dockerfile(entry, encoder_backend)
    if dockerfile and options.image is None:
        raise KubernetesError(f"the {'pipeline entry' if entry == 'pipeline' else 'Python-backend encoders'} need "
                              "more than the stock tritonserver image: pass --image REGISTRY/NAME:TAG, the image "
                              "you will build from the Dockerfile written beside the manifests and push")
    release = _release(manifest)
    image = options.image or release.image
    storage = _check_storage_uri(options.storage_uri or f"pvc://{DEFAULT_CLAIM}/{repository_name}", model_names)
    server_args: tuple[str, ...] = ("tritonserver", f"--model-repository={_server_repository(storage)}")
    if manifest.device.get("version_compatible"):
        server_args += ("--backend-config=tensorrt,version-compatible=true",)
    pip = PIP_REQUIREMENTS["pipeline"] if entry == "pipeline" else PIP_REQUIREMENTS["python"] if dockerfile else ()
    return ManifestPlan(name=options.name, image=image, tag=_image_tag(image), base_image=release.image,
                 storage_uri=storage, replicas=options.replicas, gpu=manifest.backend == "tensorrt",
                 server_args=server_args, pip=pip)


def _server_repository(storage_uri: str) -> str:
    """Where tritonserver in the plain Deployment reads the repository: s3/gs directly, a PVC mounted."""
    return CONTAINER_REPOSITORY if storage_uri.startswith("pvc://") else storage_uri


def _resources(gpu: bool) -> dict:
    limits = {"cpu": "2", "memory": "4Gi", **({"nvidia.com/gpu": "1"} if gpu else {})}
    return {"requests": {"cpu": "1", "memory": "2Gi", **({"nvidia.com/gpu": "1"} if gpu else {})}, "limits": limits}


def _shm_volume() -> dict:
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}}


def _labels(plan_: ManifestPlan, component: str | None = None) -> dict:
    labels = {"app.kubernetes.io/name": plan_.name, "app.kubernetes.io/managed-by": "ume-edge"}
    return {**labels, "app.kubernetes.io/component": component} if component else labels


def inference_service(plan_: ManifestPlan) -> dict:
    model = {
        "modelFormat": {"name": "triton"},
        "protocolVersion": "v2",
        "runtime": "kserve-tritonserver",
        "runtimeVersion": plan_.tag,
        "storageUri": plan_.storage_uri,
        "ports": [{"name": "h2c", "containerPort": KSERVE_GRPC_PORT, "protocol": "TCP"}],
        "resources": _resources(plan_.gpu),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if plan_.image != plan_.base_image:
        model["image"] = plan_.image
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": plan_.name, "labels": _labels(plan_)},
            "spec": {"predictor": {"minReplicas": plan_.replicas, "volumes": [_shm_volume()], "model": model}}}


def _probe(path: str, period_s: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period_s, "failureThreshold": failures}


def deployment(plan_: ManifestPlan) -> dict:
    volumes: list[dict] = [_shm_volume()]
    mounts: list[dict] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if plan_.storage_uri.startswith("pvc://"):
        claim, _, sub_path = plan_.storage_uri.removeprefix("pvc://").partition("/")
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "models", "mountPath": CONTAINER_REPOSITORY, "subPath": sub_path, "readOnly": True})
    container = {
        "name": "tritonserver",
        "image": plan_.image,
        "args": [*plan_.server_args, f"--http-port={HTTP_PORT}", f"--grpc-port={GRPC_PORT}",
                 f"--metrics-port={METRICS_PORT}"],
        "ports": [{"name": "http", "containerPort": HTTP_PORT}, {"name": "grpc", "containerPort": GRPC_PORT},
                  {"name": "metrics", "containerPort": METRICS_PORT}],
        "startupProbe": _probe("/v2/health/ready", 10, 30),  # up to 5 minutes to load the models
        "readinessProbe": _probe("/v2/health/ready", 5, 3),
        "livenessProbe": _probe("/v2/health/live", 10, 3),
        "resources": _resources(plan_.gpu),
        "volumeMounts": mounts,
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": plan_.name, "labels": _labels(plan_, "server")},
            "spec": {"replicas": plan_.replicas, "selector": {"matchLabels": _labels(plan_)},
                     "template": {"metadata": {"labels": _labels(plan_)},
                                  "spec": {"containers": [container], "volumes": volumes}}}}


def _service_ports() -> list[dict]:
    return [{"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
            for name, port in (("http", HTTP_PORT), ("grpc", GRPC_PORT), ("metrics", METRICS_PORT))]


def service(plan_: ManifestPlan, headless: bool) -> dict:
    spec: dict = {"selector": _labels(plan_), "ports": _service_ports()}
    if headless:
        spec["clusterIP"] = "None"  # one DNS record per ready pod, for client-side round_robin
    name, component = (f"{plan_.name}-headless", "headless") if headless else (plan_.name, "server")
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "labels": _labels(plan_, component)}, "spec": spec}


def service_monitor(plan_: ManifestPlan) -> dict:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": {"name": plan_.name, "labels": _labels(plan_)},
            "spec": {"selector": {"matchLabels": _labels(plan_, "server")},  # not the headless one: no double scrape
                     "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}]}}


def autoscaler(plan_: ManifestPlan) -> dict:
    metric = {"type": "Pods", "pods": {"metric": {"name": QUEUE_METRIC},
                                       "target": {"type": "AverageValue", "averageValue": QUEUE_TARGET_US}}}
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": plan_.name, "labels": _labels(plan_)},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": plan_.name},
                     "minReplicas": plan_.replicas, "maxReplicas": plan_.replicas * MAX_REPLICAS_FACTOR,
                     "metrics": [metric]}}


def disruption_budget(plan_: ManifestPlan) -> dict:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": plan_.name, "labels": _labels(plan_)},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _labels(plan_)}}}


def plain_objects(plan_: ManifestPlan) -> list[dict]:
    return [deployment(plan_), service(plan_, headless=False), service(plan_, headless=True), service_monitor(plan_),
            autoscaler(plan_), disruption_budget(plan_)]


def to_yaml(documents: list[dict]) -> str:
    return HEADER + "---\n".join(json.dumps(document, indent=2) + "\n" for document in documents)


def dockerfile(plan_: ManifestPlan) -> str:
    requirements = " ".join(f'"{requirement}"' for requirement in plan_.pip)
    return (f"{HEADER}"
            f"# Build and push it as the image the manifests name: docker build -t {plan_.image} . && "
            f"docker push {plan_.image}\n"
            f"FROM {plan_.base_image}\n"
            "ENV PIP_BREAK_SYSTEM_PACKAGES=1\n"
            f"RUN python3 -m pip install --no-cache-dir {requirements}\n")


def manifest_files(plan_: ManifestPlan) -> dict[str, str]:
    """The files' names and texts."""
    files = {KSERVE_FILE: to_yaml([inference_service(plan_)]), PLAIN_FILE: to_yaml(plain_objects(plan_))}
    return {**files, DOCKERFILE: dockerfile(plan_)} if plan_.pip else files


def check_out_dir(out: Path) -> None:
    """Refuse, before anything is written anywhere, an ``out`` holding files of these names that ume-edge did not
    write (the Dockerfile too: a later run may need its name)."""
    prepare_out(out, [KSERVE_FILE, PLAIN_FILE, DOCKERFILE])


def write_manifests(out: str | Path, plan_: ManifestPlan) -> list[Path]:
    """Write ``kserve.yaml``, ``plain.yaml`` and, when needed, the ``Dockerfile`` into ``out``; a Dockerfile that an
    earlier run wrote is removed when no longer needed. Returns what was written."""
    out, files = Path(out), manifest_files(plan_)
    stale = out / DOCKERFILE
    check_out_dir(out)

    def write(folder: Path) -> list[str]:
        for name, text in files.items():
            (folder / name).write_text(text)
        return list(files)

    names = write_and_swap_in(out, write)
    if DOCKERFILE not in files and stale.is_file():
        stale.unlink()  # prepare_out refused it unless ume-edge wrote it
    return [out / name for name in names]

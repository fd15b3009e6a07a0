"""``python -m ume_edge.triton_repo --kubernetes``: the manifests validated offline (no cluster here), core kinds with
kubernetes-validate in strict mode for Kubernetes 1.30, the InferenceService and the ServiceMonitor against their
CRDs' schemas (tests/k8s_schemas/) with unknown fields refused, and what the manifests must carry."""

import json
from pathlib import Path

import pytest

from ume_edge import triton_repo
from ume_edge.build import BuildOptions, build
from ume_edge.serving import ngc_releases

yaml = pytest.importorskip("yaml")  # these three come with the dev extra
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

KUBERNETES_VERSION = "1.30.0"
SCHEMAS = Path(__file__).parent / "k8s_schemas"
CRD_SCHEMAS = {"InferenceService": "kserve-inferenceservice-v1beta1.json", "ServiceMonitor": "servicemonitor-v1.json"}


def closed(schema):
    """``schema`` with unknown fields refused wherever the CRD lists an object's fields and neither allows extra
    ones nor preserves unknown fields: what the API server's strict field validation (kubectl's default) does."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: (value if key == "properties" else closed(value)) for key, value in schema.items()}
    if "properties" in schema:
        result["properties"] = {name: closed(value) for name, value in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            result["additionalProperties"] = False
    return result


@pytest.fixture(scope="module")
def crd_validators():
    return {kind: jsonschema.Draft7Validator(closed(json.loads((SCHEMAS / name).read_text())))
            for kind, name in CRD_SCHEMAS.items()}


def generate(tmp_path, engines, *extra) -> tuple[int, Path]:
    out = tmp_path / "k8s"
    code = triton_repo.main(["--engines", str(engines), "--out", str(tmp_path / "triton_models"),
                             "--kubernetes", str(out), *extra])
    return code, out


def documents(out: Path, name: str) -> list[dict]:
    return [document for document in yaml.safe_load_all((out / name).read_text()) if document]


def by_kind(out: Path) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for document in documents(out, "kserve.yaml") + documents(out, "plain.yaml"):
        kinds.setdefault(document["kind"], []).append(document)
    return kinds


@pytest.fixture(scope="module")
def onnxruntime_manifests(int8_engines, tmp_path_factory):
    code, out = generate(tmp_path_factory.mktemp("ort"), int8_engines, "--storage-uri", "s3://bucket/triton_models",
                         "--replicas", "2")
    assert code == 0
    return out


@pytest.fixture(scope="module")
def tensorrt_export(tmp_path_factory):
    """What `python -m ume_edge.build --backend tensorrt --export-only` writes; its manifest records no TensorRT."""
    return build(BuildOptions(backend="tensorrt", export_only=True, precision="fp32", max_batch=8,
                              out=tmp_path_factory.mktemp("export") / "fp32-tensorrt-export"))


@pytest.fixture(scope="module")
def tensorrt_manifests(tensorrt_export, tmp_path_factory):
    code, out = generate(tmp_path_factory.mktemp("trt"), tensorrt_export)
    assert code == 0
    return out


def test_core_kinds_validate_strictly(onnxruntime_manifests):
    validated = []
    for document in documents(onnxruntime_manifests, "plain.yaml"):
        if document["kind"] in CRD_SCHEMAS:
            continue
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)  # raises, also on a missing schema
        validated.append(document["kind"])
    assert sorted(validated) == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "Service"]


def test_strict_validation_refuses_what_it_should(onnxruntime_manifests):
    deployment = by_kind(onnxruntime_manifests)["Deployment"][0]
    deployment["spec"]["template"]["spec"]["containers"][0]["shmSize"] = "1Gi"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    removed = {**by_kind(onnxruntime_manifests)["HorizontalPodAutoscaler"][0], "apiVersion": "autoscaling/v2beta2"}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(removed, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
def test_custom_resources_match_their_crds(onnxruntime_manifests, crd_validators, kind):
    (document,) = by_kind(onnxruntime_manifests)[kind]
    assert list(crd_validators[kind].iter_errors(document)) == []
    document["spec"]["unknownField"] = 1
    assert [error.validator for error in crd_validators[kind].iter_errors(document)] == ["additionalProperties"]


def test_inference_service_carries_the_kserve_settings(onnxruntime_manifests):
    (service,) = by_kind(onnxruntime_manifests)["InferenceService"]
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "triton"} and model["protocolVersion"] == "v2"
    assert model["runtimeVersion"] == ngc_releases.DEFAULT_RELEASE.tag
    assert model["storageUri"] == "s3://bucket/triton_models"
    assert {"name": "h2c", "containerPort": 9000, "protocol": "TCP"} in model["ports"]


def test_no_removed_autoscaling_version(onnxruntime_manifests):
    assert "v2beta" not in (onnxruntime_manifests / "plain.yaml").read_text()
    assert by_kind(onnxruntime_manifests)["HorizontalPodAutoscaler"][0]["apiVersion"] == "autoscaling/v2"


def deployment_container(out: Path) -> dict:
    return by_kind(out)["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("manifests", ["onnxruntime_manifests", "tensorrt_manifests"])
def test_one_pinned_image_for_both_routes(request, manifests):
    out = request.getfixturevalue(manifests)
    image = deployment_container(out)["image"]
    model = by_kind(out)["InferenceService"][0]["spec"]["predictor"]["model"]
    assert image == f"nvcr.io/nvidia/tritonserver:{model['runtimeVersion']}"
    assert not image.endswith(":latest")


def test_tensorrt_requests_a_gpu_and_onnxruntime_does_not(tensorrt_manifests, onnxruntime_manifests):
    for out, wanted in ((tensorrt_manifests, {"nvidia.com/gpu": "1"}), (onnxruntime_manifests, {})):
        model = by_kind(out)["InferenceService"][0]["spec"]["predictor"]["model"]
        for resources in (model["resources"], deployment_container(out)["resources"]):
            gpus = {k: v for k, v in resources["limits"].items() if k == "nvidia.com/gpu"}
            assert gpus == wanted


@pytest.mark.parametrize("manifests", ["onnxruntime_manifests", "tensorrt_manifests"])
def test_dev_shm_is_in_memory(request, manifests):
    out = request.getfixturevalue(manifests)
    predictor = by_kind(out)["InferenceService"][0]["spec"]["predictor"]
    pod = by_kind(out)["Deployment"][0]["spec"]["template"]["spec"]
    for volumes, mounts in ((predictor["volumes"], predictor["model"]["volumeMounts"]),
                            (pod["volumes"], pod["containers"][0]["volumeMounts"])):
        (mount,) = [m for m in mounts if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in volumes if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory" and volume["emptyDir"]["sizeLimit"]


def test_deployment_probes_and_pvc(int8_engines, tmp_path):
    code, out = generate(tmp_path, int8_engines)  # default storage: a PVC
    assert code == 0
    container = deployment_container(out)
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "--model-repository=/models" in container["args"]
    claim = [v for v in by_kind(out)["Deployment"][0]["spec"]["template"]["spec"]["volumes"]
             if "persistentVolumeClaim" in v]
    assert claim[0]["persistentVolumeClaim"]["claimName"] == "ume-models"


def test_dockerfile_exactly_when_needed(int8_engines, tmp_path, capsys):
    assert generate(tmp_path, int8_engines, "--entry", "pipeline")[0] == 2  # no --image: refused
    assert "--image" in capsys.readouterr().err and not (tmp_path / "k8s").exists()
    code, out = generate(tmp_path, int8_engines, "--entry", "pipeline", "--image", "registry.example/ume:1")
    assert code == 0
    text = (out / "Dockerfile").read_text()
    assert f"FROM {ngc_releases.DEFAULT_RELEASE.image}" in text and "ume-edge==" in text
    assert deployment_container(out)["image"] == "registry.example/ume:1"
    model = by_kind(out)["InferenceService"][0]["spec"]["predictor"]["model"]
    assert (model["image"], model["runtimeVersion"]) == ("registry.example/ume:1", "1")
    code, out = generate(tmp_path, int8_engines, "--encoder-backend", "python", "--image", "registry.example/ume:2")
    assert code == 0 and "onnxruntime" in (out / "Dockerfile").read_text()
    assert generate(tmp_path, int8_engines)[0] == 0
    assert not (out / "Dockerfile").exists()


def test_foreign_file_is_refused_and_untouched(int8_engines, tmp_path, capsys):
    out = tmp_path / "k8s"
    out.mkdir()
    (out / "plain.yaml").write_text("mine\n")
    assert generate(tmp_path, int8_engines)[0] == 2
    assert "was not written by ume-edge" in capsys.readouterr().err
    assert (out / "plain.yaml").read_text() == "mine\n" and sorted(p.name for p in out.iterdir()) == ["plain.yaml"]
    assert not (tmp_path / "triton_models").exists()


@pytest.mark.parametrize("uri", ["s3://bucket/triton_models/ume", "gs://bucket/repo/fusion/1", "http://x/y", "pvc://"])
def test_storage_uri_must_be_the_repository_root(int8_engines, tmp_path, capsys, uri):
    assert generate(tmp_path, int8_engines, "--storage-uri", uri)[0] == 2
    assert "--storage-uri" in capsys.readouterr().err and not (tmp_path / "k8s").exists()


def test_tensorrt_release_follows_the_plans():
    assert ngc_releases.release_for_tensorrt("10.5.0.18").tag == "24.10-py3"
    with pytest.raises(ngc_releases.ImageError, match="--image") as refused:
        ngc_releases.release_for_tensorrt("10.16.1")
    assert "24.10-py3 (TensorRT 10.5)" in str(refused.value)

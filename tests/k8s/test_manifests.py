"""The Kubernetes deployment under k8s/, checked without a cluster, kubectl or kustomize.

* Every YAML file parses; every kustomization uses only what ``render`` below understands.
* ``render`` builds a kustomization the way ``kubectl apply -k`` would for the features used
  here (resources, JSON6902 and merge patches, images) so the base and every overlay are checked
  as they would be applied.
* RayService objects validate against the served ``ray.io/v1`` schema of the KubeRay CRD in
  ``shared/kuberay-crds`` (made strict: unknown fields fail, as ``kubectl --validate=strict``
  would), their ``rayClusterConfig`` against the RayCluster CRD, and their Pod templates and all
  core objects against Kubernetes' own schemas (``kubernetes-validate``).
* Rules the KubeRay operator enforces in code (names, rayStartParams, GCS fault-tolerance env)
  are checked too, as are the cross-object references (Secrets, Services, volumes).
* ``serveConfigV2`` validates with Ray's ``ServeDeploySchema``; its args are ``ServeConfig``
  fields and build the real Serve application graph (``serve_app.app:build_app``) with the
  environment the Pods would have.

Drift from the local Serve config: the manifests' ``serveConfigV2`` is written out, not
generated, so it reads as what the cluster runs. Instead the tests pin what must not drift:
the applications (name, route_prefix, import_path) and HTTP options equal those of
``serve_app/serve_config.yaml``, every arg is a ``ServeConfig`` field, and each overlay's copy
of the config equals the base's except for the args listed in ``OVERLAY_ARG_CHANGES``.
"""

from __future__ import annotations

import base64
import copy
import functools
import importlib
import json
import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
LOCAL_SERVE_CONFIG = REPO / "serve_app" / "serve_config.yaml"
CRDS_ENV = "KUBERAY_CRDS_DIR"
# Oldest and newest Kubernetes API the core objects are checked against.
K8S_VERSIONS = ("1.30", "1.37")
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

VARIANTS = {
    "base": K8S,
    "quantized-8bit": K8S / "overlays" / "quantized-8bit",
    "cpu-only": K8S / "overlays" / "cpu-only",
    "gcs-fault-tolerance": K8S / "overlays" / "gcs-fault-tolerance",
}
# The Serve args each overlay sets (to these values); all its other args equal the base's.
OVERLAY_ARG_CHANGES: dict[str, dict] = {
    "base": {},
    "quantized-8bit": {"quantization": "8bit", "dtype": "bfloat16"},
    "cpu-only": {"device": "cpu", "dtype": "float32", "replica_num_gpus": 0,
                 "replica_num_cpus": 6, "torch_threads": 6},
    "gcs-fault-tolerance": {},
}
GPU_VARIANTS = ("base", "quantized-8bit", "gcs-fault-tolerance")
# Set from Secrets through S3D_* env vars; in args they would override the environment.
ENV_ONLY_FIELDS = ("redis_url", "api_keys")
# Standalone manifests applied by hand (see k8s/README.md), not part of any kustomization.
STANDALONE = [K8S / "jobs" / "fetch-model.yaml", K8S / "jobs" / "profile-search.yaml"]


# --- loading --------------------------------------------------------------------------------

def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=LOADER) if d is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def crds_dir() -> Path:
    """``shared/kuberay-crds`` beside the repository, else ``$KUBERAY_CRDS_DIR``."""
    candidates = [Path(__file__).resolve().parents[3] / "shared" / "kuberay-crds"]
    if os.environ.get(CRDS_ENV):
        candidates.append(Path(os.environ[CRDS_ENV]))
    for path in candidates:
        if (path / "ray.io_rayservices.yaml").is_file():
            return path
    pytest.fail(f"KubeRay CRDs not found (looked in {', '.join(map(str, candidates))}); "
                f"put ray.io_rayservices.yaml and ray.io_rayclusters.yaml there or set "
                f"{CRDS_ENV}")


# --- CRD schemas ----------------------------------------------------------------------------

def _strict(schema: dict) -> dict:
    """The API server prunes or rejects unknown fields; jsonschema allows them unless told."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and \
                not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(s) for s in out[key]]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _list_type(validator, list_type, instance, schema):
    """``x-kubernetes-list-type``: map entries unique by their keys, set items unique."""
    if not validator.is_type(instance, "array"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen = []
    for item in instance:
        ident = tuple(json.dumps(item.get(k)) for k in keys) if list_type == "map" else item
        if ident in seen:
            yield jsonschema.ValidationError(f"duplicate list entry {ident} ({list_type})")
        seen.append(ident)


CrdValidator = jsonschema.validators.extend(jsonschema.Draft7Validator,
                                            {"x-kubernetes-list-type": _list_type})


@functools.cache
def crd_validator(kind: str, version: str = "v1"):
    crd = load_docs(crds_dir() / f"ray.io_{kind.lower()}s.yaml")[0]
    assert crd["spec"]["names"]["kind"] == kind
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in served, f"{kind} CRD does not serve {version}: {sorted(served)}"
    return CrdValidator(_strict(served[version]["schema"]["openAPIV3Schema"]))


def schema_errors(validator, obj: dict) -> list[str]:
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:20]]


# --- a small kustomize ----------------------------------------------------------------------

_TARGET = {"type": "object", "additionalProperties": False,
           "properties": {k: {"type": "string"}
                          for k in ("group", "version", "kind", "name", "namespace")}}
# The part of the Kustomization format these manifests use, and ``render`` implements: a
# field outside it fails here rather than being silently skipped by the renderer.
KUSTOMIZATION_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "resources"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
        "kind": {"const": "Kustomization"},
        "resources": {"type": "array", "minItems": 1, "items": {"type": "string"}},
        "patches": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "properties": {"path": {"type": "string"}, "patch": {"type": "string"},
                           "target": _TARGET},
            "oneOf": [{"required": ["path"]}, {"required": ["patch"]}]}},
        "images": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["name"],
            "minProperties": 2,
            "properties": {k: {"type": "string"}
                           for k in ("name", "newName", "newTag", "digest")}}},
    },
}


class PatchError(Exception):
    pass


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise PatchError(f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc, path: str):
    parts = _pointer(path)
    node = doc
    try:
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise PatchError(f"path {path} does not exist") from exc
    return node, parts[-1]


def apply_json6902(doc: dict, ops: list[dict]) -> None:
    """RFC 6902 add / remove / replace / test; like kustomize, a missing path is an error."""
    for op in ops:
        parent, last = _parent(doc, op["path"])
        value = copy.deepcopy(op.get("value"))
        kind = op["op"]
        if isinstance(parent, list):
            index = len(parent) if last == "-" and kind == "add" else int(last)
            if index > len(parent) or (kind != "add" and index >= len(parent)):
                raise PatchError(f"{kind} {op['path']}: index out of range")
        elif kind != "add" and last not in parent:
            raise PatchError(f"{kind} {op['path']}: no such field")
        if kind == "add":
            if isinstance(parent, list):
                parent.insert(index, value)
            else:
                parent[last] = value
        elif kind == "replace":
            parent[index if isinstance(parent, list) else last] = value
        elif kind == "remove":
            del parent[index if isinstance(parent, list) else last]
        elif kind == "test":
            current = parent[index if isinstance(parent, list) else last]
            if current != value:
                raise PatchError(f"test {op['path']}: {current!r} != {value!r}")
        else:
            raise NotImplementedError(f"JSON6902 op {kind!r} is not rendered here")


def merge_patch(doc: dict, patch: dict) -> None:
    """Merge semantics kustomize uses for custom resources: maps merge, lists are replaced."""
    for key, value in patch.items():
        if value is None:
            doc.pop(key, None)
        elif isinstance(value, dict) and isinstance(doc.get(key), dict):
            merge_patch(doc[key], value)
        else:
            doc[key] = copy.deepcopy(value)


def _matches(doc: dict, target: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    actual = {"group": group, "version": version, "kind": doc["kind"],
              "name": doc["metadata"]["name"]}
    return all(actual.get(k) == v for k, v in target.items() if k != "namespace")


def _split_image(image: str) -> tuple[str, str]:
    name, sep, digest = image.partition("@")
    if sep:
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    return (image[:colon], image[colon:]) if colon > slash else (image, "")


def _set_images(node, entry: dict) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    name, ref = _split_image(container.get("image", ""))
                    if name == entry["name"]:
                        if "digest" in entry:
                            ref = "@" + entry["digest"]
                        elif "newTag" in entry:
                            ref = ":" + entry["newTag"]
                        container["image"] = entry.get("newName", name) + ref
            else:
                _set_images(value, entry)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, entry)


@functools.cache
def _render(directory: Path) -> tuple[dict, ...]:
    kfile = directory / "kustomization.yaml"
    (kustomization,) = load_docs(kfile)
    errors = schema_errors(jsonschema.Draft7Validator(KUSTOMIZATION_SCHEMA), kustomization)
    assert not errors, f"{kfile}: {errors}"
    docs: list[dict] = []
    for entry in kustomization["resources"]:
        path = (directory / entry).resolve()
        assert path.exists(), f"{kfile}: resource {entry} does not exist"
        docs += copy.deepcopy(list(_render(path))) if path.is_dir() else load_docs(path)
    ids = [(d["apiVersion"], d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(ids) == len(set(ids)), f"{kfile}: duplicate resources {ids}"
    for patch in kustomization.get("patches", []):
        if "path" in patch:
            assert (directory / patch["path"]).is_file(), f"{kfile}: no {patch['path']}"
            content = yaml.load((directory / patch["path"]).read_text(), Loader=LOADER)
        else:
            content = yaml.load(patch["patch"], Loader=LOADER)
        if isinstance(content, list):
            assert "target" in patch, f"{kfile}: a JSON6902 patch needs a target"
            target = patch["target"]
        else:
            assert "." in content["apiVersion"].split("/")[0], \
                f"{kfile}: merge patches are only rendered for custom resources"
            target = {"kind": content["kind"], "name": content["metadata"]["name"]}
        matched = [d for d in docs if _matches(d, target)]
        assert matched, f"{kfile}: patch {patch} matches no resource"
        for doc in matched:
            try:
                (apply_json6902 if isinstance(content, list) else merge_patch)(doc, content)
            except PatchError as exc:
                pytest.fail(f"{kfile}: {exc}")
    for entry in kustomization.get("images", []):
        _set_images(docs, entry)
    return tuple(docs)


def render(directory: Path) -> list[dict]:
    return copy.deepcopy(list(_render(directory.resolve())))


def only(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def rayservice(variant: str) -> dict:
    return only(render(VARIANTS[variant]), "RayService")


def serve_config(variant: str) -> dict:
    return yaml.safe_load(rayservice(variant)["spec"]["serveConfigV2"])


def app_args(variant: str) -> dict:
    (app,) = serve_config(variant)["applications"]
    return app.get("args") or {}


def pod_templates(rs: dict) -> dict[str, dict]:
    cluster = rs["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster.get("workerGroupSpecs", []):
        out[group["groupName"]] = group["template"]
    return out


def secret_values(docs: list[dict]) -> dict[str, dict[str, str]]:
    out = {}
    for secret in (d for d in docs if d["kind"] == "Secret"):
        values = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
        values.update(secret.get("stringData", {}))
        out[secret["metadata"]["name"]] = values
    return out


def container_env(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The environment the kubelet gives the container, ``$(VAR)`` references expanded."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]),
                                      var["value"])
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        if ref["name"] not in secrets:
            assert ref.get("optional"), f"env {var['name']}: no Secret {ref['name']}"
            continue
        assert ref["key"] in secrets[ref["name"]], f"Secret {ref['name']} has no {ref['key']}"
        env[var["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def core_objects(docs: list[dict]) -> list[dict]:
    """Objects of Kubernetes' own API groups (v1, apps/v1, ...), not custom resources."""
    return [d for d in docs if "." not in d["apiVersion"].split("/")[0]]


def pinned(package: str) -> str:
    """The version pyproject.toml pins for a dependency (``"name[extras]==X"``)."""
    text = (REPO / "pyproject.toml").read_text()
    (version,) = re.findall(rf'"{package}(?:\[[^\]]*\])?==([^"]+)"', text)
    return version


# --- files ----------------------------------------------------------------------------------

def test_every_yaml_file_parses():
    files = yaml_files()
    assert K8S / "kustomization.yaml" in files
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            if isinstance(doc, list):  # a JSON6902 patch file
                assert all({"op", "path"} <= set(op) for op in doc), path
            else:
                assert {"apiVersion", "kind"} <= set(doc), f"{path}: no apiVersion/kind"


def test_every_kustomization_is_rendered_and_listed():
    kustomizations = {p.parent for p in K8S.rglob("kustomization.yaml")}
    assert kustomizations == set(VARIANTS.values()) | {K8S / "base"}
    for directory in kustomizations:
        assert render(directory)


def test_top_level_kustomization_deploys_the_base():
    assert render(K8S) == render(K8S / "base")
    kinds = sorted(d["kind"] for d in render(K8S))
    assert kinds == ["PersistentVolumeClaim", "RayService", "Secret", "Service", "StatefulSet"]


def test_every_manifest_is_deployed_or_documented():
    """No orphan YAML: each file is a kustomization, in one, or a documented standalone file."""
    used = set()
    for directory in {p.parent for p in K8S.rglob("kustomization.yaml")}:
        (k,) = load_docs(directory / "kustomization.yaml")
        used |= {(directory / e).resolve() for e in k["resources"]}
        used |= {(directory / p["path"]).resolve() for p in k.get("patches", []) if "path" in p}
    readme = (K8S / "README.md").read_text()
    for path in yaml_files():
        if path.name == "kustomization.yaml" or path.resolve() in used:
            continue
        assert str(path.relative_to(REPO)) in readme, f"{path} is neither deployed nor documented"


# --- KubeRay schemas and operator rules -----------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_rayservice_validates_against_the_crd(variant):
    rs = rayservice(variant)
    assert rs["apiVersion"] == "ray.io/v1"
    assert not schema_errors(crd_validator("RayService"), rs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ray_cluster_config_validates_against_the_raycluster_crd(variant):
    rs = rayservice(variant)
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
               "metadata": {"name": rs["metadata"]["name"]},
               "spec": rs["spec"]["rayClusterConfig"]}
    assert not schema_errors(crd_validator("RayCluster"), cluster)


def test_strict_crd_schema_rejects_unknown_fields_and_duplicates():
    """The validator used above would catch a typo and a repeated env var."""
    rs = rayservice("base")
    broken = copy.deepcopy(rs)
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    assert schema_errors(crd_validator("RayService"), broken)
    broken = copy.deepcopy(rs)
    env = broken["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["env"]
    env.append(env[0])
    assert schema_errors(crd_validator("RayService"), broken)
    broken = copy.deepcopy(rs)
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert schema_errors(crd_validator("RayService"), broken)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kuberay_operator_rules(variant):
    """What the operator checks in code (ray-operator/controllers/ray/utils/validation.go)."""
    rs = rayservice(variant)
    name = rs["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    groups = [head, *cluster["workerGroupSpecs"]]
    for group in groups:
        params = group.get("rayStartParams", {})
        assert group["template"]["spec"]["containers"]
        assert not ({"num-cpus", "num-gpus", "memory", "resources"} & set(params)
                    and group.get("resources")), "resources in rayStartParams and resources"
        assert "labels" not in params
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) \
            <= group["maxReplicas"]
    head_env = {v["name"] for v in head["template"]["spec"]["containers"][0].get("env", [])}
    assert "REDIS_USERNAME" not in head_env and "redis-username" not in head["rayStartParams"]
    if "gcsFaultToleranceOptions" in cluster:
        assert not {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS"} & head_env
        assert "redis-password" not in head["rayStartParams"]
        assert "ray.io/external-storage-namespace" not in rs["metadata"].get("annotations", {})
    else:
        assert "RAY_REDIS_ADDRESS" not in head_env


@pytest.mark.parametrize("variant", VARIANTS)
def test_cluster_shape(variant):
    """Head runs no replicas; Ray autoscaler on; Ray version = the pinned one."""
    rs = rayservice(variant)
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == pinned("ray")
    assert rs["spec"]["upgradeStrategy"]["type"] in ("NewCluster",
                                                     "NewClusterWithIncrementalUpgrade")
    for template in pod_templates(rs).values():
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == 8080 and ports["serve"] == 8000
        assert template["metadata"]["annotations"]["prometheus.io/port"] == "8080"


# --- core objects ---------------------------------------------------------------------------

@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_core_objects_validate(variant, k8s_version):
    docs = render(VARIANTS[variant])
    objects = core_objects(docs)
    assert {d["kind"] for d in objects} >= {"Secret", "Service", "StatefulSet",
                                           "PersistentVolumeClaim"}
    rs = only(docs, "RayService")
    # Pod templates and metadata of the RayService, as core objects (stricter than the CRD).
    objects += [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group},
                 "template": template} for group, template in pod_templates(rs).items()]
    objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": rs["metadata"]})
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} ({k8s_version}): {exc}")


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("path", STANDALONE, ids=lambda p: p.name)
def test_standalone_jobs_validate(path, k8s_version):
    for obj in load_docs(path):
        kubernetes_validate.validate(obj, k8s_version, strict=True)


def test_profile_search_job_uses_real_cli_options():
    import typer.main

    from serve_app.cli import app

    (job,) = load_docs(K8S / "jobs" / "profile-search.yaml")
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    words = script.split("s3d search", 1)[1].split()
    command = typer.main.get_command(app).commands["search"]
    known = {opt for p in command.params for opt in p.opts}
    assert {w for w in words if w.startswith("--")} <= known
    out = words[words.index("--out") + 1]
    model = words[words.index("--model") + 1]
    assert out.startswith("/models/") and model == app_args("base")["model"]


def test_podmonitor_selects_the_ray_pods_metrics_port():
    (monitor,) = load_docs(K8S / "monitoring" / "podmonitor.yaml")
    selector = monitor["spec"]["selector"]["matchLabels"]
    endpoint_ports = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    for template in pod_templates(rayservice("base")).values():
        assert selector.items() <= template["metadata"]["labels"].items()
        names = {p["name"] for p in template["spec"]["containers"][0]["ports"]}
        assert endpoint_ports <= names


# --- references between objects -------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_references_resolve(variant):
    docs = render(VARIANTS[variant])
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    secrets = secret_values(docs)
    pods = [(t, set()) for t in pod_templates(only(docs, "RayService")).values()]
    pods += [(d["spec"]["template"], {c["metadata"]["name"]
                                      for c in d["spec"].get("volumeClaimTemplates", [])})
             for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    for pod, claim_templates in pods:
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for container in pod["spec"]["containers"]:
            container_env(container, secrets)  # every Secret key resolves
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes.keys() | claim_templates, \
                    f"no volume {mount['name']}"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
    for svc in (d for d in docs if d["kind"] == "Service"):
        backends = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")
                    and svc["spec"]["selector"].items()
                    <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert backends, f"Service {svc['metadata']['name']} selects nothing"
        for port in svc["spec"]["ports"]:
            names = {p.get("name") for b in backends
                     for c in b["spec"]["template"]["spec"]["containers"]
                     for p in c.get("ports", [])}
            assert port["targetPort"] in names


def redis_parts(docs: list[dict]) -> tuple[dict, dict, dict]:
    return only(docs, "Service", "s3d-redis"), only(docs, "StatefulSet", "s3d-redis"), \
        secret_values(docs)


def redis_script(container: dict) -> str:
    """The shell script the Redis container runs (`sh -c`)."""
    assert container["command"] == ["sh", "-c"] and len(container["args"]) == 1
    return container["args"][0]


def test_redis_container_runs_with_the_secret_password_off_its_command_line(tmp_path):
    """The container's own script, run with this machine's redis-server (only the port, bind
    address and data folder changed): Redis asks for the Secret's password, keeps the
    manifest's settings, and no process's command line carries the password."""
    import subprocess

    import redis as redis_py

    from tests.conftest import free_port

    _, statefulset, secrets = redis_parts(render(VARIANTS["base"]))
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    env = container_env(container, secrets)
    password, port = env["REDIS_PASSWORD"], free_port()
    script = redis_script(container)
    local = script.replace("--dir /data", f"--dir {tmp_path}").replace(
        "redis-server -", f"redis-server - --port {port} --bind 127.0.0.1", 1)
    assert local.count(str(tmp_path)) == 1 and local.count(f"--port {port}") == 1
    proc = subprocess.Popen(["sh", "-c", local], env={"PATH": os.environ["PATH"], **env})
    client = redis_py.Redis(port=port, password=password, socket_timeout=5)
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis_py.ConnectionError:
                assert proc.poll() is None, "redis-server exited"
                time.sleep(0.1)
        assert client.config_get("requirepass") == {"requirepass": password}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("maxmemory") == {"maxmemory": str(768 << 20)}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        with pytest.raises(redis_py.AuthenticationError):
            redis_py.Redis(port=port, socket_timeout=5).ping()
        # `exec`: the shell became redis-server (PID 1 in the Pod, which gets the stop signal).
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"redis-server" in cmdline and password.encode() not in cmdline
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("variant", VARIANTS)
def test_stats_redis_url_comes_from_the_secret_and_reaches_redis(variant):
    docs = render(VARIANTS[variant])
    service, statefulset, secrets = redis_parts(docs)
    redis = statefulset["spec"]["template"]["spec"]["containers"][0]
    password = container_env(redis, secrets)["REDIS_PASSWORD"]
    assert "requirepass $REDIS_PASSWORD" in redis_script(redis)
    assert re.fullmatch(r"[A-Za-z0-9._~-]+", password), "password must be URL-safe"
    for group, template in pod_templates(only(docs, "RayService")).items():
        env = container_env(template["spec"]["containers"][0], secrets)
        url = urlsplit(env["S3D_REDIS_URL"])
        assert (url.scheme, url.hostname, url.password) == ("redis", "s3d-redis", password), group
        assert url.port == service["spec"]["ports"][0]["port"]
        assert url.path == "/1", "statistics use database 1; Ray's GCS uses database 0"


def test_gcs_fault_tolerance_uses_another_database_and_not_the_stats_prefix():
    docs = render(VARIANTS["gcs-fault-tolerance"])
    rs = only(docs, "RayService")
    ft = rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    service, _, secrets = redis_parts(docs)
    host, port = ft["redisAddress"].removeprefix("redis://").split(":")
    assert (host, int(port)) == ("s3d-redis", service["spec"]["ports"][0]["port"])
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert secrets[ref["name"]][ref["key"]]
    # Ray's GCS writes to database 0 under its namespace; the statistics live elsewhere.
    for template in pod_templates(rs).values():
        stats = urlsplit(container_env(template["spec"]["containers"][0], secrets)
                         ["S3D_REDIS_URL"])
        assert stats.path not in ("", "/", "/0")
    # Unset, KubeRay uses the RayCluster's UID: the two clusters of a zero-downtime upgrade
    # get different namespaces, and none can be the statistics' prefix.
    assert "externalStorageNamespace" not in ft
    for variant in VARIANTS:
        if variant != "gcs-fault-tolerance":
            assert "gcsFaultToleranceOptions" not in rayservice(variant)["spec"][
                "rayClusterConfig"]


# --- the Serve config -----------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_config_validates_with_ray(variant):
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config(variant))


def test_import_path_imports_and_is_callable():
    (app,) = serve_config("base")["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_config_matches_the_local_one(variant):
    local = yaml.safe_load(LOCAL_SERVE_CONFIG.read_text())
    cluster = serve_config(variant)
    fields = ("name", "route_prefix", "import_path")
    assert [{k: a.get(k) for k in fields} for a in cluster["applications"]] == \
        [{k: a.get(k) for k in fields} for a in local["applications"]]
    assert cluster["http_options"] == local["http_options"]
    assert cluster.get("proxy_location") == local.get("proxy_location")


@pytest.mark.parametrize("variant", VARIANTS)
def test_args_are_serve_config_fields(variant):
    from serve_app.config import ServeConfig, load_config

    args = app_args(variant)
    assert set(args) <= set(ServeConfig.model_fields)
    assert not set(args) & set(ENV_ONLY_FIELDS)
    load_config(overrides=args, environ={})


@pytest.mark.parametrize("variant", VARIANTS)
def test_overlay_changes_only_its_args(variant):
    assert app_args(variant) == {**app_args("base"), **OVERLAY_ARG_CHANGES[variant]}
    rest = {k: v for k, v in serve_config(variant).items() if k != "applications"}
    assert rest == {k: v for k, v in serve_config("base").items() if k != "applications"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_ray_container_has_the_same_application_environment(variant):
    """Serve builds the application in a task (``num_cpus=0``) that may run on the head: the
    ``S3D_*`` variables (API keys, the Redis URL) must be the same there as on the workers, or
    the API could come up open, or the router without its store, depending on where it ran."""
    docs = render(VARIANTS[variant])
    cluster = only(docs, "RayService")["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    envs = [[var for var in group["template"]["spec"]["containers"][0].get("env", [])
             if var["name"].startswith("S3D_")] for group in groups]
    assert {v["name"] for v in envs[0]} >= {"S3D_REDIS_URL", "S3D_API_KEYS"}
    assert all(env == envs[0] for env in envs[1:]), envs


@pytest.mark.parametrize("variant", VARIANTS)
def test_application_builds_in_the_pods_environment(variant, monkeypatch):
    """build_app with the args and the env of a worker Pod: the graph Serve would deploy."""
    from ray.serve._private.build_app import build_app as build_graph

    from serve_app.app import build_app

    docs = render(VARIANTS[variant])
    rs = only(docs, "RayService")
    workers = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (group,) = workers
    container = group["template"]["spec"]["containers"][0]
    for name in [n for n in os.environ if n.startswith("S3D_")]:
        monkeypatch.delenv(name)
    for name, value in container_env(container, secret_values(docs)).items():
        monkeypatch.setenv(name, value)
    (app,) = serve_config(variant)["applications"]
    built = build_graph(build_app(app["args"]), name=app["name"])
    deployments = {d.name: d for d in built.deployments}
    decoder, ingress = deployments["Decoder"], deployments["Ingress"]
    assert decoder.init_args[0]["redis_url"] == os.environ["S3D_REDIS_URL"]

    limits = container["resources"]["limits"]
    pod_cpus = float(limits["cpu"])
    pod_gpus = float(limits.get("nvidia.com/gpu", 0))
    decoder_opts = decoder.ray_actor_options
    # The ingress needs CPU, so it is never placed on the head (num-cpus 0); it and a decoder
    # fit in one worker Pod, and the pool's largest size fits in the worker group.
    assert ingress.ray_actor_options["num_cpus"] > 0
    assert decoder_opts["num_cpus"] + ingress.ray_actor_options["num_cpus"] <= pod_cpus
    assert decoder_opts.get("num_gpus", 0) <= pod_gpus
    autoscaling = decoder._deployment_config.autoscaling_config
    assert autoscaling is not None, "the decoder pool should autoscale"
    per_pod = min(pod_cpus // decoder_opts["num_cpus"],
                  pod_gpus // decoder_opts["num_gpus"] if decoder_opts.get("num_gpus") else 1e9)
    # Replicas scaled down or replaced finish their streams, and so does an old cluster after
    # an upgrade moved traffic away from it.
    grace = decoder._deployment_config.graceful_shutdown_timeout_s
    assert grace == ingress._deployment_config.graceful_shutdown_timeout_s >= 60
    assert rs["spec"]["rayClusterDeletionDelaySeconds"] >= grace
    # A worker Pod's memory is sized for one model: Ray places replicas by CPU and GPU only, so
    # those must keep a second decoder out of a Pod.
    assert per_pod == 1, f"{per_pod:g} decoders fit in one worker Pod"
    assert autoscaling.max_replicas <= per_pod * group["maxReplicas"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_and_cpu_variants(variant):
    docs = render(VARIANTS[variant])
    args = app_args(variant)
    rs = only(docs, "RayService")
    (worker,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    spec = worker["template"]["spec"]
    resources = spec["containers"][0]["resources"]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(head)
    if variant in GPU_VARIANTS:
        assert (args["device"], args["dtype"], args["replica_num_gpus"]) == ("cuda", "bfloat16", 1)
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] and spec["tolerations"]
        assert worker["minReplicas"] >= 1 and worker["maxReplicas"] >= args["max_replicas"]
        assert spec["containers"][0]["image"].endswith("-gpu")
    else:
        assert (args["device"], args["dtype"], args["replica_num_gpus"]) == ("cpu", "float32", 0)
        assert args.get("quantization", "none") == "none"
        assert "nvidia.com/gpu" not in json.dumps(docs)
        assert "nodeSelector" not in spec and "tolerations" not in spec
        assert not spec["containers"][0]["image"].endswith("-gpu")
    assert args["min_replicas"] <= args["max_replicas"] and args["target_ongoing_requests"] > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_comes_from_the_volume(variant):
    rs = rayservice(variant)
    model = app_args(variant)["model"]
    for group, template in pod_templates(rs).items():
        if group == "head":
            continue
        mounts = template["spec"]["containers"][0]["volumeMounts"]
        (mount,) = [m for m in mounts if model.startswith(m["mountPath"].rstrip("/") + "/")]
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert "persistentVolumeClaim" in volumes[mount["name"]]
        assert mount.get("readOnly") is True


# --- image and docs -------------------------------------------------------------------------

def test_dockerfile():
    text = (K8S / "Dockerfile").read_text()
    instructions = text.replace("\\\n", " ")  # join continued lines
    lines = [line.strip() for line in instructions.splitlines() if line.strip()
             and not line.lstrip().startswith("#")]
    (from_line,) = [line for line in lines if line.startswith("FROM ")]
    assert from_line == f"FROM rayproject/ray:{pinned('ray')}-py311${{RAY_VARIANT}}"
    assert "ARG RAY_VARIANT=" in lines and "docker build -f k8s/Dockerfile" in text
    runs = [line for line in lines if line.startswith("RUN ")]
    torch_at = next(i for i, r in enumerate(runs) if f"torch=={pinned('torch')}" in r)
    project_at = next(i for i, r in enumerate(runs) if "pip install ." in r)
    assert torch_at < project_at
    assert not re.search(r"\.(gguf|safetensors)|hf download|from_pretrained|/models",
                         "\n".join(lines))
    ignore = [line.strip() for line in (K8S / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*" and {"**/*.gguf", "**/*.safetensors"} <= set(ignore)
    for needed in ("pyproject.toml", "README.md", "serve_app/", "workers/", "router/"):
        assert "!" + needed in ignore


def test_readme_covers_the_metrics_and_commands():
    readme = (K8S / "README.md").read_text()
    source = (REPO / "serve_app" / "metrics.py").read_text()
    names = re.findall(r"metrics\.(?:Counter|Gauge|Histogram)\(\s*\"(\w+)\"", source)
    assert names
    for name in names:
        assert name in readme, f"k8s/README.md does not mention the metric {name}"
    for text in ("kubectl apply -k k8s/", "docker build -f k8s/Dockerfile .", "ray_",
                 *(f"k8s/overlays/{v}" for v in VARIANTS if v != "base")):
        assert text in readme

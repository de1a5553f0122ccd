"""deploy/k8s renders, validates offline and says what the service needs, for every overlay.

Each overlay is rendered with ``kubectl kustomize``; the Kubernetes objects are validated with
kubernetes-validate (``--strict``: unknown fields are errors), the KEDA objects against the
``openAPIV3Schema`` of KEDA's CRDs (deploy/k8s/crds) with jsonschema, made strict the same way
(the API server refuses unknown fields under kubectl's default ``--validate=strict``). The sources
pass yamllint, the rendered objects pass checkov with the skip list below, and the assertions
check what the service itself relies on: ports that match the settings, probes that exist, GPU
limits, grace periods beyond the task time limit, queues that some worker consumes, one image tag.
A deliberately broken copy of the manifests must fail the same checks.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config import Settings
from common.queue import QUEUE_CPU, QUEUE_GPU
from tests.conftest import REPO_ROOT, _missing, require_tool

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("single-node", "cluster", "cluster-gpu-jobs")
#: The Kubernetes release the objects are validated against (kubectl 1.32 renders them here).
K8S_VERSION = "1.32.0"
KEDA_CRDS = {"ScaledObject": "keda.sh_scaledobjects.yaml", "ScaledJob": "keda.sh_scaledjobs.yaml"}
WORKLOADS = ("Deployment", "Job", "ScaledJob")

#: checkov findings we accept, and why (every other finding fails the test).
CHECKOV_SKIPS = {
    # The release component sets one tag for every image; digests are pinned at deploy time with
    # `kustomize edit set image NAME=REGISTRY/NAME@sha256:...` once the site's registry holds them.
    "CKV_K8S_43": "image digest",
    # IfNotPresent lets nodes of an air-gapped hospital cluster start pods from preloaded images;
    # with tags that are never reused (and digests at deploy time) Always adds nothing.
    "CKV_K8S_15": "image pull policy Always",
    # Settings are read from SYNTHPERF_* environment variables (common/config.py, pydantic-settings);
    # the Secret is referenced, never written into the manifests.
    "CKV_K8S_35": "secrets as files",
}


# --------------------------------------------------------------------------- rendering
def kustomize(path: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize path`` renders (fails the test with kustomize's message)."""
    kubectl = require_tool("kubectl")
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {path} failed:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(K8S_DIR / "overlays" / name) for name in OVERLAYS}


def named(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(kind/name, workload spec, pod spec) of every workload, ScaledJobs included."""
    for o in objs:
        if o["kind"] not in WORKLOADS:
            continue
        spec = o["spec"]["jobTargetRef"] if o["kind"] == "ScaledJob" else o["spec"]
        yield f"{o['kind']}/{o['metadata']['name']}", spec, spec["template"]["spec"]


def config_data(objs: list[dict[str, Any]]) -> dict[str, str]:
    return named(objs, "ConfigMap", "synthperf-config")["data"]


def task_time_limit(objs: list[dict[str, Any]]) -> int:
    """The Celery hard time limit the workers run with: the ConfigMap's value, else the default."""
    raw = config_data(objs).get("SYNTHPERF_TASK_TIME_LIMIT_S")
    return int(raw) if raw is not None else Settings.model_fields["task_time_limit_s"].default


def celery_queues(container: dict[str, Any]) -> set[str]:
    args = container.get("args") or []
    if "celery" not in args[:1] or "worker" not in args:
        return set()
    return set(args[args.index("-Q") + 1].split(",")) if "-Q" in args else {QUEUE_CPU}


def probe_text(probe: dict[str, Any] | None) -> str:
    return json.dumps(probe or {})


# --------------------------------------------------------------------------- schema validation
def _strict(schema: Any) -> Any:
    """The schema with additionalProperties false wherever it lists properties and allows no others."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def keda_schema(kind: str) -> dict[str, Any]:
    crd = next(d for d in yaml.safe_load_all((K8S_DIR / "crds" / KEDA_CRDS[kind]).read_text()) if d)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return _strict(version["schema"]["openAPIV3Schema"])


def schema_errors(objs: list[dict[str, Any]]) -> list[str]:
    """Every object against its schema: Kubernetes kinds by kubernetes-validate (strict), KEDA kinds
    by their CRD (strict), a ScaledJob's jobTargetRef as the batch/v1 JobSpec it is."""
    import jsonschema
    import kubernetes_validate

    errors: list[str] = []

    def k8s(obj: dict[str, Any], what: str) -> None:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{what}: {exc.message} at {'.'.join(str(p) for p in exc.path)}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{what}: no schema ({exc})")

    for obj in objs:
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"].startswith("keda.sh/"):
            for err in jsonschema.Draft4Validator(keda_schema(obj["kind"])).iter_errors(obj):
                errors.append(f"{what}: {err.message} at {'.'.join(str(p) for p in err.absolute_path)}")
            if obj["kind"] == "ScaledJob":
                job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": obj["metadata"]["name"]},
                       "spec": obj["spec"]["jobTargetRef"]}
                k8s(job, f"{what} jobTargetRef")
        else:
            k8s(obj, what)
    return errors


# --------------------------------------------------------------------------- what the service needs
def _pod_problems(objs: list[dict[str, Any]], limit: int) -> list[str]:
    out: list[str] = []
    for what, spec, pod in pod_specs(objs):
        psc = pod.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True or not psc.get("runAsUser"):
            out.append(f"{what}: pod must run as a non-root user (runAsNonRoot, runAsUser)")
        if pod.get("automountServiceAccountToken") is not False:
            out.append(f"{what}: mounts a service account token it never uses")
        worker = False
        for c in pod["containers"]:
            where = f"{what} container {c['name']}"
            csc = c.get("securityContext") or {}
            if (csc.get("allowPrivilegeEscalation") is not False or csc.get("readOnlyRootFilesystem") is not True
                    or "ALL" not in (csc.get("capabilities") or {}).get("drop", [])):
                out.append(f"{where}: needs allowPrivilegeEscalation false, a read-only root, capabilities dropped")
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(res.get(part) or {}):
                    out.append(f"{where}: no cpu and memory {part}")
            if c["image"].split(":")[0].split("/")[-1] == "synthperf-worker-gpu":
                for part in ("requests", "limits"):
                    if int((res.get(part) or {}).get("nvidia.com/gpu", 0)) < 1:
                        out.append(f"{where}: a GPU image without nvidia.com/gpu {part}")
                if not (pod.get("nodeSelector") or {}) or not any(
                        t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations") or []):
                    out.append(f"{what}: GPU pod without a GPU node selector and nvidia.com/gpu toleration")
            if celery_queues(c):
                worker = True
                if what.startswith("Deployment/"):
                    if "inspect ping" not in probe_text(c.get("startupProbe")):
                        out.append(f"{where}: start-up probe is not `celery inspect ping`")
                    for kind in ("livenessProbe", "readinessProbe"):
                        if "celery" in probe_text(c.get(kind)):
                            out.append(f"{where}: {kind} starts celery (a broker round trip per probe)")
        if what.startswith("Deployment/"):
            for c in pod["containers"]:
                for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                    if not c.get(kind):
                        out.append(f"{what} container {c['name']}: no {kind}")
        if worker and int(pod.get("terminationGracePeriodSeconds", 30)) <= limit:
            out.append(f"{what}: terminationGracePeriodSeconds {pod.get('terminationGracePeriodSeconds', 30)} "
                       f"does not exceed the task time limit {limit} s")
        if worker and what.startswith("ScaledJob/") and int(spec.get("activeDeadlineSeconds", 0)) <= limit:
            out.append(f"{what}: activeDeadlineSeconds must exceed the task time limit {limit} s (solo pool)")
    return out


def _service_problems(objs: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    cfg = config_data(objs)
    for svc_name, deploy_name, setting in (("synthperf-dicom", "synthperf-gateway", "SYNTHPERF_SCP_PORT"),
                                           ("synthperf-api", "synthperf-api", "SYNTHPERF_API_PORT")):
        svc = named(objs, "Service", svc_name)
        pod = named(objs, "Deployment", deploy_name)["spec"]["template"]
        ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            target = p["targetPort"]
            number = ports.get(target) if isinstance(target, str) else target
            if number is None or str(number) != cfg.get(setting, ""):
                out.append(f"Service/{svc_name}: port {p['port']} reaches {target!r} = {number}, "
                           f"not the {setting} {cfg.get(setting)}")
        labels = pod["metadata"]["labels"]
        if any(labels.get(k) != v for k, v in svc["spec"]["selector"].items()):
            out.append(f"Service/{svc_name}: selector does not match Deployment/{deploy_name}")
    dicom = named(objs, "Service", "synthperf-dicom")["spec"]
    if dicom.get("type") not in ("NodePort", "LoadBalancer") or dicom.get("externalTrafficPolicy") != "Local":
        out.append("Service/synthperf-dicom: must be NodePort or LoadBalancer with externalTrafficPolicy Local "
                   "(the SCP's allow-list needs the sender's address)")
    return out


def _scaling_problems(objs: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    cfg = config_data(objs)
    consumed: set[str] = set()
    for _what, _spec, pod in pod_specs(objs):
        for c in pod["containers"]:
            consumed |= celery_queues(c)
    if not {QUEUE_CPU, QUEUE_GPU} <= consumed:
        out.append(f"no worker consumes queue(s) {sorted({QUEUE_CPU, QUEUE_GPU} - consumed)}: their tasks would wait forever")
    deployments = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Deployment"}
    for o in objs:
        if not o["apiVersion"].startswith("keda.sh/"):
            continue
        what = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "ScaledObject":
            target = deployments.get(o["spec"]["scaleTargetRef"]["name"])
            if target is None:
                out.append(f"{what}: scales a Deployment that does not exist")
                continue
            if "replicas" in target["spec"]:
                out.append(f"{what}: Deployment/{target['metadata']['name']} sets replicas, which resets KEDA's count")
            pod = target["spec"]["template"]["spec"]
        else:
            pod = o["spec"]["jobTargetRef"]["template"]["spec"]
        queues = set().union(*(celery_queues(c) for c in pod["containers"]))
        for trig in o["spec"]["triggers"]:
            meta = trig["metadata"]
            if trig["type"] != "redis" or meta.get("listName") not in queues:
                out.append(f"{what}: trigger {trig['type']} on {meta.get('listName')!r}, not a queue its pods consume")
            if meta.get("addressFromEnv") not in cfg or not meta.get("passwordFromEnv"):
                out.append(f"{what}: Redis address must come from the ConfigMap and the password from the env")
    for pdb in (o for o in objs if o["kind"] == "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        if not any(all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())
                   for d in deployments.values()):
            out.append(f"PodDisruptionBudget/{pdb['metadata']['name']}: selects no Deployment's pods")
    return out


def _config_problems(objs: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    cfg = config_data(objs)
    for key in cfg:
        if key.startswith("SYNTHPERF_") and key[len("SYNTHPERF_"):].lower() not in Settings.model_fields:
            out.append(f"ConfigMap: {key} is no setting of common/config.py")
    for o in objs:
        if o["kind"] == "Secret" and (o.get("data") or o.get("stringData")):
            out.append(f"Secret/{o['metadata']['name']}: secrets are referenced, never written in the manifests")
    targets = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", (REPO_ROOT / "Dockerfile").read_text(), re.M | re.I))
    tags: dict[str, set[str]] = {}
    for _what, _spec, pod in pod_specs(objs):
        for c in pod["containers"]:
            name, _, tag = c["image"].rpartition(":")
            short = name.split("/")[-1]
            if not short.startswith("synthperf-") or short[len("synthperf-"):] not in targets:
                out.append(f"image {c['image']} is not synthperf-<a Dockerfile target> ({sorted(targets)})")
            tags.setdefault(tag, set()).add(c["image"])
    if len(tags) != 1 or "latest" in tags or "" in tags:
        out.append(f"images must share one release tag (not latest): {sorted(tags)}")
    return out


def problems(objs: list[dict[str, Any]]) -> list[str]:
    limit = task_time_limit(objs)
    return _pod_problems(objs, limit) + _service_problems(objs) + _scaling_problems(objs) + _config_problems(objs)


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_the_schemas(rendered, overlay):
    assert schema_errors(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_gives_the_service_what_it_needs(rendered, overlay):
    assert problems(rendered[overlay]) == []


def test_what_each_overlay_holds(rendered):
    single, cluster, jobs = (rendered[o] for o in OVERLAYS)
    # single node: one worker takes both queues on the CPU, nothing needs KEDA or a GPU
    assert not [o for o in single if o["apiVersion"].startswith("keda.sh/")]
    worker = named(single, "Deployment", "synthperf-worker-cpu")["spec"]["template"]["spec"]["containers"][0]
    assert celery_queues(worker) == {QUEUE_CPU, QUEUE_GPU}
    assert named(single, "Service", "synthperf-dicom")["spec"]["type"] == "NodePort"
    # cluster: a GPU Deployment scaled on "gpu", the CPU one on "cpu", a shared volume for all
    lists = {o["spec"]["scaleTargetRef"]["name"]: o["spec"]["triggers"][0]["metadata"]["listName"]
             for o in cluster if o["kind"] == "ScaledObject"}
    assert lists == {"synthperf-worker-cpu": QUEUE_CPU, "synthperf-worker-gpu": QUEUE_GPU}
    assert named(cluster, "PersistentVolumeClaim", "synthperf-data")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert named(cluster, "Service", "synthperf-dicom")["spec"]["type"] == "LoadBalancer"
    train = named(cluster, "Job", "synthperf-train")["spec"]
    assert train["suspend"] is True and train["completionMode"] == "Indexed"
    assert "torchrun" in train["template"]["spec"]["containers"][0]["args"]
    # cluster-gpu-jobs: the GPU Deployment and its ScaledObject give way to a ScaledJob of one-task workers
    assert not [o for o in jobs if o["metadata"]["name"] == "synthperf-worker-gpu" and o["kind"] != "ScaledJob"]
    sj = named(jobs, "ScaledJob", "synthperf-worker-gpu")["spec"]
    args = sj["jobTargetRef"]["template"]["spec"]["containers"][0]["args"]
    assert "worker.oneshot" in args and args[args.index("--pool") + 1] == "solo"
    assert sj["jobTargetRef"]["template"]["spec"]["restartPolicy"] == "Never"


def test_gateway_replicas_are_named_by_their_pods(rendered):
    """Issue 19: every gateway pod is a named replica (its own serve-<id>.pid on the shared volume, its
    own registry row); the cluster overlays run two of them on a ReadWriteMany volume, rolling."""
    for overlay in OVERLAYS:
        gw = named(rendered[overlay], "Deployment", "synthperf-gateway")
        env = {e["name"]: e for e in gw["spec"]["template"]["spec"]["containers"][0].get("env", [])}
        assert env["SYNTHPERF_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", overlay
        assert "replica_id" in Settings.model_fields
        if overlay == "single-node":
            assert gw["spec"]["replicas"] == 1 and gw["spec"]["strategy"]["type"] == "Recreate"
        else:
            assert gw["spec"]["replicas"] >= 2 and gw["spec"]["strategy"]["type"] == "RollingUpdate", overlay
            pvc = named(rendered[overlay], "PersistentVolumeClaim", "synthperf-data")
            assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], overlay


def test_probes_name_what_the_service_serves(rendered):
    from service.api.routes_ops import router

    # read, not imported: importing worker.k8s would start the worker's Celery app in this process
    alive_file = re.search(r'^ALIVE_FILE = Path\("([^"]+)"\)', (REPO_ROOT / "worker" / "k8s.py").read_text(), re.M)
    assert alive_file is not None
    paths = {r.path for r in router.routes}
    for overlay in OVERLAYS:
        for _what, _spec, pod in pod_specs(rendered[overlay]):
            for c in pod["containers"]:
                for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                    probe = c.get(kind) or {}
                    if "httpGet" in probe:
                        assert probe["httpGet"]["path"] in paths, (c["name"], kind)
                    if "stat -c" in probe_text(probe):
                        assert alive_file.group(1) in probe_text(probe), (c["name"], kind)
                args = c.get("args") or []
                if "-A" in args:
                    module = args[args.index("-A") + 1]
                    assert (REPO_ROOT / (module.replace(".", "/") + ".py")).is_file(), module


def test_yamllint_passes():
    proc = subprocess.run([sys.executable, "-m", "yamllint", "-c", str(K8S_DIR / ".yamllint"), str(K8S_DIR)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _checkov() -> str:
    local = REPO_ROOT / ".venv-checkov" / "bin" / "checkov"
    if local.is_file():
        return str(local)
    found = shutil.which("checkov")
    if found:
        return found
    _missing("checkov is not installed (make test installs it into .venv-checkov)")


def test_checkov_finds_nothing_beyond_the_skip_list(rendered, tmp_path):
    checkov = _checkov()
    for overlay, objs in rendered.items():
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(objs, sort_keys=False))
    proc = subprocess.run(
        [checkov, "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download", "--compact", "--quiet",
         "--skip-check", ",".join(CHECKOV_SKIPS)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


@pytest.fixture
def broken_copy(tmp_path) -> Path:
    """A copy of deploy/k8s to break in a test (the overlays refer to the base by relative path)."""
    dest = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, dest)
    return dest


def test_a_string_port_fails_the_schema(broken_copy):
    gateway = broken_copy / "base" / "gateway.yaml"
    text = gateway.read_text()
    assert "containerPort: 11112" in text
    gateway.write_text(text.replace("containerPort: 11112", 'containerPort: "11112"'))
    errors = schema_errors(kustomize(broken_copy / "overlays" / "cluster"))
    assert any("synthperf-gateway" in e and "containerPort" in e for e in errors), errors


def test_a_missing_probe_and_other_breakage_fail_the_checks(broken_copy, rendered):
    worker = broken_copy / "base" / "worker-cpu.yaml"
    docs = list(yaml.safe_load_all(worker.read_text()))
    del docs[0]["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
    worker.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    found = problems(kustomize(broken_copy / "overlays" / "single-node"))
    assert found == ["Deployment/synthperf-worker-cpu container worker: no livenessProbe"]
    # more breakage on the rendered objects: a short grace period, a GPU pod without its GPU,
    # a queue nobody consumes, a KEDA field that does not exist
    objs = copy.deepcopy(rendered["cluster"])
    gpu = named(objs, "Deployment", "synthperf-worker-gpu")["spec"]["template"]["spec"]
    gpu["terminationGracePeriodSeconds"] = 30
    del gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    args = gpu["containers"][0]["args"]
    args[args.index("-Q") + 1] = "gpux"
    found = problems(objs)
    assert any("terminationGracePeriodSeconds 30" in p for p in found), found
    assert any("without nvidia.com/gpu limits" in p for p in found), found
    assert any("no worker consumes queue(s) ['gpu']" in p for p in found), found
    named(objs, "ScaledObject", "synthperf-worker-cpu")["spec"]["minReplicas"] = 1
    assert any("minReplicas" in e for e in schema_errors(objs))

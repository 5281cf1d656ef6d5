"""Static checks of the deployment files: deploy/kubernetes, deploy/Dockerfile and
deploy/sagemaker/iam-policy.json.

    python3 -m pip install -e './deploy[test]'
    python3 -m pytest -q deploy/tests/test_manifests.py

- Every Kubernetes manifest validates, strictly (unknown fields are errors),
  against the Kubernetes API schemas of kubernetes-validate for the oldest and
  newest versions below; a deliberately broken manifest is rejected (the
  validator is live). The kustomization lists every manifest.
- The manifests agree with each other, with the Dockerfile and with sdserve:
  GPU request, /ping probes on the container port, grace period above
  SDSERVE_SHUTDOWN_GRACE, the image's non-root UID, writable scratch on a
  read-only root filesystem, shared S3 storage, the HPA's metric.
- checkov (pinned, in its own virtual environment: its pins conflict with
  boto3 1.43.11 and pytest 9.2.0, see pyproject.toml) runs every check of its
  dockerfile, kubernetes and cloudformation frameworks. No check may fail, and
  the checks skipped by inline comments (each with its reason) must be exactly
  EXPECTED_SKIPS, so a new skip is a reviewed change of this file. checkov has no
  checks for a bare IAM policy document, so the policy (as rendered by
  `python -m sdserve_sagemaker policy`, and the raw template) is wrapped in a
  CloudFormation template for its IAM checks.

The checkov environment is created on first use (about 30 s and 300 MB, needs
PyPI) under ~/.cache/sdserve/ (or $SDSERVE_CHECKOV_VENV) and reused.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent
REPO = DEPLOY.parent
K8S = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"

# The oldest Kubernetes minor version the manifests must work on, and the newest
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ["1.29", kubernetes_validate.latest_version()]
CHECKOV_VERSION = "3.3.30"
# Files in deploy/kubernetes that kustomization.yaml deliberately leaves out.
NOT_IN_KUSTOMIZATION = {"kustomization.yaml", "model-download-job.yaml"}

# (file relative to the repository, check id) for every inline checkov skip. Reasons
# are next to each skip: deploy/Dockerfile comments, checkov.io/skip annotations.
EXPECTED_SKIPS = {
    "dockerfile": {
        ("deploy/Dockerfile", "CKV_DOCKER_3"),  # root for SageMaker
        ("deploy/Dockerfile", "CKV_DOCKER_7"),  # base image is a build arg
    },
    "kubernetes": {
        ("deploy/kubernetes/deployment.yaml", "CKV_K8S_43"),  # digest set by kustomize
        ("deploy/kubernetes/deployment.yaml", "CKV_K8S_35"),  # S3 keys only as env
        ("deploy/kubernetes/model-download-job.yaml", "CKV_K8S_43"),
        ("deploy/kubernetes/model-download-job.yaml", "CKV_K8S_35"),  # HF_TOKEN
    },
    "cloudformation": set(),
}


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(path: Path, kind: str) -> dict:
    docs = [d for d in load_all(path) if d["kind"] == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def deployment() -> dict:
    return one(K8S / "deployment.yaml", "Deployment")


def configmap() -> dict:
    return one(K8S / "configmap.yaml", "ConfigMap")["data"]


def container(workload: dict, name: str) -> dict:
    (c,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


# --- schema ---------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_is_schema_valid(path: Path, version: str) -> None:
    docs = load_all(path)
    assert docs, f"{path.name} holds no manifest"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {e}")


def test_schema_validation_rejects_broken_manifests() -> None:
    version = KUBERNETES_VERSIONS[-1]
    good = deployment()
    kubernetes_validate.validate(good, version, strict=True)

    typo = copy.deepcopy(good)
    c = container(typo, "sdserve")
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, version, strict=True)

    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, version, strict=True)

    hpa = one(K8S / "hpa.yaml", "HorizontalPodAutoscaler")
    del hpa["spec"]["scaleTargetRef"]["name"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, version, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    present = {p.name for p in K8S.glob("*.yaml")} - NOT_IN_KUSTOMIZATION
    assert set(listed) == present
    namespace = kustomization["namespace"]
    for path in manifest_files():
        for doc in load_all(path):
            if doc["kind"] == "Namespace":
                assert doc["metadata"]["name"] == namespace
            else:
                assert doc["metadata"]["namespace"] == namespace, path.name
    # The images entry rewrites the image the workloads name.
    (image,) = kustomization["images"]
    for path, kind, name in [
        (K8S / "deployment.yaml", "Deployment", "sdserve"),
        (K8S / "model-download-job.yaml", "Job", "download"),
    ]:
        assert container(one(path, kind), name)["image"].split(":")[0] == image["name"]


# --- consistency ----------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_contract() -> None:
    ins = dockerfile_instructions()
    first = {k: v for k, v in reversed(ins)}  # first occurrence of each
    last = dict(ins)
    assert re.search(r"^BASE_IMAGE=nvidia/cuda:[\w.]+-runtime-", first["ARG"]), first["ARG"]
    assert first["FROM"] == "${BASE_IMAGE}"
    # Exec form, so SIGTERM reaches sdserve; `docker run IMAGE serve` as SageMaker runs it.
    assert json.loads(last["ENTRYPOINT"]) == ["/usr/local/bin/sdserve"]
    assert json.loads(last["CMD"]) == ["serve"]
    assert "8080" in last["EXPOSE"].split()
    labels = " ".join(v for k, v in ins if k == "LABEL")
    assert "com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true" in labels
    assert "USER" not in last, "SageMaker runs the image as root"
    assert "/ping" in last["HEALTHCHECK"]
    run = " ".join(v for k, v in ins if k == "RUN")
    assert "ca-certificates" in run


def test_deployment_runs_as_the_image_user() -> None:
    uid = int(re.search(r"useradd [^&]*--uid (\d+)", DOCKERFILE.read_text().replace("\\\n", " ")).group(1))
    workdir = dict(dockerfile_instructions())["WORKDIR"]
    d = deployment()
    pod = d["spec"]["template"]["spec"]
    c = container(d, "sdserve")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    assert c["securityContext"]["runAsUser"] == uid
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # With a read-only root, what sdserve writes needs volumes: the working
    # directory (relative paths, HF cache default) and /tmp.
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in (workdir, "/tmp"):
        assert path in mounts, f"no writable volume at {path}"
        assert "emptyDir" in volumes[mounts[path]["name"]]


def test_deployment_gpu_probes_and_shutdown() -> None:
    d = deployment()
    pod = d["spec"]["template"]["spec"]
    c = container(d, "sdserve")
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    (port,) = c["ports"]
    assert port["containerPort"] == 8080
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/ping" and get["port"] in (port["name"], 8080), probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "a real model loads for minutes"
    # The kubelet's SIGKILL must come after sdserve's own grace (plus the preStop pause).
    grace = int(configmap()["SDSERVE_SHUTDOWN_GRACE"])
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + grace + 10
    # The Service reaches these pods on that port.
    svc = one(K8S / "service.yaml", "Service")
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in (port["name"], 8080)
    assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_replicas_share_s3_storage_and_a_read_only_model() -> None:
    env = configmap()
    assert env["SDSERVE_STORAGE"].startswith("s3://"), "replicas must share one bucket"
    assert env["SDSERVE_DEVICE"] == "cuda"
    d = deployment()
    c = container(d, "sdserve")
    assert {"configMapRef": {"name": "sdserve"}} in c["envFrom"]
    # The model: offline from the HF cache on the read-only PVC mount.
    assert env["HF_HUB_OFFLINE"] == "1"
    (model_mount,) = [m for m in c["volumeMounts"] if m["name"] == "model"]
    assert model_mount["readOnly"] is True
    assert env["HF_HOME"].startswith(model_mount["mountPath"] + "/")
    (volume,) = [v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "model"]
    pvc = one(K8S / "model-pvc.yaml", "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    # The download job fills the same cache the pods read.
    job = one(K8S / "model-download-job.yaml", "Job")
    jc = container(job, "download")
    assert jc["args"][0] == "download"
    (job_volume,) = [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "model"]
    assert job_volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    (job_mount,) = [m for m in jc["volumeMounts"] if m["name"] == "model"]
    assert job_mount["mountPath"] == model_mount["mountPath"]


def test_hpa_scales_the_deployment_on_queue_depth() -> None:
    hpa = one(K8S / "hpa.yaml", "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment()["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "sdserve_queue_depth"
    # The name sdserve exports (its own unit test renders it).
    assert "sdserve_queue_depth" in (REPO / "src/metrics.rs").read_text()
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


# --- checkov --------------------------------------------------------------


@pytest.fixture(scope="session")
def checkov() -> Path:
    """checkov from deploy/requirements-checkov.txt in its own virtual environment."""
    req = DEPLOY / "requirements-checkov.txt"
    digest = hashlib.sha256(req.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = Path(os.environ.get("SDSERVE_CHECKOV_VENV") or cache / "sdserve" / f"checkov-{digest}")
    exe = root / "bin" / "checkov"
    done = root / ".sdserve-complete"
    root.parent.mkdir(parents=True, exist_ok=True)
    # One creator at a time; a half-made environment (interrupted run) is redone.
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            try:
                subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, capture_output=True, text=True)
                subprocess.run(
                    [str(root / "bin" / "python"), "-m", "pip", "install", "-q", "-r", str(req)],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=900,
                )
            except subprocess.CalledProcessError as e:
                shutil.rmtree(root, ignore_errors=True)
                pytest.fail(
                    f"could not create checkov's virtual environment at {root} "
                    f"({' '.join(e.cmd)}): {e.stderr.strip()[-2000:]}\n"
                    "(needs PyPI, and python3-venv on Debian's system Python)"
                )
            done.write_text(req.read_text())
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True).stdout.strip()
    assert version == CHECKOV_VERSION, f"{exe} is checkov {version!r}, expected {CHECKOV_VERSION}"
    return exe


def run_checkov(exe: Path, framework: str, args: list[str]) -> dict:
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", LOG_LEVEL="WARNING")
    proc = subprocess.run(
        [str(exe), "--framework", framework, "--output", "json", "--compact", "--skip-download", "--soft-fail", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"checkov failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    (report,) = [r for r in reports if r.get("check_type") == framework]
    return report


def iam_template(tmp_path: Path) -> Path:
    """The execution-role policy, rendered by `python -m sdserve_sagemaker policy`
    and as the raw template, attached to a role in a CloudFormation template."""
    rendered = tmp_path / "policy.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sdserve_sagemaker",
            "policy",
            "--image", "123456789012.dkr.ecr.us-east-1.amazonaws.com/sdserve:0.1.0",
            "--bucket", "my-bucket",
            "--prefix", "sdserve",
            "--images", "s3://my-images/sdserve",
            "--sns-topic", "arn:aws:sns:us-east-1:123456789012:sdserve-done",
            "--output", str(rendered),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole"}
        ],
    }
    raw = json.loads((DEPLOY / "sagemaker" / "iam-policy.json").read_text())
    template = {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Resources": {
            "ExecutionRole": {"Type": "AWS::IAM::Role", "Properties": {"AssumeRolePolicyDocument": trust}},
            "RenderedPolicy": {
                "Type": "AWS::IAM::Policy",
                "Properties": {
                    "PolicyName": "sdserve",
                    "Roles": [{"Ref": "ExecutionRole"}],
                    "PolicyDocument": json.loads(rendered.read_text()),
                },
            },
            "TemplatePolicy": {
                "Type": "AWS::IAM::Policy",
                "Properties": {"PolicyName": "sdserve-template", "Roles": [{"Ref": "ExecutionRole"}], "PolicyDocument": raw},
            },
        },
    }
    path = tmp_path / "iam-policy.cfn.json"
    path.write_text(json.dumps(template, indent=1))
    return path


@pytest.mark.parametrize("framework", ["dockerfile", "kubernetes", "cloudformation"])
def test_checkov(checkov: Path, framework: str, tmp_path: Path) -> None:
    if framework == "dockerfile":
        args = ["--file", "deploy/Dockerfile"]
    elif framework == "kubernetes":
        args = ["--directory", "deploy/kubernetes"]
    else:
        args = ["--file", str(iam_template(tmp_path))]
    report = run_checkov(checkov, framework, args)
    summary = report["summary"]
    results = report["results"]
    failed = [
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']}:{c['file_line_range']})"
        for c in results["failed_checks"]
    ]
    assert not failed, "checkov findings:\n" + "\n".join(failed)
    assert summary["parsing_errors"] == 0, summary
    assert summary["passed"] >= 10, f"checkov ran almost nothing: {summary}"
    skipped = results["skipped_checks"]
    for c in skipped:
        reason = (c.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason) > 20, f"{c['check_id']} on {c['resource']} is skipped without a real reason: {reason!r}"
    got = {(c["file_path"].lstrip("/"), c["check_id"]) for c in skipped}
    assert got == EXPECTED_SKIPS[framework], f"skipped checks changed: {sorted(got)}"

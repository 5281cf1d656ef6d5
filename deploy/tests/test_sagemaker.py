"""Tests for the SageMaker tool (`python -m sdserve_sagemaker`) against a real
moto_server on loopback.

moto stands in for SageMaker, S3, Application Auto Scaling, CloudWatch and SNS.
It runs no container, so endpoints are InService at once and `invoke` gets the
canned answers queued through moto's /moto-api/static/sagemaker/* routes: that
tests the tool's side of invoke (request upload, async S3 polling, decoding,
files written), not sdserve itself.

The package is imported as installed (`pip install -e './deploy[test]'`, which
tools/test does) or from PYTHONPATH=deploy/sagemaker; it must be this checkout's.

Run: python -m pytest -q deploy/tests/test_sagemaker.py
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent
SAGEMAKER = DEPLOY / "sagemaker"
TINY_SD = DEPLOY.parent / "tests" / "fixtures" / "tiny-sd1"
# The tool as a user runs it, in its own process (same interpreter and environment).
COMMAND = [sys.executable, "-m", "sdserve_sagemaker"]

try:
    import sdserve_sagemaker as sm_cli
except ModuleNotFoundError as e:
    if e.name != "sdserve_sagemaker":
        raise
    raise ImportError("sdserve_sagemaker is not importable: pip install -e './deploy[test]' "
                      "(or PYTHONPATH=deploy/sagemaker)") from e
if Path(sm_cli.__file__).resolve().parent != SAGEMAKER / "sdserve_sagemaker":
    raise ImportError(f"sdserve_sagemaker comes from {sm_cli.__file__}, not from this checkout's "
                      f"{SAGEMAKER / 'sdserve_sagemaker'}: pip install -e './deploy[test]' (editable)")

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/sdserve:0.1.0"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/sdserve-sagemaker"
BUCKET = "sdserve-test"
ROOT = f"s3://{BUCKET}/sdserve"
# moto 5.2 validates instance types against an old list without ml.g5.*.
INSTANCE = "ml.g4dn.xlarge"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + b"not really a png"

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_REGION": REGION,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


# --------------------------------------------------------------------------
# fixtures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_url(tmp_path_factory):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logfile = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **AWS_ENV},
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited with {proc.returncode}: {logfile.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"moto_server did not answer on {url}: {logfile.read_text()[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def moto_post(url: str, path: str, body: dict | None = None) -> None:
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(f"{url}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status in (200, 201), r.status


@pytest.fixture
def aws(moto_url, monkeypatch):
    """A clean moto (reset per test), AWS env pointing at it, and boto3 clients."""
    import boto3

    moto_post(moto_url, "/moto-api/reset")
    for k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)

    class Clients:
        url = moto_url

        def __getattr__(self, service):
            name = {"autoscaling": "application-autoscaling", "runtime": "sagemaker-runtime"}.get(service, service)
            return boto3.client(name, region_name=REGION, endpoint_url=moto_url)

    c = Clients()
    c.s3.create_bucket(Bucket=BUCKET)
    return c


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A fake diffusers folder: model_index.json, component folders, a hidden
    folder that must be left out, and a symlink (as in the HF cache) that must be
    stored as the file it points to."""
    d = tmp_path / "fake-sd"
    (d / "unet").mkdir(parents=True)
    (d / "vae").mkdir()
    (d / ".git").mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (d / "unet" / "config.json").write_text("{}")
    (d / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(4096))
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (d / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    blob = tmp_path / "blobs" / "abc123"
    blob.parent.mkdir()
    blob.write_bytes(b"vae weights")
    (d / "vae" / "diffusion_pytorch_model.safetensors").symlink_to(blob)
    return d


def cli(*argv: str) -> int:
    return sm_cli.main([str(a) for a in argv])


def run_script(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The tool as a user runs it, in its own process."""
    return subprocess.run([*COMMAND, *map(str, argv)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def deploy_args(name: str, mode: str, model: str, *extra: str) -> list[str]:
    return ["deploy", "--name", name, "--mode", mode, "--image", IMAGE, "--role", ROLE,
            "--model", model, "--s3-root", ROOT, "--instance-type", INSTANCE,
            "--poll-interval", "0.05", "--wait-timeout", "10", *extra]


def upload_archive(aws, folder: Path, tmp_path: Path, key: str = "sdserve/model/shared/model.tar.gz") -> str:
    archive, _, _ = sm_cli.package_model(folder, tmp_path / "upload" / "model.tar.gz")
    aws.s3.upload_file(str(archive), BUCKET, key)
    return f"s3://{BUCKET}/{key}"


def alarms_of(aws, name: str) -> dict[str, dict]:
    return {a["AlarmName"]: a for a in aws.cloudwatch.describe_alarms()["MetricAlarms"]
            if a["AlarmName"].startswith(f"{name}-")}


def policies_of(aws, name: str) -> dict[str, dict]:
    rid = f"endpoint/{name}/variant/AllTraffic"
    return {p["PolicyName"]: p for p in aws.autoscaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
            if p["ResourceId"] == rid}


def targets_of(aws, name: str) -> list[dict]:
    rid = f"endpoint/{name}/variant/AllTraffic"
    return [t for t in aws.autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
            if t["ResourceId"] == rid]


# --------------------------------------------------------------------------
# package


def test_package_puts_files_at_archive_root(model_dir, tmp_path):
    out, count, _ = sm_cli.package_model(model_dir, tmp_path / "model.tar.gz")
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {
            "model_index.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        }
        assert count == 4
        assert all(m.isfile() for m in members.values())  # the symlink became its file
        assert tar.extractfile("vae/diffusion_pytorch_model.safetensors").read() == b"vae weights"


def test_package_cli_with_the_tiny_fixture(tmp_path, capsys):
    if not (TINY_SD / "model_index.json").is_file():
        pytest.skip("tests/fixtures/tiny-sd1 not present")
    out = tmp_path / "tiny.tar.gz"
    assert cli("package", "--model-dir", TINY_SD, "--output", out, "--exclude", "*.md") == 0
    expected = sorted(p.relative_to(TINY_SD).as_posix() for p in TINY_SD.rglob("*")
                      if p.is_file() and not p.name.startswith(".") and p.suffix != ".md")
    with tarfile.open(out) as tar:
        assert sorted(tar.getnames()) == expected
    assert "model_index.json" in expected
    assert f"wrote {out}" in capsys.readouterr().out


# --------------------------------------------------------------------------
# deploy


def test_deploy_realtime_from_a_folder(aws, model_dir, capsys):
    assert cli(*deploy_args("sd-rt", "realtime", str(model_dir), "--max-instances", "3",
                            "--queue-capacity", "8", "--max-pixels", "1048576",
                            "--storage", f"s3://{BUCKET}/sdserve/images",
                            "--env", "RUST_LOG=info")) == 0
    out = capsys.readouterr().out
    assert "InService" in out

    # the folder was packaged and uploaded under the --s3-root layout
    key = "sdserve/model/sd-rt/model.tar.gz"
    body = aws.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    archive = model_dir.parent / "downloaded.tar.gz"
    archive.write_bytes(body)
    with tarfile.open(archive) as tar:
        assert "model_index.json" in tar.getnames()

    assert aws.sagemaker.describe_endpoint(EndpointName="sd-rt")["EndpointStatus"] == "InService"
    model = aws.sagemaker.describe_model(ModelName="sd-rt-model")
    assert model["ExecutionRoleArn"] == ROLE
    container = model["PrimaryContainer"]
    assert container["Image"] == IMAGE
    assert container["ModelDataUrl"] == f"s3://{BUCKET}/{key}"
    assert container["Environment"] == {
        "SDSERVE_DEVICE": "cuda",
        "SDSERVE_LOG_FORMAT": "json",
        "SDSERVE_QUEUE_CAPACITY": "8",
        "SDSERVE_MAX_PIXELS": "1048576",
        "SDSERVE_STORAGE": f"s3://{BUCKET}/sdserve/images",
        "AWS_REGION": REGION,  # added for the S3 storage
        "RUST_LOG": "info",
    }

    config = aws.sagemaker.describe_endpoint_config(EndpointConfigName="sd-rt-config")
    assert not config.get("AsyncInferenceConfig")
    (variant,) = config["ProductionVariants"]
    assert variant["InstanceType"] == INSTANCE
    assert variant["ModelName"] == "sd-rt-model"
    assert variant["InitialInstanceCount"] == 1
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 900

    (target,) = targets_of(aws, "sd-rt")
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 3)
    assert target["ScalableDimension"] == "sagemaker:variant:DesiredInstanceCount"
    policies = policies_of(aws, "sd-rt")
    assert set(policies) == {"sd-rt-invocations-target"}
    tt = policies["sd-rt-invocations-target"]["TargetTrackingScalingPolicyConfiguration"]
    assert tt["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"

    alarms = alarms_of(aws, "sd-rt")
    assert {a: alarms[a]["MetricName"] for a in alarms} == {
        "sd-rt-invocation-5xx-errors": "Invocation5XXErrors",
        "sd-rt-invocation-4xx-errors": "Invocation4XXErrors",
        "sd-rt-model-latency": "ModelLatency",
    }
    for a in alarms.values():
        assert a["Namespace"] == "AWS/SageMaker"
        assert {d["Name"]: d["Value"] for d in a["Dimensions"]} == {"EndpointName": "sd-rt", "VariantName": "AllTraffic"}
    assert alarms["sd-rt-model-latency"]["Threshold"] == 30e6  # microseconds


def test_deploy_async_from_s3(aws, model_dir, tmp_path):
    model_uri = upload_archive(aws, model_dir, tmp_path)
    ok = aws.sns.create_topic(Name="sdserve-done")["TopicArn"]
    failed = aws.sns.create_topic(Name="sdserve-failed")["TopicArn"]
    alarm_topic = aws.sns.create_topic(Name="sdserve-alarms")["TopicArn"]
    assert cli(*deploy_args("sd-async", "async", model_uri, "--max-concurrent", "2",
                            "--success-topic", ok, "--error-topic", failed,
                            "--alarm-topic", alarm_topic, "--max-instances", "4")) == 0

    assert aws.sagemaker.describe_endpoint(EndpointName="sd-async")["EndpointStatus"] == "InService"
    assert aws.sagemaker.describe_model(ModelName="sd-async-model")["PrimaryContainer"]["ModelDataUrl"] == model_uri
    config = aws.sagemaker.describe_endpoint_config(EndpointConfigName="sd-async-config")
    ac = config["AsyncInferenceConfig"]
    assert ac["OutputConfig"]["S3OutputPath"] == f"{ROOT}/async-output/sd-async"
    assert ac["OutputConfig"]["S3FailurePath"] == f"{ROOT}/async-failure/sd-async"
    assert ac["OutputConfig"]["NotificationConfig"] == {"SuccessTopic": ok, "ErrorTopic": failed}
    assert ac["ClientConfig"]["MaxConcurrentInvocationsPerInstance"] == 2

    arn = aws.sagemaker.describe_endpoint(EndpointName="sd-async")["EndpointArn"]
    tags = {t["Key"]: t["Value"] for t in aws.sagemaker.list_tags(ResourceArn=arn)["Tags"]}
    assert tags["sdserve:async-input"] == f"{ROOT}/async-input/sd-async"

    (target,) = targets_of(aws, "sd-async")
    assert (target["MinCapacity"], target["MaxCapacity"]) == (0, 4)  # scale to zero

    policies = policies_of(aws, "sd-async")
    assert set(policies) == {"sd-async-backlog-target", "sd-async-scale-out-from-zero"}
    tt = policies["sd-async-backlog-target"]
    assert tt["PolicyType"] == "TargetTrackingScaling"
    metric = tt["TargetTrackingScalingPolicyConfiguration"]["CustomizedMetricSpecification"]
    assert metric["MetricName"] == "ApproximateBacklogSizePerInstance"
    assert metric["Namespace"] == "AWS/SageMaker"
    assert metric["Dimensions"] == [{"Name": "EndpointName", "Value": "sd-async"}]
    step = policies["sd-async-scale-out-from-zero"]
    assert step["PolicyType"] == "StepScaling"
    assert step["StepScalingPolicyConfiguration"]["StepAdjustments"] == [
        {"MetricIntervalLowerBound": 0.0, "ScalingAdjustment": 1}]

    alarms = alarms_of(aws, "sd-async")
    assert {a: alarms[a]["MetricName"] for a in alarms} == {
        "sd-async-invocation-5xx-errors": "Invocation5XXErrors",
        "sd-async-invocation-4xx-errors": "Invocation4XXErrors",
        "sd-async-model-latency": "ModelLatency",
        "sd-async-has-backlog-without-capacity": "HasBacklogWithoutCapacity",
    }
    backlog = alarms["sd-async-has-backlog-without-capacity"]
    assert backlog["AlarmActions"] == [step["PolicyARN"]]
    assert backlog["Dimensions"] == [{"Name": "EndpointName", "Value": "sd-async"}]
    assert alarms["sd-async-invocation-5xx-errors"]["AlarmActions"] == [alarm_topic]


def test_deploy_refuses_to_overwrite(aws, model_dir, tmp_path, capsys):
    model_uri = upload_archive(aws, model_dir, tmp_path)
    assert cli(*deploy_args("sd-twice", "realtime", model_uri)) == 0
    capsys.readouterr()
    assert cli(*deploy_args("sd-twice", "realtime", model_uri)) == 2
    assert "already exist" in capsys.readouterr().err


def test_moto_rejects_g5_and_the_error_is_clean(aws, model_dir, tmp_path, capsys):
    """ml.g5.xlarge (the documented default) is valid on AWS but not in moto 5.2's
    list; the CreateEndpointConfig error comes back as a message, with a teardown hint."""
    model_uri = upload_archive(aws, model_dir, tmp_path)
    args = deploy_args("sd-g5", "realtime", model_uri)
    args[args.index("--instance-type") + 1] = "ml.g5.xlarge"
    assert cli(*args) == 1
    err = capsys.readouterr().err
    assert "CreateEndpointConfig failed: ValidationException" in err
    assert "teardown --name sd-g5" in err
    assert cli("teardown", "--name", "sd-g5") == 0  # removes the model created before the failure
    assert aws.sagemaker.list_models()["Models"] == []


# --------------------------------------------------------------------------
# teardown


def test_teardown_removes_everything_and_is_idempotent(aws, model_dir, tmp_path, capsys):
    model_uri = upload_archive(aws, model_dir, tmp_path)
    assert cli(*deploy_args("sd", "realtime", model_uri)) == 0
    assert cli(*deploy_args("sd-async", "async", model_uri)) == 0  # shares the "sd-" prefix
    capsys.readouterr()

    assert cli("teardown", "--name", "sd-async") == 0
    out = capsys.readouterr().out
    assert "deleted endpoint sd-async" in out

    sm = aws.sagemaker
    assert [e["EndpointName"] for e in sm.list_endpoints()["Endpoints"]] == ["sd"]
    assert [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]] == ["sd-config"]
    assert [m["ModelName"] for m in sm.list_models()["Models"]] == ["sd-model"]
    assert targets_of(aws, "sd-async") == [] and policies_of(aws, "sd-async") == {}
    assert not [a for a in alarms_of(aws, "sd-async")]
    assert len(alarms_of(aws, "sd")) == 3 and targets_of(aws, "sd")  # the other deployment is untouched

    assert cli("teardown", "--name", "sd") == 0
    assert sm.list_endpoints()["Endpoints"] == []
    assert sm.list_endpoint_configs()["EndpointConfigs"] == []
    assert sm.list_models()["Models"] == []
    assert aws.autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert aws.autoscaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"] == []
    assert aws.cloudwatch.describe_alarms()["MetricAlarms"] == []
    with pytest.raises(aws.sagemaker.exceptions.ClientError, match="Could not find endpoint"):
        sm.describe_endpoint(EndpointName="sd")
    capsys.readouterr()

    # twice is fine, and so is a name that never existed
    assert cli("teardown", "--name", "sd") == 0
    assert "nothing to delete for sd" in capsys.readouterr().out
    proc = run_script("teardown", "--name", "never-deployed", env={"AWS_ENDPOINT_URL": aws.url})
    assert proc.returncode == 0, proc.stderr
    assert "nothing to delete" in proc.stdout


def test_teardown_of_a_half_made_deployment(aws, model_dir, tmp_path, monkeypatch):
    """Only a model exists (deploy died early): teardown still cleans it up.
    Also: --endpoint-url works without AWS_ENDPOINT_URL."""
    model_uri = upload_archive(aws, model_dir, tmp_path)
    aws.sagemaker.create_model(ModelName="half-model", ExecutionRoleArn=ROLE,
                               PrimaryContainer={"Image": IMAGE, "ModelDataUrl": model_uri})
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert cli("teardown", "--name", "half", "--endpoint-url", aws.url) == 0
    assert aws.sagemaker.list_models()["Models"] == []


# --------------------------------------------------------------------------
# invoke


def queue_result(url: str, kind: str, result: dict) -> None:
    moto_post(url, f"/moto-api/static/sagemaker/{kind}", {"account_id": ACCOUNT, "region": REGION, "results": [result]})


def sdserve_json(*images: bytes) -> str:
    return json.dumps({"generated_images": [base64.b64encode(i).decode() for i in images],
                       "content_type": "image/png", "seeds": list(range(len(images)))})


def test_invoke_realtime_against_moto_canned_answer(aws, model_dir, tmp_path):
    model_uri = upload_archive(aws, model_dir, tmp_path)
    assert cli(*deploy_args("sd-rt", "realtime", model_uri)) == 0
    queue_result(aws.url, "endpoint-results", {"Body": sdserve_json(PNG, PNG + b"2"), "ContentType": "application/json",
                                               "InvokedProductionVariant": "AllTraffic", "CustomAttributes": ""})
    out = tmp_path / "img.png"
    assert cli("invoke", "--name", "sd-rt", "--prompt", "a red fox", "--num-images", "2", "--seed", "7",
               "--output", out) == 0
    assert (tmp_path / "img-1.png").read_bytes() == PNG
    assert (tmp_path / "img-2.png").read_bytes() == PNG + b"2"


def test_invoke_async_uploads_request_and_collects_result(aws, model_dir, tmp_path):
    model_uri = upload_archive(aws, model_dir, tmp_path)
    assert cli(*deploy_args("sd-async", "async", model_uri)) == 0
    queue_result(aws.url, "async-endpoint-results", {"data": sdserve_json(PNG)})
    out = tmp_path / "async.png"
    assert cli("invoke", "--name", "sd-async", "--prompt", "a red fox", "--steps", "20", "--accept", "json",
               "--output", out, "--poll-interval", "0.05", "--timeout", "10") == 0
    assert out.read_bytes() == PNG
    # the request went to the async-input prefix from the endpoint's tag
    listed = aws.s3.list_objects_v2(Bucket=BUCKET, Prefix="sdserve/async-input/sd-async/")["Contents"]
    (obj,) = listed
    request = json.loads(aws.s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read())
    assert request == {"prompt": "a red fox", "num_inference_steps": 20}


def test_async_polling_waits_for_a_late_result(aws):
    """The S3 polling of async invoke: the output object appears only later."""
    out_uri, fail_uri = f"{ROOT}/async-output/x/1.out", f"{ROOT}/async-failure/x/1-error.out"

    def later():
        time.sleep(0.4)
        aws.s3.put_object(Bucket=BUCKET, Key="sdserve/async-output/x/1.out", Body=PNG, ContentType="image/png")

    t = threading.Thread(target=later)
    t.start()
    started = time.monotonic()
    data, ctype = sm_cli.wait_for_async_result(aws.s3, out_uri, fail_uri, timeout=10, poll_interval=0.05)
    t.join()
    assert data == PNG and ctype == "image/png"
    assert time.monotonic() - started >= 0.35


def test_async_polling_reports_failure_and_timeout(aws):
    s3 = aws.s3
    out_uri, fail_uri = f"{ROOT}/async-output/x/2.out", f"{ROOT}/async-failure/x/2-error.out"
    s3.put_object(Bucket=BUCKET, Key="sdserve/async-failure/x/2-error.out",
                  Body=b'{"error": "width must be a multiple of 8"}')
    with pytest.raises(sm_cli.Failure, match="width must be a multiple of 8"):
        sm_cli.wait_for_async_result(s3, out_uri, fail_uri, timeout=5, poll_interval=0.05)

    sleeps = []
    with pytest.raises(sm_cli.Failure, match="no result after 0.3s; it may still arrive at s3://"):
        sm_cli.wait_for_async_result(s3, f"{ROOT}/async-output/x/3.out", f"{ROOT}/async-failure/x/3-error.out",
                                     timeout=0.3, poll_interval=0.1, sleep=lambda s: (sleeps.append(s), time.sleep(s)))
    assert sleeps and all(s == 0.1 for s in sleeps)


def test_write_images_handles_each_response_kind(tmp_path):
    assert sm_cli.write_images(PNG, "image/png", tmp_path / "a.png") == [tmp_path / "a.png"]
    assert (tmp_path / "a.png").read_bytes() == PNG
    paths = sm_cli.write_images(sdserve_json(PNG, PNG).encode(), "application/json", tmp_path / "b.png")
    assert [p.name for p in paths] == ["b-1.png", "b-2.png"]
    with pytest.raises(sm_cli.Failure, match="neither an image"):
        sm_cli.write_images(b'{"message": "model is loading"}', "application/json", tmp_path / "c.png")


# --------------------------------------------------------------------------
# bad inputs: exit code 2, one clear line, no traceback


BAD_INPUTS = {
    "folder without model_index.json": (["--model", "{empty}"], "has no model_index.json"),
    "missing folder": (["--model", "{tmp}/no-such-folder"], "does not exist"),
    "bad role ARN": (["--role", "sdserve-role"], "is not an IAM role ARN"),
    "image outside ECR": (["--image", "docker.io/library/sdserve:latest"], "is not an Amazon ECR image URI"),
    "bad name": (["--name", "sd_serve!"], "--name 'sd_serve!' is not usable"),
    "model not a tar.gz": (["--model", f"s3://{BUCKET}/m/model.zip"], "must be a model.tar.gz object"),
    "missing S3 model": (["--model", f"s3://{BUCKET}/nothing/model.tar.gz"], "no such object"),
    "missing bucket for upload": (["--s3-root", "s3://no-such-bucket-here/p"], "does not exist or is not yours"),
    "real-time at zero": (["--min-instances", "0"], "use --mode async to scale to zero"),
    "async options on real-time": (["--success-topic", f"arn:aws:sns:{REGION}:{ACCOUNT}:t"], "need --mode async"),
    "bad env": (["--env", "NOEQUALS"], "expected KEY=VALUE"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_deploy_bad_inputs_exit_2_without_traceback(aws, model_dir, tmp_path, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    overrides, message = BAD_INPUTS[case]
    overrides = [o.format(empty=empty, tmp=tmp_path) for o in overrides]
    args = deploy_args("sd", "realtime", str(model_dir))
    for flag, value in zip(overrides[::2], overrides[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    proc = run_script(*args, env={"AWS_ENDPOINT_URL": aws.url})
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert aws.sagemaker.list_models()["Models"] == []  # nothing was created


def test_other_commands_bad_inputs(aws, tmp_path):
    env = {"AWS_ENDPOINT_URL": aws.url}
    cases = [
        (["package", "--model-dir", tmp_path], "has no model_index.json"),
        (["invoke", "--name", "not-deployed", "--prompt", "x"], "no endpoint named 'not-deployed'"),
        (["invoke", "--name", "sd"], "give --prompt"),
        (["policy", "--bucket", BUCKET, "--prefix", "sdserve"], "give --image URI, or --account-id"),
        (["policy", "--bucket", "Bad_Bucket", "--prefix", "p", "--image", IMAGE], "not a valid S3 bucket name"),
        (["policy", "--bucket", BUCKET, "--prefix", "p", "--image", IMAGE, "--sns-topic", "nope"], "not an SNS topic ARN"),
        (["teardown", "--name", "x_y"], "is not usable"),
    ]
    for argv, message in cases:
        proc = run_script(*argv, env=env)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr and message in proc.stderr, (argv, proc.stderr)
    proc = run_script("deploy", "--name", "x", env=env)  # argparse: missing required options
    assert proc.returncode == 2 and "required" in proc.stderr and "Traceback" not in proc.stderr


def test_no_credentials_is_a_clean_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_REGION=REGION, AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
               AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL="http://127.0.0.1:9")
    proc = subprocess.run([*COMMAND, "teardown", "--name", "sd"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "no AWS credentials" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------
# IAM policy


def walk_statements(doc):
    for st in doc["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        yield st, actions, resources


def test_policy_template_is_valid_json_with_placeholders():
    doc = json.loads((SAGEMAKER / "iam-policy.json").read_text())
    text = json.dumps(doc)
    for placeholder in ("${ACCOUNT_ID}", "${BUCKET}", "${PREFIX}", "${REGION}", "${ECR_REPOSITORY}"):
        assert placeholder in text


def test_rendered_policy_is_least_privilege(tmp_path):
    topic = f"arn:aws:sns:{REGION}:{ACCOUNT}:sdserve-done"
    out = tmp_path / "policy.json"
    proc = run_script("policy", "--bucket", BUCKET, "--prefix", "sdserve", "--image", IMAGE,
                      "--images", "s3://sdserve-images/public/img", "--sns-topic", topic, "--output", out)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["Version"] == "2012-10-17"
    assert "${" not in out.read_text()

    star_ok = {"ecr:GetAuthorizationToken", "cloudwatch:PutMetricData"}
    s3_resources = []
    for st, actions, resources in walk_statements(doc):
        assert st["Effect"] == "Allow"
        for a in actions:
            assert "*" not in a, f"wildcard action {a}"
        if "*" in resources:
            assert set(actions) <= star_ok, st
            if "cloudwatch:PutMetricData" in actions:
                assert st["Condition"]["StringLike"]["cloudwatch:namespace"]
        if any(a.startswith("s3:") for a in actions):
            s3_resources += resources
        if "s3:ListBucket" in actions:
            assert resources == ["arn:aws:s3:::sdserve-images"]
            assert st["Condition"]["StringLike"]["s3:prefix"] == ["public/img", "public/img/*"]
        if any(a.startswith("logs:") for a in actions):
            assert resources == [f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/aws/sagemaker/Endpoints/*"]
        if any(a.startswith("ecr:") for a in actions) and resources != ["*"]:
            assert resources == [f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/sdserve"]
        if "sns:Publish" in actions:
            assert resources == [topic]

    assert set(s3_resources) == {
        f"arn:aws:s3:::{BUCKET}/sdserve/model/*",
        f"arn:aws:s3:::{BUCKET}/sdserve/async-input/*",
        f"arn:aws:s3:::{BUCKET}/sdserve/async-output/*",
        f"arn:aws:s3:::{BUCKET}/sdserve/async-failure/*",
        "arn:aws:s3:::sdserve-images/public/img/*",
        "arn:aws:s3:::sdserve-images",
    }


def test_policy_without_topics_has_no_sns_statement(capsys):
    assert cli("policy", "--bucket", BUCKET, "--prefix", "/sdserve/", "--account-id", ACCOUNT,
               "--region", "eu-west-1", "--ecr-repository", "team/sdserve") == 0
    doc = json.loads(capsys.readouterr().out)
    actions = [a for _, acts, _ in walk_statements(doc) for a in acts]
    assert "sns:Publish" not in actions
    resources = [r for _, _, res in walk_statements(doc) for r in res]
    assert f"arn:aws:s3:::{BUCKET}/sdserve/images/*" in resources  # default images prefix
    assert f"arn:aws:ecr:eu-west-1:{ACCOUNT}:repository/team/sdserve" in resources

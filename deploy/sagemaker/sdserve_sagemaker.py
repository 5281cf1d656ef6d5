#!/usr/bin/env python3
"""Deploy sdserve to Amazon SageMaker as a real-time or asynchronous endpoint.

Subcommands:

  package   build model.tar.gz from a diffusers folder (files at the archive
            root: SageMaker extracts it to /opt/ml/model, where `sdserve serve`
            looks for model_index.json)
  deploy    create the SageMaker model, endpoint config and endpoint, wait for
            InService, then set up autoscaling and CloudWatch alarms
  invoke    generate an image through a deployed endpoint (real-time or async)
  teardown  delete everything `deploy` created for a --name (idempotent)
  policy    print the least-privilege IAM policy for the execution role

Every AWS client honours --endpoint-url (or AWS_ENDPOINT_URL), so the script can
be pointed at a stand-in such as moto_server. Exit codes: 0 success, 1 an AWS
call or the endpoint failed, 2 a usage mistake (bad argument, missing file...).
See README.md beside this file.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import json
import os
import re
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
POLICY_TEMPLATE = HERE / "iam-policy.json"

DEFAULT_INSTANCE_TYPE = "ml.g5.xlarge"
VARIANT = "AllTraffic"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Names must fit SageMaker's pattern; the longest suffix added is "-config" on
# endpoint configs and "-has-backlog-without-capacity" on alarms (255 max).
NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")
NAME_MAX = 48
ROLE_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
ECR_IMAGE_RE = re.compile(
    r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?"
    r"/(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127})|@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
SNS_ARN_RE = re.compile(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[\w-]{1,256}$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,1023}$")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class UserError(Exception):
    """A mistake in the command line or the inputs: exit code 2, no traceback."""


class Failure(Exception):
    """An AWS call or the endpoint failed: exit code 1, no traceback."""


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------
# Names


@dataclass(frozen=True)
class Names:
    """Every resource name `deploy` creates, derived from --name."""

    name: str

    @property
    def endpoint(self) -> str:
        return self.name

    @property
    def endpoint_config(self) -> str:
        return f"{self.name}-config"

    @property
    def model(self) -> str:
        return f"{self.name}-model"

    @property
    def resource_id(self) -> str:
        return f"endpoint/{self.endpoint}/variant/{VARIANT}"

    @property
    def invocations_policy(self) -> str:
        return f"{self.name}-invocations-target"

    @property
    def backlog_policy(self) -> str:
        return f"{self.name}-backlog-target"

    @property
    def scale_from_zero_policy(self) -> str:
        return f"{self.name}-scale-out-from-zero"

    @property
    def alarm_5xx(self) -> str:
        return f"{self.name}-invocation-5xx-errors"

    @property
    def alarm_4xx(self) -> str:
        return f"{self.name}-invocation-4xx-errors"

    @property
    def alarm_latency(self) -> str:
        return f"{self.name}-model-latency"

    @property
    def alarm_backlog(self) -> str:
        return f"{self.name}-has-backlog-without-capacity"

    @property
    def alarms(self) -> list[str]:
        return [self.alarm_5xx, self.alarm_4xx, self.alarm_latency, self.alarm_backlog]

    @property
    def policies(self) -> list[str]:
        return [self.invocations_policy, self.backlog_policy, self.scale_from_zero_policy]


def check_name(name: str) -> Names:
    if not NAME_RE.match(name) or len(name) > NAME_MAX:
        raise UserError(
            f"--name {name!r} is not usable: use letters, digits and single hyphens, "
            f"starting with a letter or digit, at most {NAME_MAX} characters"
        )
    return Names(name)


# --------------------------------------------------------------------------
# Input checks


def parse_s3_uri(uri: str, what: str) -> tuple[str, str]:
    """'s3://bucket/key/prefix' -> ('bucket', 'key/prefix')."""
    if not uri.startswith("s3://"):
        raise UserError(f"{what} must be an s3://bucket/prefix URI, got {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not BUCKET_RE.match(bucket) or ".." in bucket:
        raise UserError(f"{what}: {bucket!r} is not a valid S3 bucket name (in {uri!r})")
    if any(c in key for c in "*?") or "${" in key:
        raise UserError(f"{what}: wildcards are not allowed in {uri!r}")
    return bucket, key


def s3_prefix(uri: str, what: str) -> tuple[str, str]:
    """A prefix URI with the trailing slash dropped: ('bucket', 'a/b')."""
    bucket, key = parse_s3_uri(uri, what)
    return bucket, key.strip("/")


def join_s3(bucket: str, *parts: str) -> str:
    key = "/".join(p.strip("/") for p in parts if p.strip("/"))
    return f"s3://{bucket}/{key}"


def check_role(arn: str) -> str:
    if not ROLE_ARN_RE.match(arn):
        raise UserError(
            f"--role {arn!r} is not an IAM role ARN "
            "(expected arn:aws:iam::123456789012:role/NAME)"
        )
    return arn


def check_image(uri: str) -> re.Match[str]:
    m = ECR_IMAGE_RE.match(uri)
    if not m:
        raise UserError(
            f"--image {uri!r} is not an Amazon ECR image URI "
            "(expected ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPOSITORY[:TAG|@sha256:DIGEST]); "
            "SageMaker pulls bring-your-own containers from ECR"
        )
    return m


def check_topic(arn: str, what: str) -> str:
    if not SNS_ARN_RE.match(arn):
        raise UserError(f"{what} {arn!r} is not an SNS topic ARN")
    return arn


def check_model_dir(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"model folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise UserError(f"{str(path)!r} is not a folder (give a diffusers folder or an s3://.../model.tar.gz)")
    if not (path / "model_index.json").is_file():
        raise UserError(
            f"{str(path)!r} has no model_index.json: not a diffusers model folder "
            "(sdserve needs model_index.json at /opt/ml/model)"
        )
    try:
        json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path / 'model_index.json'} is not valid JSON: {e}") from None
    return path


def parse_env(items: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not ENV_KEY_RE.match(key):
            raise UserError(f"--env {item!r}: expected KEY=VALUE with KEY a variable name")
        if len(value) > 1024:
            raise UserError(f"--env {key}: value is longer than SageMaker's 1024 characters")
        env[key] = value
    return env


# --------------------------------------------------------------------------
# package


DEFAULT_EXCLUDES = [".*", "*/.*"]  # .git, .cache, .huggingface, .gitattributes, ...


def package_model(
    model_dir: Path, output: Path, excludes: list[str] | None = None, compresslevel: int = 1
) -> tuple[Path, int, int]:
    """Writes model.tar.gz with the folder's files at the archive root.

    Symlinks are followed (Hugging Face cache snapshots are symlinks into blobs/)
    and hidden files are skipped. Returns (path, number of files, bytes).
    """
    model_dir = check_model_dir(model_dir)
    patterns = DEFAULT_EXCLUDES + list(excludes or [])
    output = output.resolve()
    files: list[tuple[Path, str]] = []
    for root, dirs, names in os.walk(model_dir, followlinks=True):
        rel_root = Path(root).relative_to(model_dir)
        dirs[:] = sorted(
            d for d in dirs if not _excluded((rel_root / d).as_posix(), patterns)
        )
        for n in sorted(names):
            rel = (rel_root / n).as_posix()
            p = Path(root) / n
            if _excluded(rel, patterns) or p.resolve() == output:
                continue
            if not p.exists():
                raise UserError(f"{p} is a broken symlink")
            files.append((p, rel))
    output.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    tmp = output.with_name(output.name + ".partial")
    try:
        with tarfile.open(tmp, "w:gz", compresslevel=compresslevel, dereference=True) as tar:
            for p, rel in files:
                tar.add(p, arcname=rel, recursive=False)
                total += p.stat().st_size
        tmp.replace(output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return output, len(files), total


def _excluded(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, pat) for pat in patterns)


# --------------------------------------------------------------------------
# AWS clients and errors


class Aws:
    """The boto3 clients, all sharing region and endpoint URL."""

    def __init__(self, region: str | None, endpoint_url: str | None):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise UserError(
                "boto3 is not installed: pip install -r deploy/sagemaker/requirements.txt"
            ) from None
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self.session = boto3.Session(region_name=region) if region else boto3.Session()
        self.region = self.session.region_name
        if not self.region:
            raise UserError("no AWS region: pass --region or set AWS_REGION")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self._config = Config
        self._clients: dict[str, Any] = {}

    def client(self, service: str, **config: Any) -> Any:
        key = service + repr(sorted(config.items()))
        if key not in self._clients:
            if service == "s3" and self.endpoint_url:
                config.setdefault("s3", {"addressing_style": "path"})
            cfg = self._config(**config) if config else None
            self._clients[key] = self.session.client(
                service, endpoint_url=self.endpoint_url, config=cfg
            )
        return self._clients[key]

    @property
    def sagemaker(self) -> Any:
        return self.client("sagemaker")

    @property
    def runtime(self) -> Any:
        # InvokeEndpoint answers within 60 s; AWS suggests a 70 s socket timeout.
        return self.client("sagemaker-runtime", read_timeout=70, retries={"max_attempts": 2})

    @property
    def s3(self) -> Any:
        return self.client("s3")

    @property
    def autoscaling(self) -> Any:
        return self.client("application-autoscaling")

    @property
    def cloudwatch(self) -> Any:
        return self.client("cloudwatch")


def error_code(e: Exception) -> str:
    return getattr(e, "response", {}).get("Error", {}).get("Code", "") or ""


def error_message(e: Exception) -> str:
    err = getattr(e, "response", {}).get("Error", {})
    return f"{err.get('Code', '?')}: {err.get('Message', str(e))}"


def is_missing(e: Exception) -> bool:
    """True for the errors AWS gives when the thing asked about does not exist."""
    code = error_code(e)
    if code in {"NoSuchKey", "404", "NotFound", "NoSuchBucket", "ResourceNotFound",
                "ResourceNotFoundException", "ObjectNotFoundException"}:
        return True
    msg = str(getattr(e, "response", {}).get("Error", {}).get("Message", "")).lower()
    return code in {"ValidationException", "ValidationError"} and any(
        s in msg for s in ("could not find", "does not exist", "no scalable target", "no scaling policy", "not found")
    )


def aws_call(what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Runs one AWS call, turning its failure into a Failure with a clear message."""
    from botocore.exceptions import ClientError

    try:
        return fn(**kwargs)
    except ClientError as e:
        raise Failure(f"{what} failed: {error_message(e)}") from None


def ignore_missing(what: str, fn: Callable[..., Any], **kwargs: Any) -> bool:
    """Runs a delete; False (and no error) when the thing was already gone."""
    from botocore.exceptions import ClientError

    try:
        fn(**kwargs)
        return True
    except ClientError as e:
        if is_missing(e):
            return False
        raise Failure(f"{what} failed: {error_message(e)}") from None


def describe_or_none(fn: Callable[..., Any], **kwargs: Any) -> dict[str, Any] | None:
    from botocore.exceptions import ClientError

    try:
        return fn(**kwargs)
    except ClientError as e:
        if is_missing(e):
            return None
        raise Failure(f"{fn.__name__} failed: {error_message(e)}") from None


# --------------------------------------------------------------------------
# deploy


@dataclass
class DeployPlan:
    names: Names
    mode: str
    image: str
    role: str
    model: str  # s3://.../model.tar.gz, or a local folder
    model_upload: str | None  # s3 URI of the archive to upload, when model is a folder
    instance_type: str
    initial_instances: int
    min_instances: int
    max_instances: int
    autoscaling: bool
    target_invocations: float
    target_backlog: float
    env: dict[str, str]
    async_output: str | None
    async_failure: str | None
    async_input: str | None
    success_topic: str | None
    error_topic: str | None
    max_concurrent: int
    alarm_topic: str | None
    max_5xx: int
    max_4xx: int
    latency_seconds: float
    startup_timeout: int
    download_timeout: int
    wait_timeout: float
    poll_interval: float
    excludes: list[str]


def plan_deploy(args: argparse.Namespace) -> DeployPlan:
    """Checks every argument before any AWS call."""
    names = check_name(args.name)
    check_image(args.image)
    role = check_role(args.role)
    mode = args.mode
    if not args.instance_type.startswith("ml."):
        raise UserError(f"--instance-type {args.instance_type!r} must be a SageMaker type such as ml.g5.xlarge")
    root = s3_prefix(args.s3_root, "--s3-root") if args.s3_root else None

    model_upload = None
    if args.model.startswith("s3://"):
        bucket, key = parse_s3_uri(args.model, "--model")
        if not key.endswith(".tar.gz"):
            raise UserError(f"--model {args.model!r}: an S3 model must be a model.tar.gz object")
    else:
        check_model_dir(Path(args.model))
        if args.upload_to:
            b, k = s3_prefix(args.upload_to, "--upload-to")
            model_upload = join_s3(b, k, "model.tar.gz")
        elif root:
            model_upload = join_s3(root[0], root[1], "model", names.name, "model.tar.gz")
        else:
            raise UserError(
                "--model is a local folder: give --upload-to s3://BUCKET/PREFIX "
                "(or --s3-root) for the model.tar.gz upload"
            )

    async_output = async_failure = async_input = None
    if mode == "async":
        if args.async_output:
            async_output = join_s3(*s3_prefix(args.async_output, "--async-output"))
        elif root:
            async_output = join_s3(root[0], root[1], "async-output", names.name)
        else:
            raise UserError("--mode async needs --async-output s3://BUCKET/PREFIX (or --s3-root)")
        if args.async_failure:
            async_failure = join_s3(*s3_prefix(args.async_failure, "--async-failure"))
        elif root:
            async_failure = join_s3(root[0], root[1], "async-failure", names.name)
        if args.async_input:
            async_input = join_s3(*s3_prefix(args.async_input, "--async-input"))
        elif root:
            async_input = join_s3(root[0], root[1], "async-input", names.name)
    elif any([args.async_output, args.async_failure, args.async_input, args.success_topic, args.error_topic]):
        raise UserError("--async-output/--async-failure/--async-input/--success-topic/--error-topic need --mode async")

    for topic, what in [(args.success_topic, "--success-topic"), (args.error_topic, "--error-topic"),
                        (args.alarm_topic, "--alarm-topic")]:
        if topic:
            check_topic(topic, what)

    min_instances = args.min_instances
    if min_instances is None:
        min_instances = 0 if mode == "async" else 1
    if mode == "realtime" and min_instances < 1:
        raise UserError("--min-instances must be at least 1 for a real-time endpoint; use --mode async to scale to zero")
    if min_instances < 0 or args.max_instances < 1 or min_instances > args.max_instances:
        raise UserError(f"need 0 <= --min-instances ({min_instances}) <= --max-instances ({args.max_instances}) and max >= 1")
    if not 1 <= args.initial_instances <= args.max_instances:
        raise UserError(f"--initial-instances must be between 1 and --max-instances ({args.max_instances})")
    if not 1 <= args.max_concurrent <= 1000:
        raise UserError("--max-concurrent must be between 1 and 1000")
    for value, what in [(args.startup_timeout, "--startup-timeout"), (args.download_timeout, "--download-timeout")]:
        if not 60 <= value <= 3600:
            raise UserError(f"{what} must be between 60 and 3600 seconds")
    if args.target_invocations <= 0 or args.target_backlog <= 0:
        raise UserError("--target-invocations and --target-backlog must be positive")

    env = {"SDSERVE_DEVICE": args.device, "SDSERVE_LOG_FORMAT": args.log_format}
    optional = {
        "SDSERVE_DTYPE": args.dtype,
        "SDSERVE_QUEUE_CAPACITY": args.queue_capacity,
        "SDSERVE_MAX_PIXELS": args.max_pixels,
        "SDSERVE_STORAGE": args.storage,
        "SDSERVE_CORS_ORIGINS": args.cors_origins,
        "SDSERVE_PUBLIC_URL": args.public_url,
    }
    env.update({k: str(v) for k, v in optional.items() if v is not None})
    if args.storage and args.storage.startswith("s3://"):
        parse_s3_uri(args.storage, "--storage")
    env.update(parse_env(args.env or []))
    if len(env) > 100:
        raise UserError("SageMaker allows at most 100 environment variables")

    latency = args.latency_alarm_seconds
    if latency is None:
        latency = 300.0 if mode == "async" else 30.0

    return DeployPlan(
        names=names, mode=mode, image=args.image, role=role, model=args.model,
        model_upload=model_upload, instance_type=args.instance_type,
        initial_instances=args.initial_instances, min_instances=min_instances,
        max_instances=args.max_instances, autoscaling=not args.no_autoscaling,
        target_invocations=args.target_invocations, target_backlog=args.target_backlog,
        env=env, async_output=async_output, async_failure=async_failure, async_input=async_input,
        success_topic=args.success_topic, error_topic=args.error_topic,
        max_concurrent=args.max_concurrent, alarm_topic=args.alarm_topic,
        max_5xx=args.max_5xx, max_4xx=args.max_4xx, latency_seconds=latency,
        startup_timeout=args.startup_timeout, download_timeout=args.download_timeout,
        wait_timeout=args.wait_timeout, poll_interval=args.poll_interval,
        excludes=args.exclude or [],
    )


def deploy(aws: Aws, plan: DeployPlan) -> dict[str, Any]:
    n = plan.names
    sm = aws.sagemaker
    image_region = check_image(plan.image).group("region")
    if image_region != aws.region:
        print(f"warning: the image is in {image_region} but the endpoint goes to {aws.region}; "
              "SageMaker needs the ECR repository in the endpoint's region", file=sys.stderr)

    existing = [
        what for what, fn, kw in [
            (f"endpoint {n.endpoint}", sm.describe_endpoint, {"EndpointName": n.endpoint}),
            (f"endpoint config {n.endpoint_config}", sm.describe_endpoint_config, {"EndpointConfigName": n.endpoint_config}),
            (f"model {n.model}", sm.describe_model, {"ModelName": n.model}),
        ] if describe_or_none(fn, **kw) is not None
    ]
    if existing:
        raise UserError(
            f"{', '.join(existing)} already exist(s): run `teardown --name {n.name}` first, "
            "or deploy under another --name"
        )

    if plan.env.get("SDSERVE_STORAGE", "").startswith("s3://"):
        # sdserve's S3 client reads the region from the standard AWS variable.
        plan.env.setdefault("AWS_REGION", aws.region)
    model_data = upload_model(aws, plan) if plan.model_upload else check_s3_model(aws, plan.model)
    try:
        create_resources(aws, plan, model_data)
    except Failure as e:
        raise Failure(f"{e}\nsome resources may exist now: `teardown --name {n.name}` removes them") from None
    log(f"\nendpoint {n.endpoint} is InService ({plan.mode}).")
    log(f"  invoke:   python {Path(sys.argv[0]).name} invoke --name {n.name} --prompt 'a lighthouse at dusk' --output out.png")
    log(f"  teardown: python {Path(sys.argv[0]).name} teardown --name {n.name}")
    return {"model_data": model_data}


def create_resources(aws: Aws, plan: DeployPlan, model_data: str) -> None:
    n = plan.names
    sm = aws.sagemaker
    log(f"creating model {n.model}")
    aws_call("CreateModel", sm.create_model,
             ModelName=n.model,
             ExecutionRoleArn=plan.role,
             PrimaryContainer={"Image": plan.image, "ModelDataUrl": model_data, "Environment": plan.env},
             Tags=[{"Key": "sdserve:name", "Value": n.name}])

    variant = {
        "VariantName": VARIANT,
        "ModelName": n.model,
        "InstanceType": plan.instance_type,
        "InitialInstanceCount": plan.initial_instances,
        "ModelDataDownloadTimeoutInSeconds": plan.download_timeout,
        "ContainerStartupHealthCheckTimeoutInSeconds": plan.startup_timeout,
    }
    config: dict[str, Any] = {"EndpointConfigName": n.endpoint_config, "ProductionVariants": [variant],
                              "Tags": [{"Key": "sdserve:name", "Value": n.name}]}
    if plan.mode == "async":
        output: dict[str, Any] = {"S3OutputPath": plan.async_output}
        if plan.async_failure:
            output["S3FailurePath"] = plan.async_failure
        notify = {k: v for k, v in [("SuccessTopic", plan.success_topic), ("ErrorTopic", plan.error_topic)] if v}
        if notify:
            output["NotificationConfig"] = notify
        config["AsyncInferenceConfig"] = {
            "OutputConfig": output,
            "ClientConfig": {"MaxConcurrentInvocationsPerInstance": plan.max_concurrent},
        }
    log(f"creating endpoint config {n.endpoint_config} ({plan.mode}, {plan.initial_instances} x {plan.instance_type})")
    aws_call("CreateEndpointConfig", sm.create_endpoint_config, **config)

    tags = [{"Key": "sdserve:name", "Value": n.name}, {"Key": "sdserve:mode", "Value": plan.mode}]
    if plan.async_input:
        tags.append({"Key": "sdserve:async-input", "Value": plan.async_input})
    log(f"creating endpoint {n.endpoint}")
    aws_call("CreateEndpoint", sm.create_endpoint,
             EndpointName=n.endpoint, EndpointConfigName=n.endpoint_config, Tags=tags)

    wait_in_service(aws, n.endpoint, plan.wait_timeout, plan.poll_interval)

    if plan.autoscaling:
        set_autoscaling(aws, plan)
    put_alarms(aws, plan)


def check_s3_model(aws: Aws, uri: str) -> str:
    from botocore.exceptions import ClientError

    bucket, key = parse_s3_uri(uri, "--model")
    try:
        aws.s3.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if is_missing(e) or error_code(e) in {"403", "AccessDenied"}:
            raise UserError(f"--model {uri}: no such object (or no permission to read it)") from None
        raise Failure(f"HeadObject {uri} failed: {error_message(e)}") from None
    return uri


def upload_model(aws: Aws, plan: DeployPlan) -> str:
    from botocore.exceptions import ClientError

    assert plan.model_upload
    bucket, key = parse_s3_uri(plan.model_upload, "--upload-to")
    try:
        aws.s3.head_bucket(Bucket=bucket)
    except ClientError as e:
        if is_missing(e) or error_code(e) in {"403", "AccessDenied"}:
            raise UserError(f"bucket {bucket!r} does not exist or is not yours (for {plan.model_upload})") from None
        raise Failure(f"HeadBucket {bucket} failed: {error_message(e)}") from None
    with tempfile.TemporaryDirectory(prefix="sdserve-model-") as tmp:
        archive = Path(tmp) / "model.tar.gz"
        log(f"packaging {plan.model} ...")
        _, count, size = package_model(Path(plan.model), archive, plan.excludes)
        log(f"packaged {count} files ({size / 1e6:.1f} MB raw, {archive.stat().st_size / 1e6:.1f} MB compressed)")
        log(f"uploading to {plan.model_upload}")
        aws_call("upload to S3", aws.s3.upload_file, Filename=str(archive), Bucket=bucket, Key=key)
    return plan.model_upload


def wait_in_service(aws: Aws, endpoint: str, timeout: float, poll: float) -> None:
    start = time.monotonic()
    last = None
    while True:
        desc = aws_call("DescribeEndpoint", aws.sagemaker.describe_endpoint, EndpointName=endpoint)
        status = desc["EndpointStatus"]
        elapsed = time.monotonic() - start
        if status != last:
            log(f"[{elapsed:6.0f}s] endpoint {endpoint}: {status}")
            last = status
        if status == "InService":
            return
        if status in {"Failed", "OutOfService", "Deleting"}:
            reason = desc.get("FailureReason", "no reason given")
            raise Failure(
                f"endpoint {endpoint} is {status}: {reason}\n"
                f"logs: CloudWatch log group /aws/sagemaker/Endpoints/{endpoint}"
            )
        if elapsed >= timeout:
            raise Failure(
                f"endpoint {endpoint} still {status} after {timeout:.0f}s; it may yet come up "
                "(check the console or rerun with a longer --wait-timeout)"
            )
        time.sleep(poll)


def set_autoscaling(aws: Aws, plan: DeployPlan) -> None:
    n = plan.names
    aas = aws.autoscaling
    log(f"autoscaling {n.resource_id}: {plan.min_instances}..{plan.max_instances} instances")
    aws_call("RegisterScalableTarget", aas.register_scalable_target,
             ServiceNamespace="sagemaker", ResourceId=n.resource_id, ScalableDimension=SCALABLE_DIMENSION,
             MinCapacity=plan.min_instances, MaxCapacity=plan.max_instances)
    common = {"ServiceNamespace": "sagemaker", "ResourceId": n.resource_id, "ScalableDimension": SCALABLE_DIMENSION}
    if plan.mode == "realtime":
        aws_call("PutScalingPolicy", aas.put_scaling_policy, **common,
                 PolicyName=n.invocations_policy, PolicyType="TargetTrackingScaling",
                 TargetTrackingScalingPolicyConfiguration={
                     "TargetValue": plan.target_invocations,
                     "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
                     "ScaleInCooldown": 300,
                     "ScaleOutCooldown": 60,
                 })
        return
    # Async: track the backlog per instance; with zero instances that metric has
    # no value, so a step policy driven by HasBacklogWithoutCapacity adds the first one.
    aws_call("PutScalingPolicy", aas.put_scaling_policy, **common,
             PolicyName=n.backlog_policy, PolicyType="TargetTrackingScaling",
             TargetTrackingScalingPolicyConfiguration={
                 "TargetValue": plan.target_backlog,
                 "CustomizedMetricSpecification": {
                     "MetricName": "ApproximateBacklogSizePerInstance",
                     "Namespace": "AWS/SageMaker",
                     "Dimensions": [{"Name": "EndpointName", "Value": n.endpoint}],
                     "Statistic": "Average",
                 },
                 "ScaleInCooldown": 600,
                 "ScaleOutCooldown": 300,
             })
    step = aws_call("PutScalingPolicy", aas.put_scaling_policy, **common,
                    PolicyName=n.scale_from_zero_policy, PolicyType="StepScaling",
                    StepScalingPolicyConfiguration={
                        "AdjustmentType": "ChangeInCapacity",
                        "MetricAggregationType": "Average",
                        "Cooldown": 300,
                        "StepAdjustments": [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}],
                    })
    aws_call("PutMetricAlarm", aws.cloudwatch.put_metric_alarm,
             AlarmName=n.alarm_backlog,
             AlarmDescription=f"sdserve {n.name}: requests queued while the endpoint has no instance; scales out from zero",
             Namespace="AWS/SageMaker", MetricName="HasBacklogWithoutCapacity",
             Dimensions=[{"Name": "EndpointName", "Value": n.endpoint}],
             Statistic="Average", Period=60, EvaluationPeriods=2, DatapointsToAlarm=2,
             Threshold=1, ComparisonOperator="GreaterThanOrEqualToThreshold",
             TreatMissingData="missing", AlarmActions=[step["PolicyARN"]])


def put_alarms(aws: Aws, plan: DeployPlan) -> None:
    n = plan.names
    dims = [{"Name": "EndpointName", "Value": n.endpoint}, {"Name": "VariantName", "Value": VARIANT}]
    actions = {"AlarmActions": [plan.alarm_topic], "OKActions": [plan.alarm_topic]} if plan.alarm_topic else {}
    alarms = [
        (n.alarm_5xx, "Invocation5XXErrors", "Sum", 300, 1, plan.max_5xx, "GreaterThanOrEqualToThreshold",
         f"sdserve {n.name}: the container answered 5xx at least {plan.max_5xx} time(s) in 5 minutes"),
        (n.alarm_4xx, "Invocation4XXErrors", "Sum", 300, 1, plan.max_4xx, "GreaterThanOrEqualToThreshold",
         f"sdserve {n.name}: at least {plan.max_4xx} rejected (4xx) requests in 5 minutes"),
        # ModelLatency is in microseconds.
        (n.alarm_latency, "ModelLatency", "Average", 300, 3, plan.latency_seconds * 1e6, "GreaterThanThreshold",
         f"sdserve {n.name}: average model latency above {plan.latency_seconds:g}s for 15 minutes"),
    ]
    for name, metric, stat, period, evaluations, threshold, op, desc in alarms:
        log(f"alarm {name} on {metric}")
        aws_call("PutMetricAlarm", aws.cloudwatch.put_metric_alarm,
                 AlarmName=name, AlarmDescription=desc, Namespace="AWS/SageMaker", MetricName=metric,
                 Dimensions=dims, Statistic=stat, Period=period, EvaluationPeriods=evaluations,
                 Threshold=float(threshold), ComparisonOperator=op, TreatMissingData="notBreaching",
                 **actions)


# --------------------------------------------------------------------------
# teardown


def teardown(aws: Aws, names: Names) -> list[str]:
    """Deletes what `deploy` made for these names; missing pieces are skipped."""
    sm, aas, cw = aws.sagemaker, aws.autoscaling, aws.cloudwatch
    deleted: list[str] = []

    existing = aws_call("DescribeAlarms", cw.describe_alarms, AlarmNames=names.alarms)
    alarm_names = [a["AlarmName"] for a in existing.get("MetricAlarms", [])]
    if alarm_names:
        aws_call("DeleteAlarms", cw.delete_alarms, AlarmNames=alarm_names)
        deleted += [f"alarm {a}" for a in alarm_names]

    policies = aws_call("DescribeScalingPolicies", aas.describe_scaling_policies,
                        ServiceNamespace="sagemaker", ResourceId=names.resource_id,
                        ScalableDimension=SCALABLE_DIMENSION)
    for p in policies.get("ScalingPolicies", []):
        if p["ResourceId"] != names.resource_id:
            continue
        if ignore_missing("DeleteScalingPolicy", aas.delete_scaling_policy, PolicyName=p["PolicyName"],
                          ServiceNamespace="sagemaker", ResourceId=names.resource_id,
                          ScalableDimension=SCALABLE_DIMENSION):
            deleted.append(f"scaling policy {p['PolicyName']}")
    targets = aws_call("DescribeScalableTargets", aas.describe_scalable_targets,
                       ServiceNamespace="sagemaker", ResourceIds=[names.resource_id],
                       ScalableDimension=SCALABLE_DIMENSION)
    if any(t["ResourceId"] == names.resource_id for t in targets.get("ScalableTargets", [])):
        if ignore_missing("DeregisterScalableTarget", aas.deregister_scalable_target,
                          ServiceNamespace="sagemaker", ResourceId=names.resource_id,
                          ScalableDimension=SCALABLE_DIMENSION):
            deleted.append(f"scalable target {names.resource_id}")

    config_name, model_names = names.endpoint_config, {names.model}
    endpoint = describe_or_none(sm.describe_endpoint, EndpointName=names.endpoint)
    if endpoint is not None:
        config_name = endpoint.get("EndpointConfigName", config_name)
    config = describe_or_none(sm.describe_endpoint_config, EndpointConfigName=config_name)
    if config is not None:
        model_names |= {v["ModelName"] for v in config.get("ProductionVariants", []) if "ModelName" in v}

    if endpoint is not None and endpoint.get("EndpointStatus") == "Deleting":
        log(f"endpoint {names.endpoint} is already being deleted")
    elif endpoint is not None and ignore_missing("DeleteEndpoint", sm.delete_endpoint, EndpointName=names.endpoint):
        deleted.append(f"endpoint {names.endpoint}")
    if config is not None and ignore_missing("DeleteEndpointConfig", sm.delete_endpoint_config,
                                             EndpointConfigName=config_name):
        deleted.append(f"endpoint config {config_name}")
    for model in sorted(model_names):
        if ignore_missing("DeleteModel", sm.delete_model, ModelName=model):
            deleted.append(f"model {model}")
    return deleted


# --------------------------------------------------------------------------
# invoke


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    if args.payload:
        try:
            body = json.loads(Path(args.payload).read_text())
        except OSError as e:
            raise UserError(f"--payload {args.payload}: {e.strerror}") from None
        except ValueError as e:
            raise UserError(f"--payload {args.payload} is not valid JSON: {e}") from None
        if not isinstance(body, dict) or "prompt" not in body:
            raise UserError(f"--payload {args.payload} must be a JSON object with a \"prompt\"")
        return body
    if not args.prompt:
        raise UserError("give --prompt TEXT (or --payload request.json)")
    fields = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "width": args.width,
        "height": args.height,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "num_images_per_prompt": args.num_images,
        "scheduler": args.scheduler,
    }
    return {k: v for k, v in fields.items() if v is not None}


ACCEPT = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "json": "application/json"}
EXT = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


def choose_accept(args: argparse.Namespace, body: dict[str, Any]) -> str:
    several = int(body.get("num_images_per_prompt") or 1) > 1
    if args.accept is None:
        return "application/json" if several else "image/png"
    if several and args.accept != "json":
        raise UserError("an image Accept type returns one image: use --accept json for several")
    return ACCEPT[args.accept]


def sniff_image(data: bytes) -> str | None:
    if data.startswith(PNG_MAGIC):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def write_images(data: bytes, content_type: str | None, output: Path) -> list[Path]:
    """Writes an image response, or each image of a JSON response, to disk."""
    kind = sniff_image(data)
    if kind:
        output.write_bytes(data)
        return [output]
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("generated_images"), list):
        preview = data[:300].decode("utf-8", "replace")
        raise Failure(f"the endpoint answered {content_type or 'an unknown type'} that is neither an image "
                      f"nor sdserve's JSON: {preview}")
    images = [base64.b64decode(s) for s in doc["generated_images"]]
    paths = [output] if len(images) == 1 else [
        output.with_name(f"{output.stem}-{i}{output.suffix or '.png'}") for i in range(1, len(images) + 1)
    ]
    for p, img in zip(paths, images):
        p.write_bytes(img)
    return paths


def endpoint_info(aws: Aws, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    endpoint = describe_or_none(aws.sagemaker.describe_endpoint, EndpointName=name)
    if endpoint is None:
        raise UserError(f"no endpoint named {name!r} in {aws.region}")
    config = aws_call("DescribeEndpointConfig", aws.sagemaker.describe_endpoint_config,
                      EndpointConfigName=endpoint["EndpointConfigName"])
    return endpoint, config


def invoke(aws: Aws, args: argparse.Namespace) -> list[Path]:
    names = check_name(args.name)
    body = request_body(args)
    accept = choose_accept(args, body)
    output = Path(args.output)
    if not output.parent.is_dir():
        raise UserError(f"--output {args.output}: folder {str(output.parent)!r} does not exist")
    endpoint, config = endpoint_info(aws, names.endpoint)
    if endpoint["EndpointStatus"] != "InService":
        raise Failure(f"endpoint {names.endpoint} is {endpoint['EndpointStatus']}, not InService")
    is_async = bool(config.get("AsyncInferenceConfig"))
    payload = json.dumps(body).encode()
    if not is_async:
        log(f"invoking {names.endpoint} (real-time, Accept {accept})")
        resp = aws_call("InvokeEndpoint", aws.runtime.invoke_endpoint, EndpointName=names.endpoint,
                        ContentType="application/json", Accept=accept, Body=payload)
        data = resp["Body"].read()
        paths = write_images(data, resp.get("ContentType"), output)
    else:
        input_prefix = args.input_prefix or async_input_from_tags(aws, endpoint["EndpointArn"])
        if not input_prefix:
            raise UserError("this async endpoint has no sdserve:async-input tag: give --input-prefix s3://BUCKET/PREFIX")
        bucket, prefix = s3_prefix(input_prefix, "--input-prefix")
        inference_id = str(uuid.uuid4())
        key = f"{prefix}/{inference_id}.json" if prefix else f"{inference_id}.json"
        log(f"uploading request to s3://{bucket}/{key}")
        aws_call("PutObject", aws.s3.put_object, Bucket=bucket, Key=key, Body=payload, ContentType="application/json")
        resp = aws_call("InvokeEndpointAsync", aws.runtime.invoke_endpoint_async,
                        EndpointName=names.endpoint, InputLocation=f"s3://{bucket}/{key}",
                        ContentType="application/json", Accept=accept, InferenceId=inference_id,
                        InvocationTimeoutSeconds=int(min(max(args.timeout, 1), 3600)))
        out_loc, fail_loc = resp["OutputLocation"], resp.get("FailureLocation")
        log(f"queued {resp.get('InferenceId', inference_id)}; waiting for {out_loc}")
        data, content_type = wait_for_async_result(aws.s3, out_loc, fail_loc, args.timeout, args.poll_interval)
        paths = write_images(data, content_type, output)
    for p in paths:
        log(f"wrote {p}")
    return paths


def async_input_from_tags(aws: Aws, arn: str) -> str | None:
    tags = aws_call("ListTags", aws.sagemaker.list_tags, ResourceArn=arn)
    for t in tags.get("Tags", []):
        if t["Key"] == "sdserve:async-input":
            return t["Value"]
    return None


def get_if_exists(s3: Any, uri: str) -> tuple[bytes, str | None] | None:
    from botocore.exceptions import ClientError

    bucket, key = parse_s3_uri(uri, "result location")
    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if is_missing(e):
            return None
        raise Failure(f"reading {uri} failed: {error_message(e)}") from None
    return obj["Body"].read(), obj.get("ContentType")


def wait_for_async_result(
    s3: Any,
    output_location: str,
    failure_location: str | None,
    timeout: float,
    poll_interval: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[bytes, str | None]:
    """Polls S3 until the async result (or its failure record) appears."""
    deadline = clock() + timeout
    while True:
        found = get_if_exists(s3, output_location)
        if found is not None:
            return found
        if failure_location:
            failed = get_if_exists(s3, failure_location)
            if failed is not None:
                text = failed[0][:2000].decode("utf-8", "replace")
                raise Failure(f"the async inference failed ({failure_location}): {text}")
        if clock() >= deadline:
            raise Failure(
                f"no result after {timeout:g}s; it may still arrive at {output_location}"
                + (f" (failures go to {failure_location})" if failure_location else "")
            )
        sleep(poll_interval)


# --------------------------------------------------------------------------
# policy


PLACEHOLDER_RE = re.compile(r"\$\{([A-Z_]+)\}")


def partition_of(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def render_policy(
    *, account_id: str, region: str, ecr_repository: str, bucket: str, prefix: str,
    images_bucket: str | None = None, images_prefix: str | None = None,
    sns_topics: list[str] | None = None, template: Path = POLICY_TEMPLATE,
) -> dict[str, Any]:
    if not re.fullmatch(r"\d{12}", account_id):
        raise UserError(f"--account-id {account_id!r} must be 12 digits")
    if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", region):
        raise UserError(f"--region {region!r} is not an AWS region name")
    if not re.fullmatch(r"[a-z0-9]+(?:[._/-][a-z0-9]+)*", ecr_repository):
        raise UserError(f"--ecr-repository {ecr_repository!r} is not an ECR repository name")
    bucket, prefix = s3_prefix(f"s3://{bucket}/{prefix}", "--bucket/--prefix")
    if not prefix:
        raise UserError("--prefix must not be empty: the policy grants access to that prefix only")
    if images_bucket is None:
        images_bucket, images_prefix = bucket, f"{prefix}/images"
    images_bucket, images_prefix = s3_prefix(f"s3://{images_bucket}/{images_prefix or ''}", "--images")
    if not images_prefix:
        raise UserError("--images must name a prefix (s3://BUCKET/PREFIX), not a whole bucket")
    topics = [check_topic(t, "--sns-topic") for t in (sns_topics or [])]
    values = {
        "PARTITION": partition_of(region), "ACCOUNT_ID": account_id, "REGION": region,
        "ECR_REPOSITORY": ecr_repository, "BUCKET": bucket, "PREFIX": prefix,
        "IMAGES_BUCKET": images_bucket, "IMAGES_PREFIX": images_prefix,
    }
    try:
        doc = json.loads(template.read_text())
    except (OSError, ValueError) as e:
        raise Failure(f"cannot read the policy template {template}: {e}") from None

    def sub(value: Any) -> Any:
        if isinstance(value, str):
            def one(m: re.Match[str]) -> str:
                if m.group(1) not in values:
                    raise Failure(f"unknown placeholder ${{{m.group(1)}}} in {template}")
                return values[m.group(1)]
            return PLACEHOLDER_RE.sub(one, value)
        if isinstance(value, list):
            out: list[Any] = []
            for v in value:
                if v == "${SNS_TOPIC_ARNS}":
                    out.extend(topics)
                else:
                    out.append(sub(v))
            return out
        if isinstance(value, dict):
            return {k: sub(v) for k, v in value.items()}
        return value

    statements = []
    for st in doc["Statement"]:
        st = sub(st)
        if st.get("Resource") == []:
            continue  # e.g. no SNS topics given: no SNS statement
        statements.append(st)
    doc["Statement"] = statements
    return doc


# --------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--region", default=argparse.SUPPRESS,
                        help="AWS region (default: AWS_REGION / AWS_DEFAULT_REGION / your profile)")
    common.add_argument("--endpoint-url", default=argparse.SUPPRESS,
                        help="send every AWS call here (a stand-in such as moto_server); default AWS_ENDPOINT_URL")

    p = argparse.ArgumentParser(
        prog="sdserve_sagemaker.py",
        description="Deploy sdserve to Amazon SageMaker (real-time or asynchronous inference).",
        parents=[common],
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pk = sub.add_parser("package", parents=[common], help="build model.tar.gz from a diffusers folder")
    pk.add_argument("--model-dir", required=True, help="diffusers folder (with model_index.json)")
    pk.add_argument("--output", default="model.tar.gz")
    pk.add_argument("--exclude", action="append", metavar="GLOB",
                    help="skip files matching this glob on their path inside the folder (repeatable); "
                         "hidden files are always skipped")

    d = sub.add_parser("deploy", parents=[common], help="create model, endpoint config, endpoint, autoscaling and alarms")
    d.add_argument("--name", required=True, help="prefix for every resource name; the endpoint's name")
    d.add_argument("--image", required=True, help="sdserve image in ECR: ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPO:TAG")
    d.add_argument("--role", required=True, help="SageMaker execution role ARN (see iam-policy.json)")
    d.add_argument("--model", required=True, help="s3://.../model.tar.gz, or a local diffusers folder to package and upload")
    d.add_argument("--mode", choices=["realtime", "async"], default="realtime")
    d.add_argument("--s3-root", help="s3://BUCKET/PREFIX: default layout for model upload, async input/output/failure "
                                     "(PREFIX/model/NAME/, PREFIX/async-input/NAME/, ...), matching `policy`")
    d.add_argument("--upload-to", help="s3://BUCKET/PREFIX for the packaged model.tar.gz (overrides --s3-root)")
    d.add_argument("--exclude", action="append", metavar="GLOB", help="as for `package`")
    d.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE)
    d.add_argument("--initial-instances", type=int, default=1)
    d.add_argument("--min-instances", type=int, help="autoscaling floor (default 1 real-time, 0 async)")
    d.add_argument("--max-instances", type=int, default=2)
    d.add_argument("--no-autoscaling", action="store_true")
    d.add_argument("--target-invocations", type=float, default=10.0,
                   help="real-time: target invocations per instance per minute (default 10)")
    d.add_argument("--target-backlog", type=float, default=5.0,
                   help="async: target ApproximateBacklogSizePerInstance (default 5)")
    g = d.add_argument_group("asynchronous inference")
    g.add_argument("--async-output", help="s3://BUCKET/PREFIX for results (default from --s3-root)")
    g.add_argument("--async-failure", help="s3://BUCKET/PREFIX for failure records (default from --s3-root)")
    g.add_argument("--async-input", help="s3://BUCKET/PREFIX where `invoke` uploads requests (default from --s3-root)")
    g.add_argument("--success-topic", help="SNS topic ARN notified on success")
    g.add_argument("--error-topic", help="SNS topic ARN notified on failure")
    g.add_argument("--max-concurrent", type=int, default=1,
                   help="MaxConcurrentInvocationsPerInstance (default 1: sdserve runs one job at a time)")
    e = d.add_argument_group("container settings (passed as SDSERVE_* environment variables)")
    e.add_argument("--device", default="cuda", help="SDSERVE_DEVICE (default cuda)")
    e.add_argument("--dtype", help="SDSERVE_DTYPE: f16, bf16 or f32")
    e.add_argument("--log-format", choices=["text", "json"], default="json", help="SDSERVE_LOG_FORMAT (default json)")
    e.add_argument("--queue-capacity", type=int, help="SDSERVE_QUEUE_CAPACITY")
    e.add_argument("--max-pixels", type=int, help="SDSERVE_MAX_PIXELS")
    e.add_argument("--storage", help="SDSERVE_STORAGE: folder or s3://BUCKET/PREFIX for stored images")
    e.add_argument("--cors-origins", help="SDSERVE_CORS_ORIGINS")
    e.add_argument("--public-url", help="SDSERVE_PUBLIC_URL")
    e.add_argument("--env", action="append", metavar="KEY=VALUE", help="any other container variable (repeatable)")
    e.add_argument("--startup-timeout", type=int, default=900,
                   help="ContainerStartupHealthCheckTimeoutInSeconds (default 900)")
    e.add_argument("--download-timeout", type=int, default=1200,
                   help="ModelDataDownloadTimeoutInSeconds (default 1200)")
    a = d.add_argument_group("alarms")
    a.add_argument("--alarm-topic", help="SNS topic ARN the alarms notify")
    a.add_argument("--max-5xx", type=int, default=1, help="alarm at this many 5xx in 5 minutes (default 1)")
    a.add_argument("--max-4xx", type=int, default=20, help="alarm at this many 4xx in 5 minutes (default 20)")
    a.add_argument("--latency-alarm-seconds", type=float,
                   help="alarm when average ModelLatency stays above this for 15 minutes (default 30 real-time, 300 async)")
    d.add_argument("--wait-timeout", type=float, default=1800, help="seconds to wait for InService (default 1800)")
    d.add_argument("--poll-interval", type=float, default=30, help="seconds between status checks (default 30)")

    i = sub.add_parser("invoke", parents=[common], help="generate an image through a deployed endpoint")
    i.add_argument("--name", required=True)
    i.add_argument("--prompt")
    i.add_argument("--payload", help="a JSON request file instead of the options below")
    i.add_argument("--negative-prompt")
    i.add_argument("--width", type=int)
    i.add_argument("--height", type=int)
    i.add_argument("--steps", type=int, help="num_inference_steps")
    i.add_argument("--guidance-scale", type=float)
    i.add_argument("--seed", type=int)
    i.add_argument("--num-images", type=int, help="num_images_per_prompt (several come back as JSON)")
    i.add_argument("--scheduler")
    i.add_argument("--accept", choices=sorted(ACCEPT), help="response format (default png; json for several images)")
    i.add_argument("--output", default="out.png", help="file to write (NAME-1.png, NAME-2.png... for several)")
    i.add_argument("--input-prefix", help="async: s3://BUCKET/PREFIX for the request (default: the endpoint's tag)")
    i.add_argument("--timeout", type=float, default=900, help="async: seconds to wait for the result (default 900)")
    i.add_argument("--poll-interval", type=float, default=5, help="async: seconds between S3 checks (default 5)")

    t = sub.add_parser("teardown", parents=[common], help="delete everything `deploy` made for --name")
    t.add_argument("--name", required=True)

    pol = sub.add_parser("policy", parents=[common], help="print the execution role's IAM policy, rendered")
    pol.add_argument("--bucket", required=True, help="bucket holding model, async input/output/failure prefixes")
    pol.add_argument("--prefix", required=True, help="prefix inside --bucket (the --s3-root prefix of deploy)")
    pol.add_argument("--image", help="the ECR image URI: gives account, region and repository")
    pol.add_argument("--account-id", help="AWS account id (default: from --image)")
    pol.add_argument("--ecr-repository", help="ECR repository name (default: from --image)")
    pol.add_argument("--images", help="s3://BUCKET/PREFIX sdserve stores images in (default s3://BUCKET/PREFIX/images)")
    pol.add_argument("--sns-topic", action="append", help="SNS topic ARN the async endpoint notifies (repeatable)")
    pol.add_argument("--output", help="write here instead of stdout")
    return p


def cmd_package(args: argparse.Namespace) -> None:
    out, count, size = package_model(Path(args.model_dir), Path(args.output), args.exclude)
    log(f"wrote {out}: {count} files, {size / 1e6:.1f} MB raw, {out.stat().st_size / 1e6:.1f} MB compressed")


def cmd_policy(args: argparse.Namespace) -> None:
    account, region, repo = args.account_id, getattr(args, "region", None), args.ecr_repository
    if args.image:
        m = check_image(args.image)
        account = account or m.group("account")
        region = region or m.group("region")
        repo = repo or m.group("repo")
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    missing = [n for n, v in [("--account-id", account), ("--region", region), ("--ecr-repository", repo)] if not v]
    if missing:
        raise UserError(f"give --image URI, or {' and '.join(missing)}")
    images_bucket = images_prefix = None
    if args.images:
        images_bucket, images_prefix = s3_prefix(args.images, "--images")
    doc = render_policy(account_id=account, region=region, ecr_repository=repo, bucket=args.bucket,
                        prefix=args.prefix, images_bucket=images_bucket, images_prefix=images_prefix,
                        sns_topics=args.sns_topic)
    text = json.dumps(doc, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        log(f"wrote {args.output}")
    else:
        sys.stdout.write(text)


def make_aws(args: argparse.Namespace) -> Aws:
    return Aws(getattr(args, "region", None), getattr(args, "endpoint_url", None))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from botocore.exceptions import BotoCoreError, EndpointConnectionError, NoCredentialsError, NoRegionError
    except ImportError:  # reported as a UserError when an AWS client is needed
        BotoCoreError = EndpointConnectionError = NoCredentialsError = NoRegionError = ()  # type: ignore[assignment,misc]
    try:
        if args.command == "package":
            cmd_package(args)
        elif args.command == "policy":
            cmd_policy(args)
        elif args.command == "deploy":
            plan = plan_deploy(args)
            deploy(make_aws(args), plan)
        elif args.command == "teardown":
            names = check_name(args.name)
            deleted = teardown(make_aws(args), names)
            for d in deleted:
                log(f"deleted {d}")
            if not deleted:
                log(f"nothing to delete for {names.name}")
        elif args.command == "invoke":
            invoke(make_aws(args), args)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NoCredentialsError:
        print("error: no AWS credentials found (set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)",
              file=sys.stderr)
        return 2
    except NoRegionError:
        print("error: no AWS region: pass --region or set AWS_REGION", file=sys.stderr)
        return 2
    except EndpointConnectionError as e:
        print(f"error: cannot reach AWS: {e}", file=sys.stderr)
        return 1
    except BotoCoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Failure as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`deploy`'s arguments checked and resolved into a DeployPlan before any AWS
call: S3 layout under --s3-root, instance counts, container environment."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from .checks import check_image, check_model_dir, check_role, check_topic, join_s3, parse_env, parse_s3_uri, s3_prefix
from .errors import UserError
from .names import Names, check_name

DEFAULT_INSTANCE_TYPE = "ml.g5.xlarge"


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


def _s3_location(given: str | None, what: str, root: tuple[str, str] | None, *default: str) -> str | None:
    """The prefix given as `what`, else ROOT/default..., else None (no --s3-root)."""
    if given:
        return join_s3(*s3_prefix(given, what))
    if root:
        return join_s3(root[0], root[1], *default)
    return None


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
        _, key = parse_s3_uri(args.model, "--model")
        if not key.endswith(".tar.gz"):
            raise UserError(f"--model {args.model!r}: an S3 model must be a model.tar.gz object")
    else:
        check_model_dir(Path(args.model))
        if args.upload_to:
            model_upload = join_s3(*s3_prefix(args.upload_to, "--upload-to"), "model.tar.gz")
        elif root:
            model_upload = join_s3(root[0], root[1], "model", names.name, "model.tar.gz")
        else:
            raise UserError(
                "--model is a local folder: give --upload-to s3://BUCKET/PREFIX "
                "(or --s3-root) for the model.tar.gz upload"
            )

    async_output = async_failure = async_input = None
    if mode == "async":
        async_output = _s3_location(args.async_output, "--async-output", root, "async-output", names.name)
        if not async_output:
            raise UserError("--mode async needs --async-output s3://BUCKET/PREFIX (or --s3-root)")
        async_failure = _s3_location(args.async_failure, "--async-failure", root, "async-failure", names.name)
        async_input = _s3_location(args.async_input, "--async-input", root, "async-input", names.name)
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

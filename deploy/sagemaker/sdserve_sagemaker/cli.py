"""The command line: argparse, dispatch to the subcommands, and the mapping of
errors to exit codes (0 success, 1 AWS or endpoint failure, 2 usage mistake,
130 interrupted), each error one `error: ...` line on stderr."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .aws import Aws, region_from_env
from .checks import check_image, s3_prefix
from .deploy import deploy, teardown
from .errors import COMMAND, Failure, UserError, log
from .iam import render_policy
from .invoke import ACCEPT, invoke
from .names import check_name
from .package import package_model
from .plan import DEFAULT_INSTANCE_TYPE, plan_deploy


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--region", default=argparse.SUPPRESS,
                        help="AWS region (default: AWS_REGION / AWS_DEFAULT_REGION / your profile)")
    common.add_argument("--endpoint-url", default=argparse.SUPPRESS,
                        help="send every AWS call here (a stand-in such as moto_server); default AWS_ENDPOINT_URL")

    p = argparse.ArgumentParser(
        prog=COMMAND,
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
    region = region or region_from_env()
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


def cmd_teardown(args: argparse.Namespace) -> None:
    names = check_name(args.name)
    deleted = teardown(make_aws(args), names)
    for d in deleted:
        log(f"deleted {d}")
    if not deleted:
        log(f"nothing to delete for {names.name}")


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
            cmd_teardown(args)
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

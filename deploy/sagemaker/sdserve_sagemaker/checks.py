"""Argument checks shared by the commands: S3 URIs, role and topic ARNs, ECR
image URIs, the model folder and --env pairs. Each raises UserError (exit 2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import UserError

ROLE_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
ECR_IMAGE_RE = re.compile(
    r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?"
    r"/(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127})|@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
SNS_ARN_RE = re.compile(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[\w-]{1,256}$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,1023}$")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


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

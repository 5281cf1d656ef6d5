"""`policy`: the execution role's least-privilege IAM policy, rendered from the
iam-policy.json template beside this package."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .checks import check_topic, s3_prefix
from .errors import Failure, UserError

# Read from the checkout, so the package runs from there (pip install -e ./deploy,
# or PYTHONPATH=deploy/sagemaker): a non-editable install copies the package only.
POLICY_TEMPLATE = Path(__file__).resolve().parent.parent / "iam-policy.json"
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
        hint = (" (it is read from the checkout: pip install -e ./deploy, not a copy)"
                if isinstance(e, FileNotFoundError) and template == POLICY_TEMPLATE else "")
        raise Failure(f"cannot read the policy template {template}: {e}{hint}") from None

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

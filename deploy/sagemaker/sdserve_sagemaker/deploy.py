"""`deploy` and `teardown`: getting the model archive into S3, then making (or
removing) the endpoint, autoscaling and alarms in order."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from .alarms import delete_alarms, put_alarms
from .aws import Aws, aws_call, check_reachable
from .checks import check_image, parse_s3_uri
from .endpoint import create_endpoint, delete_endpoint, existing_resources, wait_in_service
from .errors import COMMAND, Failure, UserError, log
from .names import Names
from .package import package_model
from .plan import DeployPlan
from .scaling import remove_autoscaling, set_autoscaling


def deploy(aws: Aws, plan: DeployPlan) -> dict[str, Any]:
    n = plan.names
    image_region = check_image(plan.image).group("region")
    if image_region != aws.region:
        print(f"warning: the image is in {image_region} but the endpoint goes to {aws.region}; "
              "SageMaker needs the ECR repository in the endpoint's region", file=sys.stderr)

    existing = existing_resources(aws, n)
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
    log(f"  invoke:   {COMMAND} invoke --name {n.name} --prompt 'a lighthouse at dusk' --output out.png")
    log(f"  teardown: {COMMAND} teardown --name {n.name}")
    return {"model_data": model_data}


def create_resources(aws: Aws, plan: DeployPlan, model_data: str) -> None:
    create_endpoint(aws, plan, model_data)
    wait_in_service(aws, plan.names.endpoint, plan.wait_timeout, plan.poll_interval)
    if plan.autoscaling:
        set_autoscaling(aws, plan)
    put_alarms(aws, plan)


def check_s3_model(aws: Aws, uri: str) -> str:
    bucket, key = parse_s3_uri(uri, "--model")
    check_reachable(f"HeadObject {uri}", aws.s3.head_object,
                    f"--model {uri}: no such object (or no permission to read it)", Bucket=bucket, Key=key)
    return uri


def upload_model(aws: Aws, plan: DeployPlan) -> str:
    assert plan.model_upload
    bucket, key = parse_s3_uri(plan.model_upload, "--upload-to")
    check_reachable(f"HeadBucket {bucket}", aws.s3.head_bucket,
                    f"bucket {bucket!r} does not exist or is not yours (for {plan.model_upload})", Bucket=bucket)
    with tempfile.TemporaryDirectory(prefix="sdserve-model-") as tmp:
        archive = Path(tmp) / "model.tar.gz"
        log(f"packaging {plan.model} ...")
        _, count, size = package_model(Path(plan.model), archive, plan.excludes)
        log(f"packaged {count} files ({size / 1e6:.1f} MB raw, {archive.stat().st_size / 1e6:.1f} MB compressed)")
        log(f"uploading to {plan.model_upload}")
        aws_call("upload to S3", aws.s3.upload_file, Filename=str(archive), Bucket=bucket, Key=key)
    return plan.model_upload


def teardown(aws: Aws, names: Names) -> list[str]:
    """Deletes what `deploy` made for these names; missing pieces are skipped."""
    return delete_alarms(aws, names) + remove_autoscaling(aws, names) + delete_endpoint(aws, names)

"""The SageMaker model, endpoint config and endpoint: checking for leftovers,
creating them, waiting for InService, and deleting them."""

from __future__ import annotations

import time
from typing import Any

from .aws import Aws, aws_call, describe_or_none, ignore_missing
from .errors import Failure, log
from .names import VARIANT, Names
from .plan import DeployPlan


def existing_resources(aws: Aws, n: Names) -> list[str]:
    """The endpoint, endpoint config and model of these names that exist already."""
    sm = aws.sagemaker
    return [
        what for what, fn, kw in [
            (f"endpoint {n.endpoint}", sm.describe_endpoint, {"EndpointName": n.endpoint}),
            (f"endpoint config {n.endpoint_config}", sm.describe_endpoint_config, {"EndpointConfigName": n.endpoint_config}),
            (f"model {n.model}", sm.describe_model, {"ModelName": n.model}),
        ] if describe_or_none(fn, **kw) is not None
    ]


def create_endpoint(aws: Aws, plan: DeployPlan, model_data: str) -> None:
    """Creates the model, the endpoint config and the endpoint (without waiting)."""
    n = plan.names
    sm = aws.sagemaker
    name_tag = {"Key": "sdserve:name", "Value": n.name}
    log(f"creating model {n.model}")
    aws_call("CreateModel", sm.create_model,
             ModelName=n.model,
             ExecutionRoleArn=plan.role,
             PrimaryContainer={"Image": plan.image, "ModelDataUrl": model_data, "Environment": plan.env},
             Tags=[name_tag])

    variant = {
        "VariantName": VARIANT,
        "ModelName": n.model,
        "InstanceType": plan.instance_type,
        "InitialInstanceCount": plan.initial_instances,
        "ModelDataDownloadTimeoutInSeconds": plan.download_timeout,
        "ContainerStartupHealthCheckTimeoutInSeconds": plan.startup_timeout,
    }
    config: dict[str, Any] = {"EndpointConfigName": n.endpoint_config, "ProductionVariants": [variant],
                              "Tags": [name_tag]}
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

    tags = [name_tag, {"Key": "sdserve:mode", "Value": plan.mode}]
    if plan.async_input:
        tags.append({"Key": "sdserve:async-input", "Value": plan.async_input})
    log(f"creating endpoint {n.endpoint}")
    aws_call("CreateEndpoint", sm.create_endpoint,
             EndpointName=n.endpoint, EndpointConfigName=n.endpoint_config, Tags=tags)


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


def delete_endpoint(aws: Aws, names: Names) -> list[str]:
    """Deletes the endpoint, its config and its models (found through the endpoint
    when it exists, else by the derived names); returns what was deleted."""
    sm = aws.sagemaker
    deleted: list[str] = []
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

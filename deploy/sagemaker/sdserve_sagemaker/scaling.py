"""Application Auto Scaling for the endpoint's variant: target tracking on
invocations (real-time) or on the backlog plus a scale-out-from-zero step
policy (async), and their removal."""

from __future__ import annotations

from typing import Any

from .alarms import put_backlog_alarm
from .aws import Aws, aws_call, ignore_missing
from .errors import log
from .names import Names
from .plan import DeployPlan

SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"


def _target(n: Names) -> dict[str, Any]:
    """The arguments naming the variant's scalable target in every call."""
    return {"ServiceNamespace": "sagemaker", "ResourceId": n.resource_id, "ScalableDimension": SCALABLE_DIMENSION}


def set_autoscaling(aws: Aws, plan: DeployPlan) -> None:
    n = plan.names
    aas = aws.autoscaling
    target = _target(n)
    log(f"autoscaling {n.resource_id}: {plan.min_instances}..{plan.max_instances} instances")
    aws_call("RegisterScalableTarget", aas.register_scalable_target, **target,
             MinCapacity=plan.min_instances, MaxCapacity=plan.max_instances)
    if plan.mode == "realtime":
        aws_call("PutScalingPolicy", aas.put_scaling_policy, **target,
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
    aws_call("PutScalingPolicy", aas.put_scaling_policy, **target,
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
    step = aws_call("PutScalingPolicy", aas.put_scaling_policy, **target,
                    PolicyName=n.scale_from_zero_policy, PolicyType="StepScaling",
                    StepScalingPolicyConfiguration={
                        "AdjustmentType": "ChangeInCapacity",
                        "MetricAggregationType": "Average",
                        "Cooldown": 300,
                        "StepAdjustments": [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}],
                    })
    put_backlog_alarm(aws, n, step["PolicyARN"])


def remove_autoscaling(aws: Aws, names: Names) -> list[str]:
    """Deletes the variant's scaling policies and scalable target; returns what was deleted."""
    aas = aws.autoscaling
    target = _target(names)
    deleted: list[str] = []
    policies = aws_call("DescribeScalingPolicies", aas.describe_scaling_policies, **target)
    for p in policies.get("ScalingPolicies", []):
        if p["ResourceId"] != names.resource_id:
            continue
        if ignore_missing("DeleteScalingPolicy", aas.delete_scaling_policy, PolicyName=p["PolicyName"], **target):
            deleted.append(f"scaling policy {p['PolicyName']}")
    targets = aws_call("DescribeScalableTargets", aas.describe_scalable_targets,
                       ServiceNamespace="sagemaker", ResourceIds=[names.resource_id],
                       ScalableDimension=SCALABLE_DIMENSION)
    if any(t["ResourceId"] == names.resource_id for t in targets.get("ScalableTargets", [])):
        if ignore_missing("DeregisterScalableTarget", aas.deregister_scalable_target, **target):
            deleted.append(f"scalable target {names.resource_id}")
    return deleted

"""CloudWatch alarms on the endpoint: 5xx and 4xx errors and model latency
(optionally notifying an SNS topic), the async backlog alarm that drives the
scale-out-from-zero policy, and their removal."""

from __future__ import annotations

from typing import Any

from .aws import Aws, aws_call
from .errors import log
from .names import VARIANT, Names
from .plan import DeployPlan


def _put_alarm(aws: Aws, **kwargs: Any) -> None:
    aws_call("PutMetricAlarm", aws.cloudwatch.put_metric_alarm, Namespace="AWS/SageMaker", **kwargs)


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
        _put_alarm(aws, AlarmName=name, AlarmDescription=desc, MetricName=metric,
                   Dimensions=dims, Statistic=stat, Period=period, EvaluationPeriods=evaluations,
                   Threshold=float(threshold), ComparisonOperator=op, TreatMissingData="notBreaching",
                   **actions)


def put_backlog_alarm(aws: Aws, n: Names, policy_arn: str) -> None:
    """Async: HasBacklogWithoutCapacity >= 1 for two minutes triggers policy_arn
    (the step policy adding the first instance)."""
    _put_alarm(aws, AlarmName=n.alarm_backlog,
               AlarmDescription=f"sdserve {n.name}: requests queued while the endpoint has no instance; scales out from zero",
               MetricName="HasBacklogWithoutCapacity",
               Dimensions=[{"Name": "EndpointName", "Value": n.endpoint}],
               Statistic="Average", Period=60, EvaluationPeriods=2, DatapointsToAlarm=2,
               Threshold=1, ComparisonOperator="GreaterThanOrEqualToThreshold",
               TreatMissingData="missing", AlarmActions=[policy_arn])


def delete_alarms(aws: Aws, names: Names) -> list[str]:
    """Deletes whichever of the deployment's alarms exist; returns what was deleted."""
    cw = aws.cloudwatch
    existing = aws_call("DescribeAlarms", cw.describe_alarms, AlarmNames=names.alarms)
    alarm_names = [a["AlarmName"] for a in existing.get("MetricAlarms", [])]
    if not alarm_names:
        return []
    aws_call("DeleteAlarms", cw.delete_alarms, AlarmNames=alarm_names)
    return [f"alarm {a}" for a in alarm_names]

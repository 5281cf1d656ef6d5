"""The boto3 clients (one region, one endpoint URL) and wrappers that run an AWS
call and turn its ClientError into a Failure or UserError with a clear message.

boto3/botocore are imported only when a client or call is needed, so `package`
and `policy` work without them.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from .errors import Failure, UserError, error_code, error_message, is_missing


def region_from_env() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


class Aws:
    """The boto3 clients, all sharing region and endpoint URL."""

    def __init__(self, region: str | None, endpoint_url: str | None):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise UserError(
                "boto3 is not installed: pip install -e ./deploy (deploy/pyproject.toml)"
            ) from None
        region = region or region_from_env()
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


def aws_call(what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Runs one AWS call, turning its failure into a Failure with a clear message."""
    from botocore.exceptions import ClientError

    try:
        return fn(**kwargs)
    except ClientError as e:
        raise Failure(f"{what} failed: {error_message(e)}") from None


def call_if_present(what: str, fn: Callable[..., Any], **kwargs: Any) -> Any | None:
    """As aws_call, but None (and no error) when the thing asked about does not exist."""
    from botocore.exceptions import ClientError

    try:
        return fn(**kwargs)
    except ClientError as e:
        if is_missing(e):
            return None
        raise Failure(f"{what} failed: {error_message(e)}") from None


def ignore_missing(what: str, fn: Callable[..., Any], **kwargs: Any) -> bool:
    """Runs a delete; False (and no error) when the thing was already gone."""
    return call_if_present(what, fn, **kwargs) is not None


def describe_or_none(fn: Callable[..., Any], **kwargs: Any) -> dict[str, Any] | None:
    return call_if_present(fn.__name__, fn, **kwargs)


def check_reachable(what: str, fn: Callable[..., Any], user_message: str, **kwargs: Any) -> None:
    """Runs a HeadObject/HeadBucket: a UserError with user_message when the thing
    is missing or forbidden, a Failure on any other error."""
    from botocore.exceptions import ClientError

    try:
        fn(**kwargs)
    except ClientError as e:
        if is_missing(e) or error_code(e) in {"403", "AccessDenied"}:
            raise UserError(user_message) from None
        raise Failure(f"{what} failed: {error_message(e)}") from None

"""`invoke`: one generation request through a deployed endpoint, real-time
(InvokeEndpoint) or async (request uploaded to S3, InvokeEndpointAsync, result
polled from S3), with the returned image(s) written to disk."""

from __future__ import annotations

import argparse
import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from .aws import Aws, aws_call, call_if_present, describe_or_none
from .checks import parse_s3_uri, s3_prefix
from .errors import Failure, UserError, log
from .names import check_name

ACCEPT = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "json": "application/json"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
    bucket, key = parse_s3_uri(uri, "result location")
    obj = call_if_present(f"reading {uri}", s3.get_object, Bucket=bucket, Key=key)
    if obj is None:
        return None
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

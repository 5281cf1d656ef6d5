"""How the tool reports: progress lines on stdout, the two error kinds that
become exit codes (UserError 2, Failure 1), and reading AWS error responses."""

from __future__ import annotations

# How the tool is run (`__main__.py`), for the usage line and the hints it prints.
COMMAND = "python -m sdserve_sagemaker"


class UserError(Exception):
    """A mistake in the command line or the inputs: exit code 2, no traceback."""


class Failure(Exception):
    """An AWS call or the endpoint failed: exit code 1, no traceback."""


def log(msg: str) -> None:
    print(msg, flush=True)


def _error(e: Exception) -> dict[str, str]:
    return getattr(e, "response", {}).get("Error", {})


def error_code(e: Exception) -> str:
    return _error(e).get("Code", "") or ""


def error_message(e: Exception) -> str:
    err = _error(e)
    return f"{err.get('Code', '?')}: {err.get('Message', str(e))}"


MISSING_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchBucket", "ResourceNotFound",
                 "ResourceNotFoundException", "ObjectNotFoundException"}
MISSING_MESSAGES = ("could not find", "does not exist", "no scalable target", "no scaling policy", "not found")


def is_missing(e: Exception) -> bool:
    """True for the errors AWS gives when the thing asked about does not exist."""
    code = error_code(e)
    if code in MISSING_CODES:
        return True
    msg = str(_error(e).get("Message", "")).lower()
    return code in {"ValidationException", "ValidationError"} and any(s in msg for s in MISSING_MESSAGES)

"""Resource names: every name `deploy` creates (and `teardown` deletes) is
derived from --name."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UserError

VARIANT = "AllTraffic"

# Names must fit SageMaker's pattern; the longest suffix added is "-config" on
# endpoint configs and "-has-backlog-without-capacity" on alarms (255 max).
NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")
NAME_MAX = 48


@dataclass(frozen=True)
class Names:
    """Every resource name `deploy` creates, derived from --name."""

    name: str

    @property
    def endpoint(self) -> str:
        return self.name

    @property
    def endpoint_config(self) -> str:
        return f"{self.name}-config"

    @property
    def model(self) -> str:
        return f"{self.name}-model"

    @property
    def resource_id(self) -> str:
        return f"endpoint/{self.endpoint}/variant/{VARIANT}"

    @property
    def invocations_policy(self) -> str:
        return f"{self.name}-invocations-target"

    @property
    def backlog_policy(self) -> str:
        return f"{self.name}-backlog-target"

    @property
    def scale_from_zero_policy(self) -> str:
        return f"{self.name}-scale-out-from-zero"

    @property
    def alarm_5xx(self) -> str:
        return f"{self.name}-invocation-5xx-errors"

    @property
    def alarm_4xx(self) -> str:
        return f"{self.name}-invocation-4xx-errors"

    @property
    def alarm_latency(self) -> str:
        return f"{self.name}-model-latency"

    @property
    def alarm_backlog(self) -> str:
        return f"{self.name}-has-backlog-without-capacity"

    @property
    def alarms(self) -> list[str]:
        return [self.alarm_5xx, self.alarm_4xx, self.alarm_latency, self.alarm_backlog]

    @property
    def policies(self) -> list[str]:
        return [self.invocations_policy, self.backlog_policy, self.scale_from_zero_policy]


def check_name(name: str) -> Names:
    if not NAME_RE.match(name) or len(name) > NAME_MAX:
        raise UserError(
            f"--name {name!r} is not usable: use letters, digits and single hyphens, "
            f"starting with a letter or digit, at most {NAME_MAX} characters"
        )
    return Names(name)

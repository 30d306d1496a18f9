"""Why a greyed-out key does nothing now: one sentence, shown when it is pressed anyway.

`CoreActions.applies` decides whether a key applies; this says why it does not, from the
same facts (the selected server's state, whether it is a local instance, whether there is
a config file), so an operator is never left with silence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mvtui.cluster.state import Server
from mvtui.instances.record import Instance

ACTIVE_LIFECYCLES = (None, "running")
NOT_MANAGED = "{name} is not a local instance mvtui manages"
NO_SLEEP_WAKE = "sleep and wake are not running"
MANAGED = "{name} is a managed instance, not a [servers] entry: "
MANAGED_REASONS = {
    "capacity": MANAGED + "its capacity is max_concurrent_requests in its [[instances]] entry",
    "remove_server": MANAGED + "stop it (X), or take it out of [[instances]]",
    "save": MANAGED + "there is nothing of it to save",
    "drain_save": MANAGED + "its drain lasts until it stops and is not saved",
}


@dataclass(frozen=True)
class Facts:
    """What the dashboard knows beside the selected server."""

    core_up: bool = True
    config_file: bool = True
    sleep_wake: bool = True  # the core's sleep and wake control is running
    instance: Instance | None = None  # the selected server's, when mvtui manages it


def why_greyed(action: str, server: Server | None, facts: Facts) -> str:
    """One sentence on why `action` (a dashboard action's name) does not apply now."""
    if not facts.core_up:
        return "the core is still starting"
    if action == "reload" or (action in ("save", "drain_save") and not facts.config_file):
        return "mvtui was started without a config file"
    if server is None:
        return "no server is selected"
    if server.removed:
        return f"{server.name} is being removed"
    explain = REASONS.get(action)
    return explain(server, facts) if explain else f"{action.replace('_', ' ')} does not apply to {server.name} now"


def _sleep(server: Server, facts: Facts) -> str:
    if not facts.sleep_wake:
        return NO_SLEEP_WAKE
    if server.lifecycle not in ACTIVE_LIFECYCLES:
        return f"{server.name} is {server.state}"
    if not server.is_up:
        return f"{server.name} is down"
    if server.sleep_capable is False:
        return f"{server.name} was started without sleep mode (vllm serve --enable-sleep-mode)"
    if server.asleep:
        return f"{server.name} is already asleep"
    return f"{server.name} is busy with a sleep or a wake"


def _wake(server: Server, facts: Facts) -> str:
    if not facts.sleep_wake:
        return NO_SLEEP_WAKE
    if server.lifecycle not in ACTIVE_LIFECYCLES:
        return f"{server.name} is {server.state}"
    if server.waking:
        return f"{server.name} is already waking"
    if not server.is_up:
        return f"{server.name} is down, not asleep"
    return f"{server.name} is awake"


def _start(server: Server, facts: Facts) -> str:
    instance = facts.instance
    if instance is None:
        return f"{NOT_MANAGED.format(name=server.name)}: start it where it runs"
    return f"{server.name} is already {'starting' if instance.starting else instance.lifecycle}"


def _stop(server: Server, facts: Facts) -> str:
    if facts.instance is None:
        return f"{NOT_MANAGED.format(name=server.name)}: stop it where it runs"
    return f"{server.name} is not running ({facts.instance.lifecycle})"


def _log(server: Server, facts: Facts) -> str:
    return f"{NOT_MANAGED.format(name=server.name)}: its log is where it runs"


def _chat(server: Server, facts: Facts) -> str:
    if not facts.sleep_wake:
        return "the core is still starting"
    if server.lifecycle == "stopping":
        return f"{server.name} is stopping"
    return f"{server.name} lists no model yet (it has not answered /v1/models)"


def _configured_only(action: str) -> Callable[[Server, Facts], str]:
    def explain(server: Server, facts: Facts) -> str:
        return MANAGED_REASONS[action].format(name=server.name)

    return explain


REASONS: dict[str, Callable[[Server, Facts], str]] = {
    "sleep": _sleep,
    "wake": _wake,
    "start": _start,
    "stop": _stop,
    "instance_log": _log,
    "chat": _chat,
    **{action: _configured_only(action) for action in MANAGED_REASONS},
}

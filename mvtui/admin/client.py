"""`mvtui ps | top | info | start | stop | restart | sleep | wake | drain | undrain | save |
add-server | remove-server | set-capacity`: the running mvtui's
admin API from the shell. Tables for people, `--json` for scripts.

Exit status: 0 done, 1 the command failed, 3 no mvtui is running.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from mvtui.admin.running import RunningMvtui, running_mvtuis
from mvtui.admin.wire import Answer, WireError, exchange

if TYPE_CHECKING:  # the CLI loads only the standard library: it is given the paths
    from mvtui.paths import AppPaths

ADMIN_COMMANDS = (
    "ps",
    "top",
    "info",
    "start",
    "stop",
    "restart",
    "sleep",
    "wake",
    "drain",
    "undrain",
    "save",
    "add-server",
    "remove-server",
    "set-capacity",
)
PERSIST_HELP = "also write the change to the config file (without it, the change lasts until mvtui stops)"
EXIT_FAILED = 1
EXIT_NOT_RUNNING = 3
POLL_S = 0.5
DEFAULT_TIMEOUT_S = 900.0
UNTIL_STOP = "It lasts until mvtui stops; --persist writes it to the config file instead, keeping the file's comments."
DESCRIPTIONS = {
    "ps": "List the servers and local instances of the running mvtui: state, models, requests in flight, load, "
    "local or remote, PID and URL.",
    "top": "What the dashboard shows, once, as plain text: each server's state, models, running and waiting requests "
    "against its capacity, load, KV cache use, requests in flight, requests/s, tokens/s and median time to first "
    "token; then the GPUs when mvtui can read them. For scripts and terminals where the dashboard cannot run.",
    "info": "Show the running mvtui's version, PID, router and admin API addresses, config file (its absolute path), "
    "routing policy, servers, models, log folders and GPUs.",
    "start": "Start a local vLLM instance: one of [[instances]] in the config file, or one made earlier with --new. "
    "With --new, create an instance that serves MODEL, described by the options below. Prints its progress until "
    "it serves, fails, or --timeout passes (--no-wait: returns once the start has begun).",
    "stop": "Stop a local vLLM instance: no new requests, those in flight finish, then SIGTERM to its process group "
    "(SIGKILL after [config] shutdown_timeout).",
    "restart": "Restart a local vLLM instance: stop it as `mvtui stop` does (requests in flight finish first), then "
    "start it again with its [[instances]] entry as the config file says now, so settings changed since its start "
    "(by `mvtui assign`, say) apply. Prints its progress until it serves, fails, or --timeout passes.",
    "sleep": "Put a server to sleep with vLLM's sleep mode, freeing its GPU memory: no new requests, those in flight "
    "finish (up to [config] drain_timeout), then /sleep. Level 1 moves the weights to CPU memory, level 2 drops "
    "them. vLLM must run with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1.",
    "wake": "Wake a sleeping server: /wake_up, and after a level 2 sleep also reload its weights and reset its prefix "
    "cache. It takes requests again once awake.",
    "drain": "Stop sending new requests to a server; the requests in flight finish. " + UNTIL_STOP,
    "undrain": "Send requests to a drained server again. " + UNTIL_STOP,
    "save": "Write a server's live drain and capacity (from drain, undrain or set-capacity without --persist) to "
    "the config file, keeping the file's comments.",
    "add-server": "Add a vLLM server (any OpenAI-compatible URL) to the cluster and write it to the config file (live "
    "only when mvtui runs without one). It gets requests once it answers /health.",
    "remove-server": "Remove a server: no new requests, those in flight finish, then it goes. Without --persist it "
    "comes back when mvtui restarts.",
    "set-capacity": "Change a server's max_concurrent_requests: how many requests at once the router lets it have. " + UNTIL_STOP,
}


ADMIN_ENV = "MVTUI_ADMIN"
ADMIN_HELP = f"which running mvtui, when several run on this machine: its PID, router or admin port, or URL (default: ${ADMIN_ENV})"


class NotRunning(Exception):
    """No mvtui answers at the address in the admin file."""


class AdminFailure(Exception):
    """The admin API answered with an error; the message is for the operator."""


def add_admin_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="give up after this many seconds")
    common.add_argument("--admin", metavar="MVTUI", help=ADMIN_HELP)

    def add(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, description=DESCRIPTIONS[name], **kwargs)  # type: ignore[no-any-return]

    add("ps", parents=[common], help="list the servers and local instances of the running mvtui")
    add("top", parents=[common], help="print what the dashboard shows, once, as plain text")
    add("info", parents=[common], help="show the running mvtui's addresses, config and GPUs")
    start = add("start", parents=[common], help="start a local vLLM instance (from [[instances]]; a new one with --new)")
    start.add_argument("model", metavar="MODEL", help="an instance's name (with --new: a model to serve)")
    start.add_argument("--new", action="store_true", help="create a new instance serving MODEL (the options below describe it)")
    start.add_argument("--name", help="instance name (default: the served model name)")
    start.add_argument("--served-model-name", help="the model name clients ask for")
    start.add_argument("--port", dest="instance_port", metavar="PORT", type=int, help="port (default: a free one from 8100-8199)")
    start.add_argument("--devices", help='GPU indices, e.g. "0,1" (CUDA_VISIBLE_DEVICES)')
    start.add_argument("--gpu-memory-utilization", type=float, help="share of each GPU's memory vLLM may take")
    start.add_argument("--max-model-len", type=int)
    start.add_argument("--tensor-parallel-size", type=int)
    start.add_argument("--no-wait", action="store_true", help="return once the start has begun")
    stop = add("stop", parents=[common], help="stop a local instance (drain, SIGTERM, SIGKILL after a timeout)")
    stop.add_argument("model", metavar="MODEL", help="instance name or model")
    restart = add("restart", parents=[common], help="stop a local instance, then start it again with its current settings")
    restart.add_argument("model", metavar="NAME", help="instance name or model")
    restart.add_argument("--no-wait", action="store_true", help="return once the restart has begun")
    sleep = add("sleep", parents=[common], help="drain a server, then put it to sleep")
    sleep.add_argument("name", metavar="NAME", help="server or instance name")
    sleep.add_argument("--level", type=int, choices=(1, 2), default=1, help="1: weights to CPU RAM; 2: weights dropped")
    wake = add("wake", parents=[common], help="wake a sleeping server (level 2: also reload its weights)")
    wake.add_argument("name", metavar="NAME", help="server or instance name")
    for name, text in (
        ("drain", "stop sending new requests to a server; those in flight finish"),
        ("undrain", "send requests to a drained server again"),
    ):
        verb = add(name, parents=[common], help=text)
        verb.add_argument("name", metavar="NAME", help="server or instance name")
        verb.add_argument("--persist", action="store_true", help=PERSIST_HELP)
    save = add("save", parents=[common], help="write a server's live drain and capacity to the config file")
    save.add_argument("name", metavar="NAME", help="server name or URL")
    add_server = add("add-server", parents=[common], help="add a vLLM server to the cluster and the config file")
    add_server.add_argument("url", metavar="URL")
    add_server.add_argument("--capacity", type=int, default=8, help="max_concurrent_requests (default %(default)s)")
    add_server.add_argument("--name", default="", help="a short name for the dashboard")
    remove = add("remove-server", parents=[common], help="remove a server (requests in flight finish first)")
    remove.add_argument("name", metavar="NAME", help="server name or URL")
    remove.add_argument("--persist", action="store_true", help="also delete it from the config file (without it, it comes back at restart)")
    capacity = add("set-capacity", parents=[common], help="change a server's max_concurrent_requests")
    capacity.add_argument("name", metavar="NAME", help="server name or URL")
    capacity.add_argument("capacity", metavar="N", type=int)
    capacity.add_argument("--persist", action="store_true", help=PERSIST_HELP)


# --- the client ------------------------------------------------------------------------


class AdminClient:
    def __init__(self, url: str, token: str, timeout: float, who: str = "mvtui") -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.who = who

    @classmethod
    def of(cls, mvtui: RunningMvtui, timeout: float) -> AdminClient:
        if mvtui.admin_url is None:
            raise AdminFailure(f"mvtui PID {mvtui.pid} is running, but its admin API is off: {mvtui.admin_off}")
        return cls(mvtui.admin_url, mvtui.token, timeout, who=f"mvtui PID {mvtui.pid}")

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One admin API call (straight to loopback, never via a proxy); its JSON answer."""
        headers = {"Authorization": f"Bearer {self.token}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode() if body is not None else None
        try:
            answer = exchange(self.url + path, method, headers, data, self.timeout)
        except TimeoutError:
            raise AdminFailure(f"no answer from {self.who} within {self.timeout:g} s") from None
        except OSError as error:
            reason = error.strerror or error
            raise AdminFailure(f"{self.who} is running, but nothing answers at {self.url} ({reason})") from None
        except WireError as error:
            raise AdminFailure(f"{self.url} did not answer like mvtui: {error}") from None
        if answer.status >= 400:
            raise AdminFailure(_error_message(answer))
        return json.loads(answer.body or b"null")


def _error_message(answer: Answer) -> str:
    try:
        return str(json.loads(answer.body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"mvtui answered {answer.status} {answer.reason}"


def quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")


# --- the commands ----------------------------------------------------------------------


def run_admin_command(args: argparse.Namespace, paths: AppPaths, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        wanted = args.admin or os.environ.get(ADMIN_ENV) or None
        client = AdminClient.of(choose(running_mvtuis(paths.admin_dir), wanted, paths.admin_dir), args.timeout)
        return COMMANDS[args.command](client, args, out)
    except NotRunning as error:
        print(f"mvtui {args.command}: {error}", file=err)
        return EXIT_NOT_RUNNING
    except AdminFailure as error:
        print(f"mvtui {args.command}: {error}", file=err)
        return EXIT_FAILED


def choose(running: list[RunningMvtui], wanted: str | None, folder: Path) -> RunningMvtui:
    """The mvtui to talk to: the one `wanted` names, else the only one running."""
    if wanted:
        named = [mvtui for mvtui in running if mvtui.answers_to(wanted)]
        if len(named) == 1:
            return named[0]
        if not named:
            raise NotRunning(
                f"no running mvtui is {wanted!r}" + (_listed(running, "; running now:") or f" (no live admin file in {folder})")
            )
        raise AdminFailure(f"{wanted!r} names {len(named)} running mvtui; use a PID{_listed(named, ':')}")
    if len(running) == 1:
        return running[0]
    if not running:
        raise NotRunning(f"no mvtui is running (no live admin file in {folder}); start one with `mvtui` or `mvtui --no-ui`")
    raise AdminFailure(f"{len(running)} mvtui are running; choose one with --admin PID (or ${ADMIN_ENV}){_listed(running, ':')}")


def _listed(running: list[RunningMvtui], head: str) -> str:
    return "".join([head, *(f"\n  {mvtui.describe()}" for mvtui in running)]) if running else ""


def _ps(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    answer = client.call("GET", "/servers")
    servers, fleet = answer["servers"], answer.get("fleet")
    instances = client.call("GET", "/instances")["instances"]
    if args.json:
        return _print_json({"servers": servers, "instances": instances, **({"fleet": fleet} if fleet else {})}, out)
    print(format_ps(servers, instances), file=out)
    if fleet:
        print("\n" + format_fleet(fleet), file=out)
    return 0


def format_fleet(fleet: dict[str, Any]) -> str:
    """The replicas sharing the cluster through Redis ([cluster] redis_url), this one marked *."""
    if fleet["connected"]:
        head = f"fleet: {len(fleet['replicas'])} replicas sharing {fleet['redis']}"
    else:
        head = f"fleet: Redis {fleet['redis']} unreachable ({fleet['problem']}): degraded, routing on the last known overlay"
    rows = [
        [
            replica["name"] + ("*" if replica["me"] else ""),
            replica["address"],
            f"{replica['requests_per_s']:.1f}",
            str(replica["in_flight"]),
            str(replica["queued"]),
            f"{replica['heartbeat_age_s']:.1f}s",
        ]
        for replica in fleet["replicas"]
    ]
    return head + "\n" + table(["REPLICA", "ADDRESS", "REQ/S", "IN-FLIGHT", "QUEUED", "HEARTBEAT"], rows)


def format_ps(servers: list[dict[str, Any]], instances: list[dict[str, Any]]) -> str:
    if not servers:
        return "no servers and no instances (add [servers] or [[instances]] to the config)"
    by_name = {instance["name"]: instance for instance in instances}
    rows = []
    for server in servers:
        instance = by_name.get(server.get("instance") or "")
        rows.append(
            [
                server["name"],
                server["state"],
                ",".join(server["models"]) or "-",
                _in_flight(server),
                f"{server['load']:.2f}",
                "local" if instance else "remote",
                str(instance["pid"]) if instance and instance["pid"] else "-",
                server["url"],
            ]
        )
    lines = [table(["NAME", "STATE", "MODELS", "IN-FLIGHT", "LOAD", "KIND", "PID", "URL"], rows)]
    for instance in instances:
        if instance.get("error"):
            lines.append(f"\n{instance['name']}: {instance['error']}")
    return "\n".join(lines)


def _in_flight(server: dict[str, Any]) -> str:
    """This mvtui's requests in flight; in a fleet, `own/all replicas'`."""
    total = server.get("total_in_flight", server["in_flight"])
    return str(server["in_flight"]) if total == server["in_flight"] else f"{server['in_flight']}/{total}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[column])) for row in [header, *rows]) for column in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in [header, *rows])


def _info(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    info = client.call("GET", "/info")
    if args.json:
        return _print_json(info, out)
    gpus = info.get("gpus") or {}
    devices = gpus.get("devices")
    shown = (
        "; ".join(f"{gpu['index']}: {gpu['name']} {_gib(gpu['memory_used'])}/{_gib(gpu['memory_total'])}" for gpu in devices)
        if devices
        else f"none ({gpus.get('unavailable', 'unknown')})"
    )
    rows = [
        ("version", info["version"]),
        ("pid", str(info["pid"])),
        ("router", info["router_url"]),
        ("admin API", info["admin_url"]),
        ("config", info["config_path"] or "none"),
        ("policy", info["policy"]),
        ("servers", f"{info['servers']} ({_counted(info['instances'], 'local instance')})"),
        ("models", ", ".join(info["models"]) or "none"),
        ("in flight", str(info["in_flight"])),
        ("logs", info["log_dir"]),
        ("instance logs", info["instance_logs"]),
        ("GPUs", shown),
    ]
    width = max(len(key) for key, _ in rows)
    print("\n".join(f"{key.ljust(width)}  {value}" for key, value in rows), file=out)
    return 0


def _top(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    from mvtui.admin.top import format_top

    info = client.call("GET", "/info")
    servers = client.call("GET", "/servers")["servers"]
    if args.json:
        return _print_json({"info": info, "servers": servers}, out)
    print(format_top(info, servers), file=out)
    return 0


def _start(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    """An existing instance; a new one only with --new, so a typo never launches a model."""
    params = _start_params(args)
    if params and not args.new:
        raise AdminFailure(f"--{next(iter(params)).replace('_', '-')} describes a new instance: add --new")
    try:
        instance = client.call("POST", "/instances", {"model": args.model, "params": params, "create": args.new})
    except AdminFailure as error:
        if args.new or not str(error).startswith("no instance named"):
            raise
        raise AdminFailure(f"{error}; to create one, run `mvtui start --new {args.model}`") from None
    if not args.no_wait:
        instance = _follow_start(client, instance, args, out)
    if args.json:
        _print_json(instance, out)
    elif instance["lifecycle"] == "running":
        print(f"{instance['name']} running on {instance['url']} (pid {instance['pid']}, log {instance['log']})", file=out)
    elif instance["lifecycle"] == "starting":
        print(f"{instance['name']} starting on {instance['url']}; follow it with `mvtui ps`", file=out)
    elif instance["lifecycle"] != "error":
        print(f"{instance['name']} {instance['lifecycle']}", file=out)
    if instance["lifecycle"] == "error":
        raise AdminFailure(f"{instance['name']} failed to start: {instance['error']}")
    return 0


def _start_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {
        "name": args.name,
        "served_model_name": args.served_model_name,
        "port": args.instance_port,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "max_model_len": args.max_model_len,
        "tensor_parallel_size": args.tensor_parallel_size,
    }
    if args.devices is not None:
        params["devices"] = args.devices
    return {key: value for key, value in params.items() if value is not None}


def _follow_start(client: AdminClient, instance: dict[str, Any], args: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    """Poll the instance, printing its progress (unless --json), until it runs or fails."""
    deadline = time.monotonic() + args.timeout
    shown = ""
    path = f"/instances/{quoted(instance['name'])}"
    while instance["lifecycle"] == "starting":
        progress = instance.get("progress") or "starting"
        if progress != shown and not args.json:
            print(f"{instance['name']}: {progress}", file=out, flush=True)
            shown = progress
        if time.monotonic() >= deadline:
            raise AdminFailure(f"{instance['name']} is still starting after {args.timeout:g} s")
        time.sleep(POLL_S)
        instance = client.call("GET", path)
    return instance


def _stop(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    instance = client.call("DELETE", f"/instances/{quoted(args.model)}")
    return _done(instance, args, out, f"{instance['name']} {instance['lifecycle']}")


def _restart(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    instance = client.call("POST", f"/instances/{quoted(args.model)}/restart", {"wait": False})
    if not args.no_wait:
        instance = _follow_start(client, _follow_stop(client, instance, args, out), args, out)
    if args.json:
        _print_json(instance, out)
    elif instance["lifecycle"] == "running":
        print(f"{instance['name']} running on {instance['url']} (pid {instance['pid']}, log {instance['log']})", file=out)
    elif instance["lifecycle"] != "error":
        print(f"{instance['name']} {instance['lifecycle']}", file=out)
    if instance["lifecycle"] == "error":
        raise AdminFailure(f"{instance['name']} failed to start: {instance['error']}")
    return 0


def _follow_stop(client: AdminClient, instance: dict[str, Any], args: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    """Poll while the instance stops (requests in flight finish first)."""
    deadline = time.monotonic() + args.timeout
    path = f"/instances/{quoted(instance['name'])}"
    if instance["lifecycle"] == "stopping" and not args.json:
        print(f"{instance['name']}: stopping, {instance['in_flight']} in flight", file=out, flush=True)
    while instance["lifecycle"] == "stopping":
        if time.monotonic() >= deadline:
            raise AdminFailure(f"{instance['name']} is still stopping after {args.timeout:g} s")
        time.sleep(POLL_S)
        instance = client.call("GET", path)
    return instance


def _sleep(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    server = client.call("POST", f"/servers/{quoted(args.name)}/sleep", {"level": args.level})
    return _done(server, args, out, f"{server['name']} {server['state']}")


def _wake(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    server = client.call("POST", f"/servers/{quoted(args.name)}/wake")
    return _done(server, args, out, f"{server['name']} {server['state']}")


def _server_change(action: str) -> Callable[[AdminClient, argparse.Namespace, TextIO], int]:
    """drain, undrain, save: the server's state after it, and what was saved where."""

    def run(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
        body = {"persist": True} if getattr(args, "persist", False) else None
        server = client.call("POST", f"/servers/{quoted(args.name)}/{action}", body)
        return _done(server, args, out, f"{server['message']} [{server['state']}]")

    return run


def _add_server(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    body = {"url": args.url, "max_concurrent_requests": args.capacity, "name": args.name}
    change = client.call("POST", "/servers", body)
    return _done(change, args, out, change["message"])


def _remove_server(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    change = client.call("DELETE", f"/servers/{quoted(args.name)}" + ("?persist=1" if args.persist else ""))
    return _done(change, args, out, change["message"])


def _set_capacity(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    server = client.call("PATCH", f"/servers/{quoted(args.name)}", {"max_concurrent_requests": args.capacity, "persist": args.persist})
    return _done(server, args, out, server["changes"][0]["message"])


def _done(payload: dict[str, Any], args: argparse.Namespace, out: TextIO, line: str) -> int:
    if args.json:
        return _print_json(payload, out)
    print(line, file=out)
    return 0


def _print_json(payload: Any, out: TextIO) -> int:
    print(json.dumps(payload, indent=2), file=out)
    return 0


def _counted(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _gib(size: int | None) -> str:
    return "?" if size is None else f"{size / 1024**3:.1f} GiB"


COMMANDS: dict[str, Callable[[AdminClient, argparse.Namespace, TextIO], int]] = {
    "ps": _ps,
    "top": _top,
    "info": _info,
    "start": _start,
    "stop": _stop,
    "restart": _restart,
    "sleep": _sleep,
    "wake": _wake,
    "drain": _server_change("drain"),
    "undrain": _server_change("undrain"),
    "save": _server_change("save"),
    "add-server": _add_server,
    "remove-server": _remove_server,
    "set-capacity": _set_capacity,
}

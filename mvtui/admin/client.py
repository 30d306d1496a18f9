"""`mvtui ps | info | start | stop | sleep | wake | drain | undrain | save | add-server |
remove-server | set-capacity`: the running mvtui's
admin API from the shell. Tables for people, `--json` for scripts.

Exit status: 0 done, 1 the command failed, 3 no mvtui is running.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from mvtui.paths import AppPaths

ADMIN_COMMANDS = ("ps", "info", "start", "stop", "sleep", "wake", "drain", "undrain", "save", "add-server", "remove-server", "set-capacity")
PERSIST_HELP = "also write the change to the config file (without it, the change lasts until mvtui stops)"
EXIT_FAILED = 1
EXIT_NOT_RUNNING = 3
POLL_S = 0.5
DEFAULT_TIMEOUT_S = 900.0


class NotRunning(Exception):
    """No mvtui answers at the address in the admin file."""


class AdminFailure(Exception):
    """The admin API answered with an error; the message is for the operator."""


def add_admin_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="give up after this many seconds")
    add = subparsers.add_parser
    add("ps", parents=[common], help="list the servers and local instances of the running mvtui")
    add("info", parents=[common], help="show the running mvtui's addresses, config and GPUs")
    start = add("start", parents=[common], help="start a local vLLM instance (from [[instances]]; a new one with --new)")
    start.add_argument("model", metavar="MODEL", help="an instance's name (with --new: a model to serve)")
    start.add_argument("--new", action="store_true", help="create a new instance serving MODEL (the options below describe it)")
    start.add_argument("--name", help="instance name (default: the served model name)")
    start.add_argument("--served-model-name", help="the model name clients ask for")
    start.add_argument("--port", dest="instance_port", type=int, help="port (default: a free one from 8100-8199)")
    start.add_argument("--devices", help='GPU indices, e.g. "0,1" (CUDA_VISIBLE_DEVICES)')
    start.add_argument("--gpu-memory-utilization", type=float, help="share of each GPU's memory vLLM may take")
    start.add_argument("--max-model-len", type=int)
    start.add_argument("--tensor-parallel-size", type=int)
    start.add_argument("--no-wait", action="store_true", help="return once the start has begun")
    stop = add("stop", parents=[common], help="stop a local instance (drain, SIGTERM, SIGKILL after a timeout)")
    stop.add_argument("model", metavar="MODEL", help="instance name or model")
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
    def __init__(self, url: str, token: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy

    @classmethod
    def from_file(cls, path: Path, timeout: float) -> "AdminClient":
        try:
            details = json.loads(path.read_text(encoding="utf-8"))
            return cls(details["url"], details["token"], timeout)
        except FileNotFoundError:
            raise NotRunning(f"no mvtui is running ({path} does not exist); start one with `mvtui` or `mvtui --no-ui`") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise NotRunning(f"cannot read {path}: {error}") from None

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            raise AdminFailure(_error_message(error)) from None
        except (urllib.error.URLError, ConnectionError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, TimeoutError):
                raise AdminFailure(f"no answer from mvtui within {self.timeout:g} s") from None
            raise NotRunning(f"no mvtui is running: nothing answers at {self.url} ({reason}); the admin file is stale") from None
        except TimeoutError:
            raise AdminFailure(f"no answer from mvtui within {self.timeout:g} s") from None


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(error.read())["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"mvtui answered {error.code} {error.reason}"


def quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")


# --- the commands ----------------------------------------------------------------------


def run_admin_command(args: argparse.Namespace, paths: AppPaths, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        client = AdminClient.from_file(paths.admin_file, args.timeout)
        return COMMANDS[args.command](client, args, out)
    except NotRunning as error:
        print(f"mvtui {args.command}: {error}", file=err)
        return EXIT_NOT_RUNNING
    except AdminFailure as error:
        print(f"mvtui {args.command}: {error}", file=err)
        return EXIT_FAILED


def _ps(client: AdminClient, args: argparse.Namespace, out: TextIO) -> int:
    servers = client.call("GET", "/servers")["servers"]
    instances = client.call("GET", "/instances")["instances"]
    if args.json:
        return _print_json({"servers": servers, "instances": instances}, out)
    print(format_ps(servers, instances), file=out)
    return 0


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
                str(server["in_flight"]),
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


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[column])) for row in [header, *rows]) for column in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows])


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
        ("servers", f"{info['servers']} ({info['instances']} local instances)"),
        ("models", ", ".join(info["models"]) or "none"),
        ("in flight", str(info["in_flight"])),
        ("logs", info["log_dir"]),
        ("instance logs", info["instance_logs"]),
        ("GPUs", shown),
    ]
    width = max(len(key) for key, _ in rows)
    print("\n".join(f"{key.ljust(width)}  {value}" for key, value in rows), file=out)
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


def _gib(size: int | None) -> str:
    return "?" if size is None else f"{size / 1024**3:.1f} GiB"


COMMANDS: dict[str, Callable[[AdminClient, argparse.Namespace, TextIO], int]] = {
    "ps": _ps,
    "info": _info,
    "start": _start,
    "stop": _stop,
    "sleep": _sleep,
    "wake": _wake,
    "drain": _server_change("drain"),
    "undrain": _server_change("undrain"),
    "save": _server_change("save"),
    "add-server": _add_server,
    "remove-server": _remove_server,
    "set-capacity": _set_capacity,
}

"""`mvtui models | pull | run | assign`: models as Ollama treats them, from the shell.

`models` lists the local Hugging Face cache with the `[[instances]]` entries that use each
model (their state from the running mvtui, else the config file); `pull` downloads into the
cache; `run` chats through the running mvtui (starting or waking the model's instance
first) or any `--url`; `assign` writes a model's `[[instances]]` entry, keeping the file's
comments. The domain work is in `mvtui.models` and `mvtui.config`; this module parses the
options, talks to the admin API and prints. huggingface_hub and openai load only here, and
only in the commands that use them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

from mvtui.admin.client import (
    ADMIN_ENV,
    ADMIN_HELP,
    DEFAULT_TIMEOUT_S,
    EXIT_FAILED,
    EXIT_NOT_RUNNING,
    AdminClient,
    AdminFailure,
    NotRunning,
    _follow_start,
    choose,
    quoted,
    table,
)
from mvtui.admin.running import RunningMvtui, running_mvtuis

if TYPE_CHECKING:
    from mvtui.models.cache import CachedModel, CacheListing
    from mvtui.paths import AppPaths

EXIT_INTERRUPTED = 130
API_KEY_ENV = "MVTUI_API_KEY"
DESCRIPTIONS = {
    "models": "List the models in the local Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else "
    "~/.cache/huggingface/hub), read with huggingface_hub's cache scanner: repo id, whether it generates text or "
    "makes embeddings (from its config.json), size on disk, the revision in use and when it was downloaded, and "
    "the [[instances]] entries that use it with their state (from the running mvtui, else the config file).",
    "pull": "Download a model from the Hugging Face hub (HF_ENDPOINT, default https://huggingface.co) into the "
    "local cache, with a progress bar. Run it again after an interruption: the files already downloaded are kept. "
    "A private or gated model needs a login (`hf auth login`, or HF_TOKEN).",
    "run": "Chat with a model in the terminal, its answers streamed, through the running mvtui's router (or any "
    "OpenAI-compatible --url). An instance that sleeps is woken and one that is stopped is started first, with its "
    "progress shown. The conversation is kept and sent with each question; /system TEXT sets the system prompt, "
    "/clear forgets the conversation, /exit or Ctrl-D leaves; Ctrl-C stops an answer without leaving.",
    "assign": "Set a model's launch settings in its [[instances]] entry of the config file, or add the entry: "
    "only the options given change, and the file keeps its comments and layout. The config file is --config, else "
    "the running mvtui's, else $MVTUI_CONFIG, else the platform's. A running mvtui reads the change at once; a "
    "running instance takes it at its next start (`mvtui restart NAME`).",
}


class CommandFailed(Exception):
    """The command could not do what was asked; the message says why."""


def add_model_command(commands: Any, name: str, help: str) -> None:
    """The parser of `mvtui NAME`, one of DESCRIPTIONS."""
    parser = commands.add_parser(name, help=help, description=DESCRIPTIONS[name])
    BUILDERS[name](parser)


def _models_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _config_option(parser)
    parser.add_argument("--admin", metavar="MVTUI", help=ADMIN_HELP)


def _pull_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a Hugging Face repo id, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--revision", help="a branch, tag or commit (default: main)")
    parser.add_argument("--json", action="store_true", help="print what was downloaded as JSON")


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a model the cluster serves, or an instance's name")
    parser.add_argument("--url", help="chat through this OpenAI-compatible server instead (http://HOST:PORT[/v1]); nothing is started")
    parser.add_argument("--api-key", help=f"the router's API key, when [router] api_keys is set (default: ${API_KEY_ENV})")
    parser.add_argument("--max-tokens", type=int, help="the longest answer, in tokens (default: the server's)")
    parser.add_argument("--verbose", action="store_true", help="after each answer, its token counts and speed")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="how long a start or a wake may take, in seconds")
    parser.add_argument("--admin", metavar="MVTUI", help=ADMIN_HELP)


def _assign_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="an entry's name, or a model (Hugging Face repo id or local path)")
    parser.add_argument("--name", help="the entry's name (default: the served name)")
    parser.add_argument("--served-model-name", help="the model name clients ask for (default: MODEL)")
    parser.add_argument("--devices", help='GPU indices, e.g. "0,1" (CUDA_VISIBLE_DEVICES); "" for none')
    parser.add_argument("--gpu-memory-utilization", type=float, help="share of each GPU's memory vLLM may take")
    parser.add_argument("--max-model-len", type=int, help="vLLM's --max-model-len (0: the model's own)")
    parser.add_argument("--tensor-parallel-size", type=int, help="vLLM's --tensor-parallel-size")
    parser.add_argument("--extra-arg", action="append", metavar="ARG", help="an argument for `vllm serve` (repeat it; replaces extra_args)")
    parser.add_argument("--preload", action=argparse.BooleanOptionalAction, help="start it when mvtui starts")
    parser.add_argument("--idle-timeout", type=float, help="seconds without requests before idle_action (0: never)")
    parser.add_argument("--idle-action", choices=("sleep1", "sleep2", "stop"), help="what idle_timeout does")
    parser.add_argument("--new", action="store_true", help="add an entry for a model that is neither in the cache nor on disk")
    parser.add_argument("--show", action="store_true", help="print the entry as the file now writes it")
    parser.add_argument("--json", action="store_true", help="print the entry as JSON")
    _config_option(parser)
    parser.add_argument("--admin", metavar="MVTUI", help=ADMIN_HELP)


def _config_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: `mvtui --config FILE assign ...` keeps working (the sub-command's default would overwrite it)
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="the config file")


BUILDERS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "models": _models_options,
    "pull": _pull_options,
    "run": _run_options,
    "assign": _assign_options,
}


# --- running one -----------------------------------------------------------------------------


def run_model_command(args: argparse.Namespace, paths: AppPaths, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        return COMMANDS[args.command](args, paths, out, err)
    except NotRunning as error:
        print(f"mvtui {args.command}: {error}", file=err)
        return EXIT_NOT_RUNNING
    except KeyboardInterrupt:
        print(f"\nmvtui {args.command}: interrupted", file=err)
        return EXIT_INTERRUPTED
    except Exception as error:
        if not for_the_operator(error):
            raise
        print(f"mvtui {args.command}: {error}", file=err)
        return EXIT_FAILED


def for_the_operator(error: Exception) -> bool:
    """An error whose message is meant for people. mvtui.errors (which loads aiohttp) is
    consulted only when loaded: an error of its own means it is."""
    errors = sys.modules.get("mvtui.errors")
    return isinstance(error, (CommandFailed, AdminFailure, *((errors.MvtuiError,) if errors else ())))


def _running(args: argparse.Namespace, paths: AppPaths) -> RunningMvtui:
    wanted = getattr(args, "admin", None) or os.environ.get(ADMIN_ENV) or None
    return choose(running_mvtuis(paths.admin_dir), wanted, paths.admin_dir)


def _running_or_none(args: argparse.Namespace, paths: AppPaths) -> RunningMvtui | None:
    try:
        return _running(args, paths)
    except NotRunning:
        return None


def _print_json(payload: Any, out: TextIO) -> int:
    print(json.dumps(payload, indent=2), file=out)
    return 0


def size_text(size: int) -> str:
    """`1.5GiB`, `12.0MiB`: no space, so `awk` reads the column."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f}{unit}"
    return f"{size}B"


# --- mvtui models ------------------------------------------------------------------------------


class Users(NamedTuple):
    """The [[instances]] entries, as the running mvtui or the config file has them."""

    source: str  # a phrase: where the entries (and their states) come from
    instances: list[dict[str, Any]]  # name, model, state (None: mvtui is not running)


def _models(args: argparse.Namespace, paths: AppPaths, out: TextIO, err: TextIO) -> int:
    from mvtui.models.cache import scan_models

    listing = scan_models()
    users = _instance_users(args, paths, err)
    if args.json:
        return _print_json(_models_json(listing, users), out)
    print(format_models(listing, users), file=out)
    return 0


def _instance_users(args: argparse.Namespace, paths: AppPaths, err: TextIO) -> Users:
    try:
        mvtui = _running(args, paths)
        found = AdminClient.of(mvtui, 10.0).call("GET", "/instances")["instances"]
        instances = [{"name": item["name"], "model": item["model"], "state": item["lifecycle"]} for item in found]
        return Users(f"instances and their states from mvtui PID {mvtui.pid}", instances)
    except NotRunning:
        pass
    except AdminFailure as error:
        print(f"mvtui models: {error}; the states are left out", file=err)
    return _configured_users(Path(os.path.abspath(paths.config_file(getattr(args, "config", None)))), err)


def _configured_users(path: Path, err: TextIO) -> Users:
    from mvtui.config.schema import load_config
    from mvtui.errors import ConfigError

    if not path.exists():
        return Users(f"no [[instances]]: no config file at {path}", [])
    try:
        config = load_config(path)
    except ConfigError as error:
        print(f"mvtui models: the config file is left out:\n{error}", file=err)
        return Users(f"no [[instances]]: {path} has problems", [])
    instances = [{"name": item.label, "model": item.model, "state": None} for item in config.instances]
    return Users(f"instances from {path} (no mvtui is running)", instances)


def users_of(model: CachedModel, users: Users) -> list[dict[str, Any]]:
    return [instance for instance in users.instances if model.is_used_by(instance["model"])]


def _not_cached(listing: CacheListing, users: Users) -> list[dict[str, Any]]:
    """Entries whose model is a hub id that the cache does not hold (vLLM downloads it at start)."""
    cached = [instance for model in listing.models for instance in users_of(model, users)]
    return [item for item in users.instances if item not in cached and not Path(item["model"]).expanduser().exists()]


def format_models(listing: CacheListing, users: Users) -> str:
    if not listing.exists:
        lines = [f"no Hugging Face cache at {listing.folder} yet (`mvtui pull MODEL` makes it; HF_HOME or HF_HUB_CACHE move it)"]
    elif not listing.models:
        lines = [f"no models in the Hugging Face cache at {listing.folder} (`mvtui pull MODEL` downloads one)"]
    else:
        lines = [table(["MODEL", "KIND", "SIZE", "REVISION", "DATE", "INSTANCES"], [_row(model, users) for model in listing.models])]
        total = sum(model.size for model in listing.models)
        lines.append(f"\n{len(listing.models)} model{'s' if len(listing.models) != 1 else ''}, {size_text(total)} in {listing.folder}")
    if listing.incomplete_files:
        lines.append(f"interrupted downloads left {size_text(listing.incomplete_bytes)} in {listing.incomplete_files} .incomplete file(s)")
    for item in _not_cached(listing, users):
        lines.append(
            f"not in the cache: {item['name']} ({item['model']}): `mvtui pull {item['model']}`, or vLLM downloads it when it starts"
        )
    lines.append(users.source)
    return "\n".join(lines)


def _row(model: CachedModel, users: Users) -> list[str]:
    from datetime import datetime

    revision = model.revision.commit[:12] + (f"+{len(model.revisions) - 1}" if len(model.revisions) > 1 else "")
    named = [item["name"] + (f":{item['state']}" if item["state"] else "") for item in users_of(model, users)]
    day = datetime.fromtimestamp(model.revision.downloaded).strftime("%Y-%m-%d")
    return [model.repo_id, model.kind, size_text(model.size), revision, day, ",".join(named) or "-"]


def _models_json(listing: CacheListing, users: Users) -> dict[str, Any]:
    return {
        "cache_dir": str(listing.folder),
        "exists": listing.exists,
        "models": [{**model.as_json(), "instances": users_of(model, users)} for model in listing.models],
        "incomplete_bytes": listing.incomplete_bytes,
        "incomplete_files": listing.incomplete_files,
        "not_cached": _not_cached(listing, users),
        "instances_from": users.source,
        "warnings": list(listing.warnings),
    }


# --- mvtui pull --------------------------------------------------------------------------------


def _pull(args: argparse.Namespace, paths: AppPaths, out: TextIO, err: TextIO) -> int:
    from mvtui.models.cache import cache_folder
    from mvtui.models.pull import hub_endpoint, pull

    if not args.json:
        print(f"pulling {args.model} ({args.revision or 'main'}) from {hub_endpoint()} into {cache_folder()}", file=out, flush=True)
    with _leave_on_ctrl_c(f"interrupted; run it again to resume {args.model} (the files already downloaded are kept)", out, err):
        pulled = pull(args.model, args.revision)
    if args.json:
        return _print_json(pulled.as_json(), out)
    print(f"{pulled.repo_id} {pulled.commit[:12]}: {pulled.files} files, {size_text(pulled.size)} in {pulled.path}", file=out)
    return 0


@contextlib.contextmanager
def _leave_on_ctrl_c(message: str, out: TextIO, err: TextIO) -> Iterator[None]:
    """Ctrl-C ends the process at once: a KeyboardInterrupt would first wait for the
    download threads to finish (or time out on) the files they are fetching."""

    def leave(signum: int, frame: Any) -> None:
        out.flush()
        print(f"\nmvtui pull: {message}", file=err, flush=True)
        os._exit(EXIT_INTERRUPTED)

    previous = signal.signal(signal.SIGINT, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# --- mvtui run ---------------------------------------------------------------------------------


class Target(NamedTuple):
    base_url: str
    model: str  # the name the router knows


def _run(args: argparse.Namespace, paths: AppPaths, out: TextIO, err: TextIO) -> int:
    from openai import OpenAI

    from mvtui.models.chat import Chat

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or "none"
    target = _url_target(args, api_key) if args.url else _mvtui_target(args, paths, out)
    client = OpenAI(base_url=target.base_url, api_key=api_key, max_retries=0)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    print(f"chatting with {target.model} through {target.base_url} (/help: commands; /exit or Ctrl-D: leave)", file=out, flush=True)
    return Chat(client, target.model, out, max_tokens=args.max_tokens, verbose=args.verbose).loop()


def _url_target(args: argparse.Namespace, api_key: str) -> Target:
    from openai import APIConnectionError, APIError, OpenAI

    from mvtui.models.names import unknown_model

    base = args.url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    try:
        with OpenAI(base_url=base, api_key=api_key, max_retries=0, timeout=args.timeout) as client:
            models = [model.id for model in client.models.list()]
    except APIConnectionError as error:
        raise CommandFailed(f"cannot reach {base}: {error.__cause__ or error}") from None
    except APIError as error:
        raise CommandFailed(f"{base}/models answered: {error.message}") from None
    if args.model not in models:
        raise CommandFailed(unknown_model(args.model, models, f"not listed by {base}/models"))
    return Target(base, args.model)


def _mvtui_target(args: argparse.Namespace, paths: AppPaths, out: TextIO) -> Target:
    mvtui = _running(args, paths)
    client = AdminClient.of(mvtui, args.timeout)
    servers = client.call("GET", "/servers")["servers"]
    instances = client.call("GET", "/instances")["instances"]
    model = served_name(args.model, servers, instances, f"mvtui PID {mvtui.pid} serves no such model")
    make_ready(client, model, servers, instances, args, out)
    return Target(mvtui.router_url.rstrip("/") + "/v1", model)


def served_name(wanted: str, servers: list[dict[str, Any]], instances: list[dict[str, Any]], where: str) -> str:
    """The model name the router routes by: `wanted` itself, or that of the instance it names."""
    from mvtui.models.names import unknown_model

    if any(wanted in server["models"] for server in servers):
        return wanted
    for instance in instances:
        if wanted in (instance["name"], instance["model"]):
            return str(instance["served_model_name"])
    known = [model for server in servers for model in server["models"]]
    known += [name for instance in instances for name in (instance["name"], instance["model"])]
    raise CommandFailed(unknown_model(wanted, known, where))


def make_ready(
    client: AdminClient, model: str, servers: list[dict[str, Any]], instances: list[dict[str, Any]], args: argparse.Namespace, out: TextIO
) -> None:
    """Wake a sleeping server or start a stopped instance of `model` when none can take it."""
    serving = [server for server in servers if model in server["models"] and not server["draining"]]
    if any(server["routable"] for server in serving):
        return
    asleep = [server for server in serving if server["sleep_level"] or server["waking"]]
    if asleep:
        _wake(client, asleep[0], out)
        return
    startable = [item for item in instances if item["served_model_name"] == model and item["lifecycle"] in ("stopped", "error", "starting")]
    if startable:
        _start(client, startable[0], args, out)


def _wake(client: AdminClient, server: dict[str, Any], out: TextIO) -> None:
    print(f"{server['name']} is {server['state']}: waking it", file=out, flush=True)
    woken = client.call("POST", f"/servers/{quoted(server['name'])}/wake")
    print(f"{woken['name']} {woken['state']}", file=out, flush=True)


def _start(client: AdminClient, instance: dict[str, Any], args: argparse.Namespace, out: TextIO) -> None:
    print(f"{instance['name']} is {instance['lifecycle']}: starting it", file=out, flush=True)
    started = client.call("POST", "/instances", {"model": instance["name"], "create": False})
    started = _follow_start(client, started, argparse.Namespace(timeout=args.timeout, json=False), out)
    if started["lifecycle"] != "running":
        raise CommandFailed(f"{started['name']} did not start: {started['error'] or started['lifecycle']}")
    print(f"{started['name']} running", file=out, flush=True)


# --- mvtui assign ------------------------------------------------------------------------------


def _assign(args: argparse.Namespace, paths: AppPaths, out: TextIO, err: TextIO) -> int:
    import tomlkit

    from mvtui.config.edit import find_instance

    path, mvtui = _config_to_edit(args, paths)
    values = assign_values(args)
    document = tomlkit.parse(_checked_text(path))
    entry = find_instance(document, args.model)
    if values:
        return _write_entry(path, mvtui, args, values, added=entry is None, document=document, out=out)
    if entry is None:
        raise CommandFailed(f"no [[instances]] entry for {args.model!r} in {path}; give settings to add one")
    if not (args.show or args.json):
        raise CommandFailed("nothing to change: give settings (see --help), or --show to print the entry")
    _show_entry(path, args, entry, None, out)
    return 0


def _write_entry(
    path: Path, mvtui: RunningMvtui | None, args: argparse.Namespace, values: dict[str, Any], *, added: bool, document: Any, out: TextIO
) -> int:
    import tomlkit

    from mvtui.config.edit import find_instance, set_instance
    from mvtui.config.file import apply_edit

    if added:
        _check_model(args.model, args.new, path, document)
        values = {"model": args.model, **values}
    may_create = not path.exists() and (mvtui is None or mvtui.config_path != str(path))
    written = tomlkit.parse(apply_edit(path, set_instance(args.model, values, create=added), may_create=may_create).text)
    entry = find_instance(written, values.get("name") or args.model) or find_instance(written, args.model)
    if entry is None:  # it answers to neither name now (a new --served-model-name, say)
        print(f"{'added' if added else 'changed'} [[instances]] {args.model} in {path}", file=out)
        return 0
    name = _show_entry(path, args, entry, "added" if added else "changed", out)
    if mvtui is not None and not args.json:
        _after_edit_hint(mvtui, path, name, added, out)
    return 0


def _config_to_edit(args: argparse.Namespace, paths: AppPaths) -> tuple[Path, RunningMvtui | None]:
    """--config, else the running mvtui's file, else $MVTUI_CONFIG, else the platform's."""
    given = getattr(args, "config", None)
    try:
        mvtui = _running_or_none(args, paths)
    except AdminFailure:
        if not given:
            raise
        mvtui = None
    if given:
        return Path(os.path.abspath(Path(given).expanduser())), mvtui
    if mvtui is not None and mvtui.config_path:
        return Path(mvtui.config_path), mvtui
    return Path(os.path.abspath(paths.config_file(None))), mvtui


def _checked_text(path: Path) -> str:
    """The config file's text, refused with every problem listed when it is broken."""
    from mvtui.config.schema import parse_config

    if not path.exists():
        return ""
    text = path.read_text(encoding="utf-8")
    parse_config(text, path)  # ConfigError lists the problems
    return text


def assign_values(args: argparse.Namespace) -> dict[str, Any]:
    """The [[instances]] keys the options give, in the entry's usual order."""
    values: dict[str, Any] = {
        "name": args.name,
        "served_model_name": args.served_model_name,
        "devices": _devices(args.devices) if args.devices is not None else None,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "max_model_len": args.max_model_len,
        "tensor_parallel_size": args.tensor_parallel_size,
        "extra_args": args.extra_arg,
        "preload": args.preload,
        "idle_timeout": args.idle_timeout,
        "idle_action": args.idle_action,
    }
    return {key: value for key, value in values.items() if value is not None}


def _devices(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CommandFailed(f'--devices takes GPU indices separated by commas, like "0,1"; got {text!r}') from None


def _check_model(model: str, new: bool, path: Path, document: Any) -> None:
    """A new entry is for a model in the cache or on disk, unless --new: a typo must not
    become an entry that fails at its first start."""
    from mvtui.config.edit import instance_labels
    from mvtui.models.cache import scan_models
    from mvtui.models.names import unknown_model

    if new or Path(model).expanduser().exists():
        return
    listing = scan_models()
    if listing.find(model) is not None:
        return
    known = [cached.repo_id for cached in listing.models] + instance_labels(document)
    where = f"no [[instances]] entry in {path} and not in the Hugging Face cache at {listing.folder}"
    raise CommandFailed(f"{unknown_model(model, known, where)}\n`mvtui pull {model}` downloads it; --new adds the entry anyway")


def _show_entry(path: Path, args: argparse.Namespace, entry: Any, done: str | None, out: TextIO) -> str:
    """Prints what was done (and with --show the entry, with --json both as JSON); its name."""
    from mvtui.config.edit import instance_text

    name = str(entry.get("name") or entry.get("served_model_name") or entry.get("model"))
    if args.json:
        _print_json({"path": str(path), "done": done, "name": name, "entry": entry.unwrap(), "text": instance_text(entry)}, out)
    elif done:
        print(f"{done} [[instances]] {name} in {path}", file=out)
    if not args.json and (args.show or not done):
        print(instance_text(entry), file=out, end="")
    return name


def _after_edit_hint(mvtui: RunningMvtui, path: Path, name: str, added: bool, out: TextIO) -> None:
    if mvtui.config_path != str(path):
        print(f"note: mvtui PID {mvtui.pid} reads {mvtui.config_path or 'no config file'}, not this one", file=out)
        return
    if added:
        print(f"mvtui PID {mvtui.pid} reads it within a second; `mvtui start {name}` starts it now", file=out)
        return
    try:
        instances = AdminClient.of(mvtui, 10.0).call("GET", "/instances")["instances"]
    except AdminFailure:
        return
    if any(item["name"] == name and item["lifecycle"] not in ("stopped", "error") for item in instances):
        print(f"{name} is running: `mvtui restart {name}` starts it again with these settings", file=out)


COMMANDS: dict[str, Callable[[argparse.Namespace, Any, TextIO, TextIO], int]] = {
    "models": _models,
    "pull": _pull,
    "run": _run,
    "assign": _assign,
}

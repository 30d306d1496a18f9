"""Command line: `mvtui` (dashboard), `mvtui --no-ui` (headless), `mvtui --demo`, `mvtui sim`,
`mvtui init` (a starter config), and the admin commands (`mvtui ps`, `top`, `drain`...).

Only argparse and the standard library's admin client load at startup: an admin command
answers without importing the core, aiohttp or the config parser (benchmarks/cli_latency.py).
Each path imports what it runs when it runs it; the UI only when the dashboard starts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from mvtui import __version__
from mvtui.admin.client import ADMIN_COMMANDS, add_admin_commands

if TYPE_CHECKING:
    import contextlib
    from pathlib import Path

    from mvtui.config.schema import Config
    from mvtui.paths import AppPaths
    from mvtui.runtime.wiring import Services

    CoreFactory = Callable[[], contextlib.AbstractAsyncContextManager[Services]]

Build = Callable[["LazySubcommands"], None]

SIM_HELP = "run a simulated vLLM server"
SIM_DESCRIPTION = "A simulated vLLM server: the OpenAI API, /metrics, sleep and wake, as vLLM answers them."
INIT_HELP = "write a commented starter config"
MODEL_COMMANDS = {  # listed at once; mvtui.admin.model_commands builds and runs them when chosen
    "models": "list the models in the local Hugging Face cache and the instances using them",
    "pull": "download a model from the Hugging Face hub into the local cache",
    "run": "chat with a model in the terminal (starts or wakes its instance first)",
    "assign": "set a model's launch settings in its [[instances]] entry of the config file",
}


class Recorded:
    """Stands in for a sub-command's parser until the command is chosen: it records what is
    added to it (add_argument, set_defaults, groups...) and replays that on the real parser."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any], Recorded]] = []

    def __getattr__(self, method: str) -> Callable[..., Recorded]:
        if method.startswith("_"):
            raise AttributeError(method)

        def record(*args: Any, **kwargs: Any) -> Recorded:
            result = Recorded()
            self.calls.append((method, args, kwargs, result))
            return result

        return record

    def replay(self, target: Any) -> None:
        for method, args, kwargs, result in self.calls:
            result.replay(getattr(target, method)(*args, **kwargs))


class LazySubcommands(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Sub-commands listed in `mvtui --help` at once, but whose parsers are built only
    when chosen: an admin call builds one small parser, not fifteen, and the modules that
    define the simulator's and the starter config's options load only for those commands."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: dict[str, tuple[dict[str, Any], Recorded]] = {}
        self.later: dict[str, Build] = {}

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if kwargs.get("aliases"):
            return super().add_parser(name, **kwargs)  # type: ignore[no-any-return]
        self._list(name, kwargs.pop("help", None))
        recorded = self.recorded[name] = (kwargs, Recorded())
        return cast(argparse.ArgumentParser, recorded[1])

    def add_later(self, name: str, help: str, build: Build) -> None:
        """Listed now; `build(self)` adds the command (with add_parser) once it is chosen."""
        self._list(name, help)
        self.later[name] = build

    def _list(self, name: str, help: str | None) -> None:
        self._choices_actions = [action for action in self._choices_actions if action.dest != name]
        if help is not None:
            self._choices_actions.append(self._ChoicesPseudoAction(name, (), help))
        self._name_parser_map[name] = None  # a valid choice; the parser comes in build()

    def build(self, name: str) -> argparse.ArgumentParser:
        """The real parser of command `name`, made now if it was not yet."""
        if name in self.later:
            self.later.pop(name)(self)
        if name in self.recorded:
            kwargs, recorded = self.recorded.pop(name)
            parser = self._parser_class(prog=kwargs.pop("prog", f"{self._prog_prefix} {name}"), **kwargs)
            recorded.replay(parser)
            self._name_parser_map[name] = parser
        return self._name_parser_map[name]  # type: ignore[no-any-return]

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None
    ) -> None:
        if values and values[0] in self._name_parser_map:
            self.build(values[0])
        super().__call__(parser, namespace, values, option_string)


def _build_sim(commands: LazySubcommands) -> None:
    from mvtui.sim.config import add_sim_arguments

    add_sim_arguments(commands.add_parser("sim", help=SIM_HELP, description=SIM_DESCRIPTION))


def _build_init(commands: LazySubcommands) -> None:
    from mvtui.config.starter import add_init_command

    add_init_command(commands)


def _build_model_command(name: str) -> Build:
    def build(commands: LazySubcommands) -> None:
        from mvtui.admin.model_commands import add_model_command

        add_model_command(commands, name, MODEL_COMMANDS[name])

    return build


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mvtui", description="Dashboard and OpenAI-compatible router for vLLM clusters.")
    parser.add_argument("--version", action="version", version=f"mvtui {__version__}")
    parser.add_argument("--config", metavar="FILE", help="config file (default: $MVTUI_CONFIG, then the platform's config folder)")
    parser.add_argument("--port", type=int, help="router port (overrides [router] port)")
    parser.add_argument("--host", help="router address to bind (overrides [router] host)")
    parser.add_argument("--no-ui", action="store_true", help="run headless: log lines instead of the dashboard")
    parser.add_argument("--demo", action="store_true", help="start simulated vLLM servers with synthetic traffic")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", action=LazySubcommands)
    assert isinstance(commands, LazySubcommands)
    commands.add_later("sim", SIM_HELP, _build_sim)
    add_admin_commands(commands)
    for name, text in MODEL_COMMANDS.items():
        commands.add_later(name, text, _build_model_command(name))
    commands.add_later("init", INIT_HELP, _build_init)
    return parser


def load_startup_config(args: argparse.Namespace, paths: AppPaths) -> tuple[Config, Path | None]:
    """The config to start with; a broken file ends the program with every problem listed.
    The path is absolute, so every message that names it (info, edits, errors) is too."""
    import logging
    import os
    from pathlib import Path

    from mvtui.config.schema import Config, load_config
    from mvtui.config.starter import example_file
    from mvtui.errors import ConfigError

    path = Path(os.path.abspath(paths.config_file(args.config)))
    log = logging.getLogger("mvtui")
    if path.exists():
        config = load_config(path)
        log.info("config file: %s", path)
    elif args.config:
        raise ConfigError(path, [])
    else:
        log.info(
            "no config file at %s: starting with no servers (`mvtui init` writes a starter config; every option: %s)", path, example_file()
        )
        config = Config()
    return with_overrides(config, args), path


def with_overrides(config: Config, args: argparse.Namespace) -> Config:
    import dataclasses

    router = config.router
    if args.port is not None:
        router = dataclasses.replace(router, port=args.port)
    if args.host is not None:
        router = dataclasses.replace(router, host=args.host)
    return dataclasses.replace(config, router=router)


def core_factory(args: argparse.Namespace, paths: AppPaths) -> CoreFactory:
    import contextlib
    import functools
    from collections.abc import AsyncIterator

    from mvtui.config.schema import Config, RouterConfig
    from mvtui.runtime.wiring import Services

    if args.demo:
        from mvtui.runtime.demo import demo_services

        demo = with_overrides(Config(router=RouterConfig(host="127.0.0.1")), args)
        return lambda: demo_services(demo, paths)
    config, path = load_startup_config(args, paths)

    @contextlib.asynccontextmanager
    async def open_core() -> AsyncIterator[Services]:
        overrides = functools.partial(with_overrides, args=args)  # every reload keeps --port/--host
        async with Services(config, config_path=path, paths=paths, overrides=overrides) as services:
            yield services

    return open_core


def configure_logging(verbose: bool, to_file: Path | None = None) -> None:
    import logging

    handler: logging.Handler
    if to_file is not None:
        to_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(to_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # "1 change detected" per save


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sim":
        from mvtui.sim.runner import run_sim_from_args

        return run_sim_from_args(args)
    from mvtui.paths import AppPaths

    if args.command in MODEL_COMMANDS:  # the HF cache, the hub, a chat, an [[instances]] entry
        from mvtui.admin.model_commands import run_model_command

        return run_model_command(args, AppPaths.default())
    if args.command in ADMIN_COMMANDS:  # talks to a running mvtui: no config, no logging setup
        from mvtui.admin.client import run_admin_command

        return run_admin_command(args, AppPaths.default())
    if args.command == "init":  # writes a starter config: no config read, no logging setup
        from mvtui.config.starter import run_init

        return run_init(args, AppPaths.default())
    return run_core(args, AppPaths.default())


def run_core(args: argparse.Namespace, paths: AppPaths) -> int:
    """The dashboard, or with --no-ui the headless router."""
    from mvtui.errors import ConfigError

    configure_logging(args.verbose, None if args.no_ui else paths.log_dir / "mvtui.log")
    try:
        factory = core_factory(args, paths)
    except ConfigError as error:
        print(error if error.problems else f"{error.path}: no such config file", file=sys.stderr)
        return 2
    if args.no_ui:
        from mvtui.runtime.headless import serve_headless

        return serve_headless(factory)
    from mvtui.event_loop import loop_factory
    from mvtui.ui.app import run_dashboard

    return run_dashboard(factory, paths, loop_factory())

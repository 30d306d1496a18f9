"""Command line: `mvtui` (dashboard), `mvtui --no-ui` (headless), `mvtui --demo`, `mvtui sim`,
`mvtui init` (a starter config).

The UI is imported only when it is about to run, so the headless paths never load Textual.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import sys
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

from mvtui import __version__
from mvtui.config.schema import Config, RouterConfig, load_config
from mvtui.config.starter import add_init_command, example_file, run_init
from mvtui.errors import ConfigError
from mvtui.paths import AppPaths
from mvtui.runtime.wiring import Services

CoreFactory = Callable[[], contextlib.AbstractAsyncContextManager[Services]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mvtui", description="Dashboard and OpenAI-compatible router for vLLM clusters.")
    parser.add_argument("--version", action="version", version=f"mvtui {__version__}")
    parser.add_argument("--config", metavar="FILE", help="config file (default: $MVTUI_CONFIG, then the platform's config folder)")
    parser.add_argument("--port", type=int, help="router port (overrides [router] port)")
    parser.add_argument("--host", help="router address to bind (overrides [router] host)")
    parser.add_argument("--no-ui", action="store_true", help="run headless: log lines instead of the dashboard")
    parser.add_argument("--demo", action="store_true", help="start simulated vLLM servers with synthetic traffic")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    sim = commands.add_parser("sim", help="run a simulated vLLM server", description="A simulated vLLM server.")
    from mvtui.sim.config import add_sim_arguments

    add_sim_arguments(sim)
    from mvtui.admin.client import add_admin_commands

    add_admin_commands(commands)
    add_init_command(commands)
    return parser


def load_startup_config(args: argparse.Namespace, paths: AppPaths) -> tuple[Config, Path | None]:
    """The config to start with; a broken file ends the program with every problem listed."""
    path = paths.config_file(args.config)
    if path.exists():
        config = load_config(path)
    elif args.config:
        raise ConfigError(path, [])
    else:
        logging.getLogger("mvtui").info(
            "no config at %s: starting with no servers (`mvtui init` writes a starter config; every option: %s)", path, example_file()
        )
        config = Config()
    return with_overrides(config, args), path


def with_overrides(config: Config, args: argparse.Namespace) -> Config:
    router = config.router
    if args.port is not None:
        router = dataclasses.replace(router, port=args.port)
    if args.host is not None:
        router = dataclasses.replace(router, host=args.host)
    return dataclasses.replace(config, router=router)


def core_factory(args: argparse.Namespace, paths: AppPaths) -> CoreFactory:
    if args.demo:
        from mvtui.runtime.demo import demo_services

        config = with_overrides(Config(router=RouterConfig(host="127.0.0.1")), args)
        return lambda: demo_services(config, paths)
    config, path = load_startup_config(args, paths)

    @contextlib.asynccontextmanager
    async def open_core() -> AsyncIterator[Services]:
        overrides = functools.partial(with_overrides, args=args)  # every reload keeps --port/--host
        async with Services(config, config_path=path, paths=paths, overrides=overrides) as services:
            yield services

    return open_core


def configure_logging(verbose: bool, to_file: Path | None = None) -> None:
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
    from mvtui.admin.client import ADMIN_COMMANDS, run_admin_command

    if args.command in ADMIN_COMMANDS:  # talks to a running mvtui: no config, no logging setup
        return run_admin_command(args, AppPaths.default())
    if args.command == "init":  # writes a starter config: no config read, no logging setup
        return run_init(args, AppPaths.default())
    paths = AppPaths.default()
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

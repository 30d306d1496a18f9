"""The example config shipped with mvtui, and `mvtui init`, which writes a starter config.

`servers.example.toml` sits in this package (so `pip install` users have it too) and
documents every option with its default; the starter is a short file to fill in.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from mvtui.paths import AppPaths

EXAMPLE_NAME = "servers.example.toml"

STARTER_TEMPLATE = """\
# mvtui configuration, written by `mvtui init`.
#
# Every option, with its default, is explained in the example that ships with mvtui:
#   {example}
# The file is watched: save it and the change is in force within a second, no restart.
# Lines of the form `# key = value` show an option at its default: remove the `# ` to use it.

# Remote vLLM servers, one entry each. max_concurrent_requests (default 8): how many
# requests at once the server should have. The dashboard's `a` key adds entries here too.
[servers]
servers = [
    # {{ url = "http://gpu-1:8000", max_concurrent_requests = 8 }},
]

# The OpenAI-compatible router: clients use http://HOST:PORT/v1.
[router]
# host = "0.0.0.0"
# port = 8888
# api_keys = []
# policy = "fastest"

# A local vLLM process that mvtui starts, routes to, and puts to sleep when idle
# (one [[instances]] table per model; remove the `# ` to use it).
# [[instances]]
# model = "meta-llama/Llama-3.1-8B-Instruct"
# devices = [0]
# idle_timeout = 600.0
# idle_action = "sleep1"
"""


def example_file() -> Path:
    """Where the shipped `servers.example.toml` is on this machine."""
    return Path(str(resources.files(__package__).joinpath(EXAMPLE_NAME)))


def starter_text() -> str:
    """The starter config: a few commented options, pointing at the full example."""
    return STARTER_TEMPLATE.format(example=example_file())


def add_init_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    init = commands.add_parser(
        "init",
        help="write a commented starter config",
        description=(
            "Write a short, commented starter config to PATH (default: --config, else $MVTUI_CONFIG, else "
            f"servers.toml in the platform's config folder) and print where it went. Every option is explained in "
            f"{EXAMPLE_NAME}, shipped with mvtui: {example_file()}"
        ),
    )
    init.add_argument("path", nargs="?", metavar="PATH", help="where to write it (default: the config file mvtui reads)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")


def write_starter(path: Path, *, force: bool) -> Path:
    """Write the starter config to `path`; FileExistsError if it is there and not `force`."""
    path = path.expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w" if force else "x", encoding="utf-8") as file:
        file.write(starter_text())
    return path


def run_init(args: argparse.Namespace, paths: AppPaths) -> int:
    """`mvtui init [PATH] [--force]`: 0 when written, 1 when the file exists or cannot be written."""
    target = paths.config_file(args.path or args.config)
    try:
        written = write_starter(target, force=args.force)
    except FileExistsError:
        print(f"{target.resolve()} already exists; not overwriting it (use --force to replace it)", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"cannot write {target}: {error}", file=sys.stderr)
        return 1
    print(written)
    return 0

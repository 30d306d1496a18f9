"""Regenerate screenshots/ from the real app in demo mode: SVG, plus PNG when a converter
is at hand (`rsvg-convert` from librsvg2-bin, or the `cairosvg` package).

    .venv/bin/python scripts/screenshots.py [--out screenshots] [--warmup 15]

PNGs look best with the font the SVGs name installed (`apt-get install fonts-firacode`).

The demo's simulated servers and synthetic load are the real ones (`mvtui --demo`). This
machine may have no GPU, so the main views show simulated GPU readings (two 80 GiB cards
whose memory follows the demo's load), set up below and said so in the README; the
"no GPU" view shows what this machine's NVML really answers. The details screen's plots
are sampled every 0.25 s here instead of every 2 s, so that the warm-up fills them (their
title says how long they cover). The config error is a real broken file, read by a real
mvtui over two simulated servers. The Models screen reads a Hugging Face cache laid out in a
scratch folder (sparse files: the sizes without the bytes) through HF_HUB_CACHE, with one
instance added live; the chat screen talks to the demo's "small" server through the router.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mvtui.cli import build_parser, core_factory  # noqa: E402
from mvtui.gpu import GpuProbe  # noqa: E402
from mvtui.paths import AppPaths  # noqa: E402
from mvtui.sim.config import SimConfig  # noqa: E402
from mvtui.sim.server import SimServer  # noqa: E402
from mvtui.ui.app import Dashboard, create_app  # noqa: E402
from mvtui.ui.chat_screen import ChatScreen  # noqa: E402
from mvtui.ui.history import MetricsHistory  # noqa: E402
from mvtui.ui.models_screen import ModelsScreen  # noqa: E402
from tests.hf_cache import CHAT_CONFIG, EMBED_CONFIG, CachedRepo, build_cache  # noqa: E402

GIB = 1024**3
MIB = 1024**2
WIDE = (160, 48)
SMALL = (80, 24)
CACHE = (
    CachedRepo("BAAI/bge-m3", EMBED_CONFIG, {"modules.json": 349, "model.safetensors": int(2.1 * GIB), "tokenizer.json": 17 * MIB}),
    CachedRepo(
        "meta-llama/Llama-3.1-8B-Instruct", CHAT_CONFIG, {f"model-0000{n}-of-00004.safetensors": int(3.75 * GIB) for n in range(1, 5)}
    ),
    CachedRepo(
        "Qwen/Qwen2.5-0.5B-Instruct", {"architectures": ["Qwen2ForCausalLM"]}, {"model.safetensors": 942 * MIB, "tokenizer.json": 7 * MIB}
    ),
    CachedRepo(
        "Qwen/Qwen2.5-7B-Instruct",
        {"architectures": ["Qwen2ForCausalLM"]},
        {f"model-0000{n}-of-00004.safetensors": int(3.8 * GIB) for n in range(1, 5)},
    ),
)


@dataclass
class DemoNvml:
    """Simulated NVML readings for the pictures: two cards, the first one busy."""

    started: float = field(default_factory=time.monotonic)
    NVML_TEMPERATURE_GPU: int = 0

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def _swing(self) -> float:
        return 0.5 + 0.5 * math.sin((time.monotonic() - self.started) / 7)

    def nvmlDeviceGetMemoryInfo(self, index: int) -> SimpleNamespace:
        used = (62 + 6 * self._swing()) * GIB if index == 0 else 4.1 * GIB
        return SimpleNamespace(used=int(used), total=80 * GIB)

    def nvmlDeviceGetUtilizationRates(self, index: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=int(55 + 40 * self._swing()) if index == 0 else 0)

    def nvmlDeviceGetName(self, index: int) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetTemperature(self, index: int, sensor: int) -> int:
        return 61 if index == 0 else 36

    def nvmlDeviceGetComputeRunningProcesses(self, index: int) -> list[SimpleNamespace]:
        return []


class NoDriver:
    """For the no-GPU view on a machine that has one: NVML as it answers without a driver."""

    def nvmlInit(self) -> None:
        raise RuntimeError("Driver Not Loaded")


async def wait_for_gpu_reading(app: Dashboard, probe: GpuProbe) -> None:
    assert app.gpu is not None
    app.gpu.probe = probe
    app.gpu.latest = await probe.sample()
    app.tick()


class Shooter:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.svgs: list[Path] = []

    async def take(self, app: Dashboard, pilot, name: str, settle: float = 0.3, notices: bool = False, title: str = "mvtui --demo") -> None:  # type: ignore[no-untyped-def]
        if not notices:
            app.clear_notifications()
        await app.repaint()
        await pilot.pause(settle)
        path = self.out / f"{name}.svg"
        path.write_text(app.export_screenshot(title=f"{title}  ({name})"), encoding="utf-8")
        self.svgs.append(path)
        print(f"  {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


async def shoot(out: Path, warmup: float, paths: AppPaths) -> list[Path]:
    args = build_parser().parse_args(["--demo", "--port", "0"])
    app = create_app(core_factory(args, paths), paths, user_themes=False)
    app.history = MetricsHistory(period_s=0.25)
    shooter = Shooter(out)
    async with app.run_test(size=WIDE, notifications=True) as pilot:
        await app.settled()
        await wait_for_gpu_reading(app, GpuProbe(DemoNvml()))
        print(f"demo running; {warmup:.0f} s of traffic before the first picture")
        await asyncio.sleep(warmup)
        await shooter.take(app, pilot, "main")
        await pilot.resize_terminal(*SMALL)
        await shooter.take(app, pilot, "main-80x24")
        await pilot.press("question_mark")  # at 80x24 the help scrolls
        await shooter.take(app, pilot, "help-80x24")
        await pilot.press("escape")
        await pilot.resize_terminal(*WIDE)

        await pilot.press("question_mark")
        await shooter.take(app, pilot, "help")
        await pilot.press("escape")

        await pilot.press("enter")  # the first server's details
        await shooter.take(app, pilot, "details")
        await pilot.resize_terminal(*SMALL)
        await shooter.take(app, pilot, "details-80x24")
        await pilot.press("escape")
        await pilot.resize_terminal(100, 30)
        await pilot.press("ctrl+p", *"sleep")
        await pilot.pause(0.5)  # the palette searches in the background
        await shooter.take(app, pilot, "palette")
        await pilot.press("escape")
        await pilot.resize_terminal(*WIDE)

        await pilot.press("down")  # "medium"
        await pilot.press("d")  # at once, while its requests are still in flight
        await shooter.take(app, pilot, "draining", settle=0.05)
        await pilot.press("d")

        for _ in range(2):
            await pilot.press("t")
            await asyncio.sleep(0.5)
            await shooter.take(app, pilot, f"theme-{app.theme}")
        await pilot.press("t")  # back to the first theme

        await shoot_models_and_chat(app, pilot, shooter)

        real = GpuProbe()
        await wait_for_gpu_reading(app, real if not (await real.sample()).available else GpuProbe(NoDriver()))
        await pilot.resize_terminal(100, 30)
        await shooter.take(app, pilot, "no-gpu")

        print("quitting: the demo's requests in flight finish first")
        await pilot.press("q")
        deadline = time.monotonic() + 30
        while app.is_running and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    await shoot_config_error(shooter, paths)
    return shooter.svgs


async def shoot_models_and_chat(app: Dashboard, pilot, shooter: Shooter) -> None:  # type: ignore[no-untyped-def]
    """The Models screen with one instance added live (no config file in demo mode), then a
    chat with the demo's first server: one answer streamed in full, the next question typed."""
    assert app.core is not None and app.core.operator is not None
    await app.core.operator.add_instance({"model": "Qwen/Qwen2.5-0.5B-Instruct", "name": "qwen-small", "devices": [1]})
    await pilot.resize_terminal(140, 30)
    await pilot.press("M")
    screen = app.screen
    while not isinstance(screen, ModelsScreen) or screen.listing is None:
        await asyncio.sleep(0.05)
    await pilot.press("down", "down")
    await shooter.take(app, pilot, "models")
    await pilot.press("escape")

    await pilot.resize_terminal(120, 30)
    while app.selected_server is None or app.selected_server.name != "small":
        await pilot.press("down")
    await pilot.press("c", *"Write a haiku about GPUs running hot.")
    chat = app.screen
    assert isinstance(chat, ChatScreen)
    await chat.query_one("#chat-input").action_submit()  # not press: it would wait for the answer to end
    while not chat.context.conversation.turns:
        await asyncio.sleep(0.1)
    await pilot.press(*"Another one, about KV caches")
    for typed in chat.query("Input"):
        typed.cursor_blink = False  # type: ignore[attr-defined]
    await shooter.take(app, pilot, "chat")
    await pilot.press("escape")
    await pilot.resize_terminal(*WIDE)


CONFIG = """[router]
host = "127.0.0.1"
port = 0

[admin]
enabled = false

[servers]
servers = [
  {{ url = "{first}", name = "gpu-1", max_concurrent_requests = 8 }},
  {{ url = "{second}", name = "gpu-2", max_concurrent_requests = 8 }},
]
"""
# What a hurried edit leaves: a typo in a key, a scheme missing a letter, a word for a number.
BROKEN = (
    ("port = 0", "prot = 8888"),
    ('"http://', '"htp://'),
    ('"gpu-2", max_concurrent_requests = 8', '"gpu-2", max_concurrent_requests = "eight"'),
)


async def shoot_config_error(shooter: Shooter, paths: AppPaths) -> None:
    """A real mvtui over two simulated servers, whose config file is then saved broken."""
    async with SimServer(SimConfig(model="demo")) as first, SimServer(SimConfig(model="demo")) as second:
        path = paths.config_dir / "servers.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        good = CONFIG.format(first=first.url, second=second.url)
        path.write_text(good, encoding="utf-8")
        app = create_app(core_factory(build_parser().parse_args(["--config", str(path)]), paths), paths, user_themes=False)
        async with app.run_test(size=(100, 30), notifications=True) as pilot:  # the notification below the banner
            await app.settled()
            await wait_for_gpu_reading(app, GpuProbe(DemoNvml()))
            broken = good
            for old, new in BROKEN:
                broken = broken.replace(old, new, 1)
            path.write_text(broken, encoding="utf-8")  # the file watcher reads it
            while app.core is None or app.core.config_error is None:
                await asyncio.sleep(0.05)
            await shooter.take(app, pilot, "config-error", settle=0.5, notices=True, title="mvtui --config servers.toml")
            await pilot.press("q")


def png_converter() -> str | None:
    if shutil.which("rsvg-convert"):
        return "rsvg-convert"
    if importlib.util.find_spec("cairosvg") is not None:
        return "cairosvg"
    return None


def to_png(svg: Path, converter: str) -> Path:
    """Textual writes spaces as &#160; in <text> runs; librsvg drops them at a run's start
    unless whitespace is preserved, so the copy handed to the converter says so."""
    png = svg.with_suffix(".png")
    text = svg.read_text(encoding="utf-8").replace("<text ", '<text xml:space="preserve" ')
    if converter == "rsvg-convert":
        subprocess.run(["rsvg-convert", "--format", "png", "--output", str(png)], input=text.encode(), check=True)
    else:
        import cairosvg  # type: ignore[import-not-found]

        cairosvg.svg2png(bytestring=text.encode(), write_to=str(png))
    return png


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "screenshots")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds of demo traffic before the first picture")
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mvtui-shots-") as scratch:
        base = Path(scratch)
        paths = AppPaths(config_dir=base / "config", log_dir=base / "log", state_dir=base / "state")
        os.environ["HF_HUB_CACHE"] = str(build_cache(base / "hf-hub", list(CACHE), modified=time.time() - 3 * 86400))
        svgs = asyncio.run(shoot(options.out, options.warmup, paths))
    converter = png_converter()
    if converter is None:
        print("no PNG converter (apt-get install librsvg2-bin, or pip install cairosvg): SVG only")
        return 0
    for svg in svgs:
        to_png(svg, converter)
    print(f"{len(svgs)} screenshots as SVG and PNG ({converter}) in {options.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

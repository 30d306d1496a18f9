"""`mvtui run` (a terminal chat), `mvtui restart` and `mvtui models` against a real mvtui in
front of `mvtui sim` servers: a remote one, a slow one, and a managed instance that starts
stopped. The chat's stdin is fed by the test; Ctrl-C is a real SIGINT."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, Proc, free_port, start_mvtui, start_sim, wait_until
from tests.hub import FakeHub
from tests.test_models import CHAT, hub_env, pulled

SIM = [sys.executable, "-m", "mvtui", "sim", "--port", "{port}", "--model", "{served_name}", "--enable-sleep-mode",
       "--tokens-per-s", "500", "--ttft-ms", "5", "--wake-ms-l1", "50"]  # fmt: skip
STATS = re.compile(r"\((\d+) prompt tokens, (\d+) tokens, ")


@dataclass
class Running:
    mvtui: Proc
    slow: Proc
    state: Path
    hf_home: Path


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    folder = tmp_path_factory.mktemp("run")
    started: list[Proc] = []
    try:
        started.append(demo := start_sim("demo", extra=["--tokens-per-s", "500", "--ttft-ms", "5"]))
        started.append(slow := start_sim("slow", extra=["--tokens-per-s", "4", "--ttft-ms", "5"]))
        config = folder / "servers.toml"
        config.write_text(
            f'[servers]\nservers = [{{ url = "{demo.url}", name = "remote" }}, {{ url = "{slow.url}", name = "slow-one" }}]\n'
            "[config]\nmetrics_interval = 0.1\nhealth_check_interval = 0.2\nshutdown_timeout = 3\n[admin]\nport = 0\n"
            f'[[instances]]\nmodel = "{CHAT.repo_id}"\nname = "local-chat"\nserved_model_name = "local-chat"\nport = {free_port()}\n'
            f"auto_start = false\ncommand = {json.dumps(SIM)}\nenv = {{ PYTHONPATH = {json.dumps(str(REPO_ROOT))} }}\n"
        )
        port = free_port()
        state = folder / "state"
        args = ["--no-ui", "--config", str(config), "--port", str(port), "--host", "127.0.0.1"]
        started.append(mvtui := start_mvtui(args, env={"XDG_STATE_HOME": str(state)}))
        ready = Running(mvtui, slow, state, folder / "hf")
        wait_until(lambda: {"demo", "slow"} <= set(router_models(mvtui)), what="both sims up")
        yield ready
    finally:
        for proc in reversed(started):
            proc.stop()


def router_models(mvtui: Proc) -> list[str]:
    with urllib.request.urlopen(mvtui.url + "/v1/models", timeout=5) as answer:
        return [model["id"] for model in json.load(answer)["data"]]


def env_of(running: Running) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XDG_STATE_HOME": str(running.state), "PYTHONUNBUFFERED": "1"}


def mvtui(running: Running, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mvtui", *args], input=stdin, env=env_of(running), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


class Terminal:
    """`mvtui run` with a pipe for stdin and its output read as it comes."""

    def __init__(self, running: Running, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mvtui", "run", *args],
            env=env_of(running),
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.output = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := os.read(self.proc.stdout.fileno(), 4096):
            self.output += chunk

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_for(self, pattern: str, after: int = 0) -> int:
        """Until `pattern` shows after offset `after`; where it ends."""
        wait_until(lambda: pattern in self.text[after:], timeout=60, what=f"{pattern!r} in {self.text[-300:]!r}")
        return self.text.index(pattern, after) + len(pattern)

    def close(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        code = self.proc.wait(60)
        self._reader.join(10)
        return code


def test_run_keeps_the_history_and_obeys_system_clear_and_exit(running: Running) -> None:
    lines = ["Hello there.", "Hello there.", "/clear", "Hello there.", "/system Answer in one word.", "Hello there.", "/exit", "never sent"]
    done = mvtui(running, "run", "demo", "--verbose", "--max-tokens", "4", stdin="\n".join(lines) + "\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"chatting with demo through {running.mvtui.url}/v1")
    prompts = [int(match.group(1)) for match in STATS.finditer(done.stdout)]
    assert len(prompts) == 4 and all(int(match.group(2)) == 4 for match in STATS.finditer(done.stdout))
    first, with_history, cleared, with_system = prompts
    assert with_history > first  # the first question and its answer went along
    assert cleared == first
    assert with_system > first
    assert "(conversation cleared)" in done.stdout and "(system prompt set)" in done.stdout


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(running: Running) -> None:
    terminal = Terminal(running, "slow", "--max-tokens", "400")
    try:
        start = terminal.wait_for(">>> ")
        terminal.send("Tell me a long story.")
        wait_until(lambda: len(terminal.text[start:].strip()) > 10, timeout=60, what="the answer streaming")
        terminal.proc.send_signal(signal.SIGINT)
        after = terminal.wait_for("(stopped)\n>>> ")
        terminal.send("/system Be brief.")
        terminal.wait_for("(system prompt set)", after)
        terminal.send("/exit")
        assert terminal.close() == 0
    finally:
        terminal.proc.kill()
    wait_until(lambda: sim_state(running.slow)["aborted"] >= 1, what="the generation aborted upstream")
    assert "Traceback" not in terminal.text


def sim_state(sim: Proc) -> dict[str, int]:
    with urllib.request.urlopen(sim.url + "/sim/state", timeout=5) as answer:
        return json.load(answer)  # type: ignore[no-any-return]


def test_run_starts_a_stopped_instance_then_wakes_a_sleeping_one(running: Running) -> None:
    started = mvtui(running, "run", CHAT.repo_id, "--max-tokens", "3", stdin="Hi\n")
    assert started.returncode == 0, started.stdout + started.stderr
    output = started.stdout
    assert "local-chat is stopped: starting it\n" in output and "local-chat running\n" in output
    assert output.index("local-chat running") < output.index("chatting with local-chat through")
    assert mvtui(running, "sleep", "local-chat").returncode == 0
    woken = mvtui(running, "run", "local-chat", "--max-tokens", "3", stdin="Hi\n")
    assert woken.returncode == 0, woken.stdout + woken.stderr
    assert "local-chat is sleeping L1: waking it\nlocal-chat up\n" in woken.stdout


def test_an_unknown_model_lists_the_near_names(running: Running) -> None:
    done = mvtui(running, "run", "dmeo")
    assert done.returncode == 1 and "unknown model 'dmeo'" in done.stderr and "did you mean demo?" in done.stderr


def test_run_with_url_talks_to_that_server(running: Running) -> None:
    demo_url = router_url_of(running, "remote")
    done = mvtui(running, "run", "demo", "--url", demo_url, "--max-tokens", "3", "--verbose", stdin="Hi\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"chatting with demo through {demo_url}/v1") and STATS.search(done.stdout)
    missing = mvtui(running, "run", "slow", "--url", demo_url)
    assert missing.returncode == 1 and f"not listed by {demo_url}/v1/models" in missing.stderr


def router_url_of(running: Running, name: str) -> str:
    listing = json.loads(mvtui(running, "ps", "--json").stdout)
    return str(next(server["url"] for server in listing["servers"] if server["name"] == name))


def test_restart_stops_and_starts_the_instance_with_progress(running: Running) -> None:
    assert mvtui(running, "start", "local-chat").returncode == 0
    before = instance(running, "local-chat")
    done = mvtui(running, "restart", "local-chat")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("local-chat: stopping") and lines[-1].startswith("local-chat running on http://127.0.0.1:")
    after = instance(running, "local-chat")
    assert after["lifecycle"] == "running" and after["pid"] != before["pid"]
    missing = mvtui(running, "restart", "nope")
    assert missing.returncode == 1 and "no instance named 'nope'" in missing.stderr


def instance(running: Running, name: str) -> dict[str, object]:
    listing = json.loads(mvtui(running, "ps", "--json").stdout)
    return next(item for item in listing["instances"] if item["name"] == name)  # type: ignore[no-any-return]


def test_models_shows_the_states_of_the_running_mvtui(running: Running, tmp_path: Path) -> None:
    with FakeHub([CHAT]).running() as hub:
        pulled(hub_env(tmp_path, hub.url), CHAT.repo_id)
    env = {**hub_env(tmp_path, "http://127.0.0.1:9"), "XDG_STATE_HOME": str(running.state)}
    done = subprocess.run(
        [sys.executable, "-m", "mvtui", "models", "--json"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    (model,) = found["models"]
    assert model["instances"] == [{"name": "local-chat", "model": CHAT.repo_id, "state": instance(running, "local-chat")["lifecycle"]}]
    assert found["instances_from"] == f"instances and their states from mvtui PID {running.mvtui.pid}"

"""A router process in front of simulators, for the front-door and relay tests: its config,
its start (optionally under a lower open-file limit), and what it shows of itself."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests import http
from tests.helpers import REPO_ROOT, Proc, _child_env, free_port, wait_until, wait_until_answering

FAST = """
[config]
health_check_interval = 0.5
request_timeout = 20
max_retries = 3
metrics_interval = 0.1
fail_threshold = 2
recover_threshold = 2
"""
# Health checks 10 s apart with a 5 s timeout: a simulator slowed down by a busy machine is
# not called down in the middle of a test that does not expect it.
STEADY = FAST.replace("health_check_interval = 0.5", "health_check_interval = 10")


def write_config(path: Path, urls: list[str], extra: str = "", *, timing: str = STEADY, capacity: int = 8) -> Path:
    """`extra` holds whole tables ([router], [limits]); `timing` replaces the [config] table."""
    entries = ",\n".join(f'  {{ url = "{url}", max_concurrent_requests = {capacity} }}' for url in urls)
    path.write_text(f"[servers]\nservers = [\n{entries}\n]\n{timing}\n{extra}")
    return path


def start_router(config: Path, *, open_files: int | None = None) -> Proc:
    """`mvtui --no-ui` on loopback; `open_files` sets its open-file limit (soft and hard)."""
    port = free_port()
    args = [sys.executable, "-m", "mvtui", "--no-ui", "--config", str(config), "--port", str(port), "--host", "127.0.0.1"]
    log_fd, log_name = tempfile.mkstemp(prefix="mvtui-router-", suffix=".log")
    with os.fdopen(log_fd, "wb") as log:
        proc = subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            env=_child_env(None),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_open_file_limit(open_files) if open_files else None,
        )
    router = Proc(proc, port, Path(log_name))
    wait_until_answering(router)
    return router


def _open_file_limit(count: int):  # type: ignore[no-untyped-def]
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))

    return apply


def load_stats(router: Proc, key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return http.get(router.url + "/load-stats", headers=headers).json()


def wait_healthy(router: Proc, count: int, key: str | None = None) -> None:
    wait_until(lambda: load_stats(router, key).get("healthy_servers") == count, what=f"{count} healthy servers")


def server_stats(router: Proc, url: str) -> dict[str, Any]:
    return next(server for server in load_stats(router)["servers"] if server["url"] == url)


def sim_state(sim: Proc) -> dict[str, Any]:
    return http.get(sim.url + "/sim/state").json()


def set_faults(sim: Proc, **faults: Any) -> None:
    answer = http.post(sim.url + "/sim/faults", json=faults)
    assert answer.status_code == 200, answer.text


def metric(router: Proc, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (0 when there are none)."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    total = 0.0
    for line in http.get(router.url + "/metrics").text.splitlines():
        if line.startswith(name + "{") and all(label in line for label in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def peak_memory_kib(proc: Proc) -> int:
    """The process's peak resident memory (VmHWM), in KiB."""
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/PID/status")


def chat(model: str = "llama", max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, **extra}

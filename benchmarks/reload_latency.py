"""How long a saved config change takes to be in force, end to end, on 127.0.0.1.

One simulated vLLM server and `mvtui --no-ui` on a config file in a temporary folder. The
script saves the file N times (by rename, as editors do), each time with a new capacity for
the server, and times each save until `/load-stats` shows the new capacity. Every process
runs in its own process group and is stopped by that group at the end.

    python benchmarks/reload_latency.py [--saves 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import free_port, start_mvtui, start_sim  # noqa: E402

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
CONFIG = """# reload latency benchmark
[servers]
servers = [
    {{ url = "{url}", max_concurrent_requests = {capacity} }},
]

[admin]
enabled = false
"""


def capacity_of(router_url: str) -> int | None:
    with OPENER.open(router_url + "/load-stats", timeout=5) as answer:
        servers = json.load(answer)["servers"]
    return servers[0]["capacity"] if servers else None


def save(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=20)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mvtui-reload-"))
    path = folder / "servers.toml"
    sim = start_sim("bench")
    router = None
    try:
        path.write_text(CONFIG.format(url=sim.url, capacity=1))
        port = free_port()
        env = {f"XDG_{kind}_HOME": str(folder / kind.lower()) for kind in ("CONFIG", "STATE", "DATA", "CACHE")}
        router = start_mvtui(["--no-ui", "--config", str(path), "--port", str(port), "--host", "127.0.0.1"], port=port, env=env)
        time.sleep(1.0)  # the watcher starts after the router answers
        latencies = []
        for capacity in range(2, args.saves + 2):
            started = time.perf_counter()
            save(path, CONFIG.format(url=sim.url, capacity=capacity))
            while capacity_of(router.url) != capacity:
                if time.perf_counter() - started > 10:
                    raise SystemExit(f"capacity {capacity} not in force after 10 s")
                time.sleep(0.005)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.2)
        latencies.sort()
        print(
            f"{len(latencies)} saves: median {statistics.median(latencies) * 1000:.0f} ms, "
            f"p90 {latencies[int(len(latencies) * 0.9) - 1] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
        )
    finally:
        for proc in (router, sim):
            if proc is not None:
                proc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

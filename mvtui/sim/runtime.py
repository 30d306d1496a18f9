"""The parts of one simulated server that request handlers share."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from aiohttp import web

from mvtui.openai_errors import error_response
from mvtui.sim.config import SimConfig
from mvtui.sim.engine import Engine
from mvtui.sim.metrics import LiveGauges, SimEngineCounters
from mvtui.sim.sleep import SleepController
from mvtui.sim.state import Faults, RequestCounters, SimStats


class ApiError(Exception):
    """Raised anywhere in a handler; a middleware answers it in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def response(self) -> web.Response:
        return error_response(self.status, self.message, param=self.param)


@dataclass
class Runtime:
    config: SimConfig
    engine: Engine
    sleep: SleepController
    metrics: SimEngineCounters
    faults: Faults
    counters: RequestCounters = field(default_factory=RequestCounters)
    text_rng: random.Random = field(default_factory=random.Random)
    fault_rng: random.Random = field(default_factory=random.Random)
    started_at: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def create(cls, config: SimConfig) -> Runtime:
        metrics = SimEngineCounters(config.max_model_len)
        engine = Engine(config, metrics, time.monotonic)
        return cls(
            config=config,
            engine=engine,
            sleep=SleepController(config, engine),
            metrics=metrics,
            faults=Faults.from_config(config),
            text_rng=random.Random(f"text-{config.seed}"),
            fault_rng=random.Random(f"faults-{config.seed}"),
        )

    def resolve_model(self, name: object) -> str:
        if name is None:
            return self.config.model
        if not isinstance(name, str) or name not in self.config.served_names:
            raise ApiError(404, f"The model `{name}` does not exist.", param="model")
        return name

    async def admit(self) -> None:
        """The door every inference request passes: faults first, then the sleep state."""
        faults, counters = self.faults, self.counters
        if faults.dead:
            counters.failed += 1
            raise ApiError(500, "EngineDeadError: the engine died (simulated fault)")
        if faults.fail_rate and self.fault_rng.random() < faults.fail_rate:
            counters.failed += 1
            raise ApiError(500, "Internal server error (simulated fault: fail_rate)")
        if faults.hang:
            counters.hung += 1
            await asyncio.get_running_loop().create_future()  # until the client gives up
        if not self.sleep.awake:
            await self._wait_for_wake()
        if not self.sleep.weights_loaded:
            counters.requests_without_weights += 1
            raise ApiError(
                500,
                "model weights were discarded by a level 2 sleep: POST /collective_rpc "
                '{"method": "reload_weights"}, then POST /reset_prefix_cache',
            )
        counters.requests += 1

    async def _wait_for_wake(self) -> None:
        self.counters.requests_while_sleeping += 1
        if self.config.sleep_requests == "fail":
            raise ApiError(500, "the engine is sleeping")
        try:
            await self.sleep.wait_awake()
        except asyncio.CancelledError:
            self.metrics.finished["abort"] += 1  # it sat in the engine's queue, as vLLM sees it
            raise

    def live_gauges(self) -> LiveGauges:
        engine, deferred = self.engine, self.sleep.deferred
        paused_queue = engine.num_waiting if engine.paused else 0
        return LiveGauges(
            running=engine.num_running,
            waiting=engine.num_waiting + deferred,
            waiting_deferred=paused_queue + deferred,
            kv_usage=engine.kv_usage,
            sleep_level=self.sleep.level,
        )

    def stats(self) -> SimStats:
        live, finished, counters, sleep = self.live_gauges(), self.metrics.finished, self.counters, self.sleep
        return SimStats(
            running=live.running,
            waiting=live.waiting,
            aborted=finished["abort"],
            finished=sum(count for reason, count in finished.items() if reason != "abort"),
            received=counters.received,
            requests=counters.requests,
            failed=counters.failed,
            hung=counters.hung,
            cut=counters.cut,
            preemptions=self.metrics.preemptions,
            kv_cache_usage=live.kv_usage,
            requests_while_sleeping=counters.requests_while_sleeping,
            requests_without_weights=counters.requests_without_weights,
            sleeping=sleep.is_sleeping,
            sleep_level=sleep.level,
            sleep_count=sleep.sleep_count,
            wake_count=sleep.wake_count,
            sleeps_with_inflight=sleep.sleeps_with_inflight,
            weights_loaded=sleep.weights_loaded,
            prefix_cache_reset_needed=sleep.prefix_reset_needed,
        )

"""vLLM's sleep mode: levels, wake-up delays, weight reload after a level 2 sleep.

- `POST /sleep?level=1|2[&mode=abort|wait|keep]`: requests in flight are aborted (default),
  waited for, or preempted to resume after the wake. Either level drops the KV (prefix) cache.
- Inference requests that arrive while asleep or waking are held until the wake (they show as
  waiting, reason "deferred"), or answered 500 with `--sleep-requests fail`.
- After a level 2 wake the weights are gone: until `POST /collective_rpc {"method":
  "reload_weights"}`, inference requests are answered 500 (a real engine would produce garbage;
  an error is what a test can see). `/reset_prefix_cache` is then expected; `/sim/state` shows
  `prefix_cache_reset_needed` until it comes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from mvtui.sim.config import SimConfig
from mvtui.sim.engine import Engine

SLEEP_TAGS = frozenset({"weights", "kv_cache"})
SLEEP_MODES = ("abort", "wait", "keep")


class SleepController:
    """One sleep or wake at a time; callers of a transition in progress share it."""

    def __init__(self, config: SimConfig, engine: Engine) -> None:
        self._config = config
        self._engine = engine
        self.level = 0
        self.waking = False
        self.weights_loaded = True
        self.prefix_reset_needed = False
        self.sleep_count = 0
        self.wake_count = 0
        self.sleeps_with_inflight = 0
        self.deferred = 0  # requests held at the door until the engine wakes
        self._asleep_tags: set[str] = set()
        self._lock = asyncio.Lock()
        self._wake_task: asyncio.Task[None] | None = None
        self._awake = asyncio.Event()
        self._awake.set()

    @property
    def is_sleeping(self) -> bool:
        return self.level > 0

    @property
    def awake(self) -> bool:
        return self._awake.is_set()

    async def wait_awake(self) -> None:
        self.deferred += 1
        try:
            await self._awake.wait()
        finally:
            self.deferred -= 1

    async def sleep(self, level: int, mode: str) -> None:
        # Shielded: a client that hangs up does not leave the engine half asleep.
        await asyncio.shield(asyncio.ensure_future(self._locked(lambda: self._sleep(level, mode))))

    async def wake(self, tags: Iterable[str] = ()) -> None:
        wanted = set(tags) & SLEEP_TAGS or set(SLEEP_TAGS)
        task = self._wake_task
        if task is None or task.done():
            task = asyncio.ensure_future(self._locked(lambda: self._wake(wanted)))
            self._wake_task = task
        await asyncio.shield(task)

    def reload_weights(self) -> None:
        self.weights_loaded = True
        self.prefix_reset_needed = True

    def reset_prefix_cache(self) -> None:
        self._engine.prefix_cache.clear()
        self.prefix_reset_needed = False

    async def _locked(self, transition: Callable[[], Awaitable[None]]) -> None:
        async with self._lock:
            await transition()

    async def _sleep(self, level: int, mode: str) -> None:
        engine = self._engine
        if engine.num_running or engine.num_waiting:
            self.sleeps_with_inflight += 1
        self._awake.clear()
        engine.paused = True
        if mode == "abort":
            engine.abort_all()
        elif mode == "wait":
            await engine.wait_until_idle()
        else:
            engine.preempt_all()
        engine.prefix_cache.clear()  # the KV cache is gone at either level
        self.level = max(self.level, level)
        self._asleep_tags = set(SLEEP_TAGS)
        if level == 2:
            self.weights_loaded = False
        self.sleep_count += 1

    async def _wake(self, tags: set[str]) -> None:
        if not self.is_sleeping:
            return
        if "weights" in tags & self._asleep_tags:
            self.waking = True
            delay_ms = self._config.wake_ms_l2 if self.level == 2 else self._config.wake_ms_l1
            try:
                await asyncio.sleep(delay_ms / 1000.0)
            finally:
                self.waking = False
        self._asleep_tags -= tags
        if self._asleep_tags:
            return
        self.level = 0
        self.wake_count += 1
        self._engine.paused = False
        self._engine.kick()
        self._awake.set()

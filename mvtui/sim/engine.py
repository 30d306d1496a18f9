"""The simulated engine: a scheduler with vLLM's visible behaviour, and no model.

One loop steps every running sequence at once, as vLLM's engine step does: sequences are
admitted FIFO while a slot and enough KV blocks are free, spend a prefill delay, then gain
tokens at `tokens_per_s` (each accrues fractional credit per step, so a late step catches up
instead of slowing the engine down). When a decoding sequence needs a KV block and none is
free, the most recently admitted sequence is preempted back to the head of the queue and later
recomputes its prefill, as vLLM V1 does.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from mvtui.sim.config import SimConfig
from mvtui.sim.metrics import SimEngineCounters

# Steps are never closer than this: at high token rates each step hands out several tokens.
MIN_STEP_S = 0.002
_EPSILON_S = 0.0005


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request inside the engine; `words` is its whole planned output."""

    request_id: str
    prompt_tokens: int
    words: Seq[int]
    visible: int  # words shown to the client (fewer than generated when a stop string hit)
    end_reason: str  # finish_reason once every word is generated
    prefix_hashes: Seq[int] = ()
    # The block hashes of its prompt and answer together, which the next turn of its
    # conversation starts with: cached when it finishes, as vLLM caches generated blocks.
    answer_hashes: Callable[[], Seq[int]] | None = field(default=None, repr=False)
    max_tokens: int = 0
    arrival: float = 0.0
    phase: Phase = Phase.WAITING
    generated: int = 0
    cached_tokens: int = 0
    blocks: int = 0
    credit: float = 0.0
    accounted_at: float = 0.0
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    _heap_key: int = 0
    _waiter: asyncio.Future[None] | None = field(default=None, repr=False)

    @property
    def target(self) -> int:
        return len(self.words)

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    def notify(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_progress(self, seen: int) -> None:
        """Return once more than `seen` tokens exist or the sequence finished."""
        while self.generated <= seen and not self.finished:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    async def wait_finished(self) -> None:
        while not self.finished:
            await self.wait_progress(self.generated)


class PrefixCache:
    """Hashes of full prompt blocks, least recently used dropped first."""

    def __init__(self, capacity_blocks: int) -> None:
        self._capacity = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def match_and_insert(self, hashes: Seq[int]) -> int:
        """Number of leading blocks already cached; then caches them all."""
        matched = 0
        for block_hash in hashes:
            if block_hash not in self._blocks:
                break
            matched += 1
        self.insert(hashes)
        return matched

    def insert(self, hashes: Seq[int]) -> None:
        for block_hash in hashes:
            self._blocks[block_hash] = None
            self._blocks.move_to_end(block_hash)
        while len(self._blocks) > self._capacity:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()


class Engine:
    def __init__(self, config: SimConfig, metrics: SimEngineCounters, clock: Callable[[], float]) -> None:
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self.slow = config.slow
        self.paused = False  # no admission: the engine sleeps or is about to
        self.used_blocks = 0
        self.prefix_cache = PrefixCache(config.kv_blocks)
        self.waiting: deque[Sequence] = deque()
        self._running: dict[Sequence, None] = {}  # insertion order = admission order
        self._prefilling: list[tuple[float, int, Sequence]] = []
        self._decoding: list[Sequence] = []
        self._heap_counter = 0
        self._next_step_at = 0.0
        self._kick: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    # -- public surface -------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        return self.used_blocks / self._config.kv_blocks

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.abort_all()

    def submit(self, seq: Sequence) -> Sequence:
        seq.arrival = self._clock()
        self.waiting.append(seq)
        self.kick()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is; its slot and blocks are free at once."""
        if seq.finished:
            return
        if seq.phase is Phase.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, self._clock(), "abort")
        self.kick()

    def abort_all(self) -> None:
        for seq in [*self.waiting, *self._running]:
            self.abort(seq)

    def preempt_all(self) -> None:
        """Send every running sequence back to the queue (they recompute later)."""
        for seq in reversed(list(self._running)):
            self._preempt(seq)

    def kick(self) -> None:
        kick = self._kick
        if kick is not None and not kick.done():
            kick.set_result(None)

    async def wait_until_idle(self) -> None:
        while self._running:
            await asyncio.sleep(0.005)

    # -- the loop -------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = self._clock()
            self._step(now)
            self._kick = loop.create_future()
            wake_at = self._next_event_at()
            timer = None
            if wake_at is not None:
                timer = loop.call_later(max(0.0, wake_at - now), _resolve, self._kick)
            await self._kick
            if timer is not None:
                timer.cancel()

    def _step(self, now: float) -> None:
        stepped = self._finish_prefills(now)
        if self._decoding and now >= self._next_step_at - _EPSILON_S:
            stepped += self._decode(now)
            self._next_step_at = now + max(MIN_STEP_S, self._token_interval())
        if stepped:
            self._metrics.iteration_tokens.observe(stepped)
        self._admit(now)

    def _next_event_at(self) -> float | None:
        candidates = [self._prefilling[0][0]] if self._prefilling else []
        if self._decoding:
            candidates.append(self._next_step_at)
        return min(candidates) if candidates else None

    def _token_interval(self) -> float:
        return self.slow / self._config.tokens_per_s

    def _admit(self, now: float) -> None:
        config = self._config
        while self.waiting and not self.paused and len(self._running) < config.max_num_seqs:
            seq = self.waiting[0]
            needed = self._blocks_for(seq.prompt_tokens + seq.generated)
            if self.used_blocks + needed > config.kv_blocks:
                return
            self.waiting.popleft()
            computed = seq.prompt_tokens + seq.generated
            if seq.scheduled_at is None:
                self._first_schedule(seq, now)
                computed -= seq.cached_tokens
            prefill_s = (config.ttft_ms + config.prompt_ms_per_token * computed) / 1000.0 * self.slow
            seq.blocks = needed
            self.used_blocks += needed
            seq.phase = Phase.PREFILL
            self._running[seq] = None
            self._heap_counter += 1
            seq._heap_key = self._heap_counter
            heapq.heappush(self._prefilling, (now + prefill_s, self._heap_counter, seq))

    def _first_schedule(self, seq: Sequence, now: float) -> None:
        seq.scheduled_at = now
        matched_blocks = self.prefix_cache.match_and_insert(seq.prefix_hashes)
        # vLLM always computes at least the last prompt token, even on a full hit.
        seq.cached_tokens = min(matched_blocks * self._config.block_size, max(0, seq.prompt_tokens - 1))
        self._metrics.on_scheduled(seq, now)

    def _finish_prefills(self, now: float) -> int:
        tokens = 0
        while self._prefilling and self._prefilling[0][0] <= now + _EPSILON_S:
            _, key, seq = heapq.heappop(self._prefilling)
            if seq.phase is not Phase.PREFILL or seq._heap_key != key:
                continue  # aborted or preempted since it was queued
            if seq.target == 0:  # pooling: the prefill is the whole job
                self._finish(seq, now, seq.end_reason)
                continue
            if not self._grow(seq, 1):
                continue
            if not self._decoding:
                self._next_step_at = now + max(MIN_STEP_S, self._token_interval())
            seq.phase = Phase.DECODE
            seq.credit = 0.0
            seq.accounted_at = now
            self._emit(seq, 1, now)
            tokens += 1
            if seq.generated >= seq.target:
                self._finish(seq, now, seq.end_reason)
            else:
                self._decoding.append(seq)
        return tokens

    def _decode(self, now: float) -> int:
        interval = self._token_interval()
        tokens = 0
        for seq in self._decoding:
            if seq.phase is not Phase.DECODE:
                continue
            seq.credit += (now - seq.accounted_at) / interval
            seq.accounted_at = now
            count = min(int(seq.credit), seq.target - seq.generated)
            if count <= 0:
                continue
            seq.credit -= count
            if not self._grow(seq, count):
                continue
            self._emit(seq, count, now)
            tokens += count
            if seq.generated >= seq.target:
                self._finish(seq, now, seq.end_reason)
        self._decoding = [seq for seq in self._decoding if seq.phase is Phase.DECODE]
        return tokens

    def _grow(self, seq: Sequence, count: int) -> bool:
        """Reserve KV blocks for `count` more tokens, preempting if needed; False if `seq` lost."""
        needed = self._blocks_for(seq.prompt_tokens + seq.generated + count) - seq.blocks
        while needed > 0 and self.used_blocks + needed > self._config.kv_blocks:
            victim = next(reversed(self._running))
            self._preempt(victim)
            if victim is seq:
                return False
        seq.blocks += max(0, needed)
        self.used_blocks += max(0, needed)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.phase = Phase.WAITING
        seq.credit = 0.0
        self.waiting.appendleft(seq)
        self._metrics.preemptions += 1

    def _emit(self, seq: Sequence, count: int, now: float) -> None:
        if seq.first_token_at is None:
            seq.first_token_at = now
            self._metrics.time_to_first_token.observe(now - seq.arrival)
        elif seq.last_token_at is not None:
            self._metrics.inter_token_latency.observe((now - seq.last_token_at) / count, count)
        seq.generated += count
        seq.last_token_at = now
        self._metrics.generation_tokens += count
        seq.notify()

    def _finish(self, seq: Sequence, now: float, reason: str) -> None:
        if reason != "abort" and seq.answer_hashes is not None:
            self.prefix_cache.insert(seq.answer_hashes())
        self._release(seq)
        seq.phase = Phase.FINISHED
        seq.finish_reason = reason
        seq.finished_at = now
        self._metrics.on_finished(seq)
        seq.notify()

    def _release(self, seq: Sequence) -> None:
        if seq in self._running:
            del self._running[seq]
            self.used_blocks -= seq.blocks
        seq.blocks = 0

    def _blocks_for(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / self._config.block_size))


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

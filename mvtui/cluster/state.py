"""The cluster as the router sees it: each server's health, load, models and counters.

Plain objects mutated on the event loop by the poller and the proxy; the UI and the
headless log read them. Nothing here does I/O.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from statistics import median
from typing import Any

from mvtui.cluster.fleet_status import FleetStatus
from mvtui.config.schema import ServerConfig, TimingConfig
from mvtui.errors import UnknownServer
from mvtui.routing.breaker import Breaker
from mvtui.routing.speed import AnswerLength, Latency, Speed

Clock = Callable[[], float]
log = logging.getLogger(__name__)


class Health(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class HealthTracker:
    """Hysteresis: down after `fail_threshold` failures in a row, up after `recover_threshold`
    successes in a row. Nothing is averaged over the server's life."""

    def __init__(self, fail_threshold: int = 3, recover_threshold: int = 2) -> None:
        self.fail_threshold = fail_threshold
        self.recover_threshold = recover_threshold
        self.state = Health.UNKNOWN
        self.failures = 0
        self.successes = 0
        self.last_error = ""

    def success(self) -> bool:
        """Record a good answer; True when the state changed."""
        self.failures = 0
        self.successes += 1
        if self.state is not Health.UP and (self.state is Health.UNKNOWN or self.successes >= self.recover_threshold):
            self.state = Health.UP
            return True
        return False

    def failure(self, error: str, *, at_once: bool = False) -> bool:
        """Record a failure; `at_once` (connection refused) skips the count. True on change."""
        self.successes = 0
        self.failures += 1
        self.last_error = error
        if self.state is not Health.DOWN and (at_once or self.failures >= self.fail_threshold):
            self.state = Health.DOWN
            return True
        return False


@dataclass
class EngineMetrics:
    """One scrape of a server's /metrics, summed over engines and models."""

    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float | None = None
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    requests_finished: float = 0.0
    preemptions: float = 0.0
    prefix_cache_queries: float = 0.0
    prefix_cache_hits: float = 0.0
    sleep_state: str | None = None
    scraped_at: float = 0.0
    # vLLM's TTFT and inter-token latency histograms, per model (their sums and counts).
    latency: dict[str, Latency] = field(default_factory=dict)


class RateHistory:
    """Per-second rates from a monotonically increasing counter, for sparklines."""

    def __init__(self, length: int = 60) -> None:
        self.values: deque[float] = deque(maxlen=length)
        self._last: tuple[float, float] | None = None

    def sample(self, total: float, now: float) -> None:
        if self._last is not None:
            last_total, last_time = self._last
            elapsed = now - last_time
            if elapsed <= 0:
                return
            self.values.append(max(0.0, total - last_total) / elapsed)
        self._last = (total, now)

    @property
    def latest(self) -> float:
        return self.values[-1] if self.values else 0.0

    def recent(self, samples: int = 4) -> float:
        """The mean of the last few per-scrape rates: one scrape interval alone is too jumpy to read."""
        window = list(self.values)[-samples:]
        return sum(window) / len(window) if window else 0.0


@dataclass
class ServerStats:
    """The router's own counters for one server."""

    requests: int = 0
    errors: int = 0
    retries: int = 0
    ttft: deque[float] = field(default_factory=lambda: deque(maxlen=200))
    request_rate: RateHistory = field(default_factory=RateHistory)
    token_rate: RateHistory = field(default_factory=RateHistory)

    @property
    def ttft_p50(self) -> float | None:
        return median(self.ttft) if self.ttft else None


class Server:
    """A vLLM server behind the router."""

    def __init__(self, config: ServerConfig, timing: TimingConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.health = HealthTracker(timing.fail_threshold, timing.recover_threshold)
        self.metrics = EngineMetrics()
        self.discovered_models: tuple[str, ...] = ()
        self.model_cards: list[dict[str, Any]] = []
        self.in_flight = 0
        self.sent_total = 0
        self.sent_at_scrape = 0
        self.drain = config.drain
        self.sleep_level = 0
        self.waking = False
        self.sleep_pending = False
        self.sleep_capable: bool | None = None
        # Bumped at every sleep/wake transition; a poll answer issued before it is stale.
        self.sleep_epoch = 0
        self.lifecycle: str | None = None
        self.removed = False
        self.last_error = ""
        # False while /metrics answers with an error (an OpenAI server without vLLM's metrics).
        self.metrics_available: bool | None = None
        self.poll_crashes = 0  # times its poll task failed unexpectedly and was restarted
        self.last_used = clock()
        self.stats = ServerStats()
        self.breaker = Breaker()  # the router's circuit breaker for it (router/proxy.py)
        # From /metrics, for the queue: requests the server runs or queues that the router did
        # not send (other clients), the most it was seen running, and whether it was ever
        # seen queueing (then that most is its number of slots).
        self.external = 0.0
        self.peak_running = 0.0
        self.saturated = False
        # With [cluster] redis_url (mvtui/fleet/): the other replicas' requests in flight to it,
        # fresh within a heartbeat (0 alone or while Redis is away), what they were at the last
        # scrape, and how many requests of its own this replica may have there until the next
        # heartbeat (its share of the slots the fleet saw free; None: no such limit).
        self.remote_in_flight = 0
        self.remote_at_scrape = 0
        self.fleet_cap: int | None = None
        # What the router learned of its speed, per model it serves (routing/speed.py).
        self.speeds: dict[str, Speed] = {}

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def display_url(self) -> str:
        """The URL without credentials, for people, logs and status endpoints."""
        return self.config.display_url

    @property
    def url_has_credentials(self) -> bool:
        """`user:password@` in the URL: they are the connection's Authorization."""
        return self.display_url != self.url

    @property
    def name(self) -> str:
        return self.config.label

    @property
    def capacity(self) -> int:
        return self.config.max_concurrent_requests

    @property
    def models(self) -> tuple[str, ...]:
        return self.config.models or self.discovered_models

    @property
    def running(self) -> float:
        return self.metrics.running

    @property
    def waiting(self) -> float:
        return self.metrics.waiting

    def current_rates(self) -> tuple[float, float]:
        """Requests/s and tokens/s now; a server that is down or asleep is not scraped, so its
        history (still drawn in the sparklines) says nothing about now."""
        if not self.is_up or self.asleep:
            return 0.0, 0.0
        return self.stats.request_rate.recent(), self.stats.token_rate.recent()

    @property
    def has_metrics(self) -> bool | None:
        """vLLM's /metrics answer (None until the first scrape): views show "no metrics"
        instead of zeros when False, and load comes from the router's own counts."""
        return self.metrics_available

    @property
    def breaker_state(self) -> str:
        """`closed`, `open` or `half-open` (one probe request out)."""
        return self.breaker.state.value

    @property
    def slot_limit(self) -> int | None:
        """How many requests it may have at once before new ones wait in the router's queue:
        its stated capacity; without one, the most it was seen running once it was seen
        queueing (from /metrics); None (no limit) until then."""
        config = self.config
        if config.capacity_set:
            return config.max_concurrent_requests
        if self.saturated and self.metrics_available:
            return max(self.capacity, int(self.peak_running))
        return None

    @property
    def total_in_flight(self) -> int:
        """Requests in flight to it from this replica and every other one of the fleet."""
        return self.in_flight + self.remote_in_flight

    @property
    def held(self) -> float:
        """The requests it has now: in flight from every replica, plus what other clients have
        there (from /metrics)."""
        held: float = self.in_flight + self.remote_in_flight
        outside = self.external - self.remote_at_scrape  # /metrics counted the fleet's too
        return held + outside if outside > 0 else held

    @property
    def slots(self) -> int:
        """How many requests it runs at once: its slot limit, else its stated capacity."""
        return self.slot_limit or self.capacity

    @property
    def has_room(self) -> bool:
        """A new request would start at once: what it holds (`held`) stays under its slot limit."""
        limit = self.slot_limit
        if limit is None:
            return True
        return self.held < limit and (self.fleet_cap is None or self.in_flight < self.fleet_cap)

    def speed_of(self, model: str) -> Speed | None:
        return self.speeds.get(model)

    def learned_speed(self, model: str) -> Speed | None:
        """The speed to learn into for `model`: one per model it serves, nothing for others
        (so that made-up model names cannot grow it)."""
        speed = self.speeds.get(model)
        if speed is None and self.serves(model):
            speed = self.speeds[model] = Speed()
        return speed

    @property
    def speed(self) -> Speed | None:
        """Its speed for its first model: what the views show."""
        for model in self.models:
            speed = self.speeds.get(model)
            if speed is not None and (speed.ttft is not None or speed.tpot is not None):
                return speed
        return None

    @property
    def sent_since_scrape(self) -> int:
        if self.metrics_available is False:
            return self.total_in_flight  # no scrape will ever count them: what is open is the load
        # the other replicas' sends since the scrape show as growth of their requests in flight
        return self.sent_total - self.sent_at_scrape + max(0, self.remote_in_flight - self.remote_at_scrape)

    @property
    def is_up(self) -> bool:
        return self.health.state is Health.UP

    @property
    def asleep(self) -> bool:
        return self.sleep_level > 0 or self.waking

    @property
    def routable(self) -> bool:
        """May get new requests."""
        return (
            self.is_up
            and not self.drain
            and not self.removed
            and not self.asleep
            and not self.sleep_pending
            and self.lifecycle in (None, "running")
        )

    @property
    def load(self) -> float:
        """mvllm's load, kept fresh with what the router sent since the last scrape."""
        return (self.running + 0.5 * self.waiting + self.sent_since_scrape) / self.capacity

    @property
    def state(self) -> str:
        """One word for people: what the dashboard and /load-stats show."""
        if self.lifecycle and self.lifecycle != "running":
            return self.lifecycle
        if self.removed:
            return "removing"
        if self.waking:
            return "waking"
        if self.sleep_level:
            return f"sleeping L{self.sleep_level}"
        if self.drain or self.sleep_pending:
            return "draining" if self.in_flight else "drained"
        return self.health.state.value

    def serves(self, model: str) -> bool:
        return model in self.models

    def scraped(self, metrics: EngineMetrics, sent_before_scrape: int, in_flight_before: int | None = None) -> None:
        """A scrape answered; what was sent before it was issued is now in its numbers.
        `in_flight_before`: the router's requests in flight when it was issued."""
        previous = self.metrics if self.metrics_available else None
        self.metrics = metrics
        self.metrics_available = True
        self.sent_at_scrape = max(self.sent_at_scrape, sent_before_scrape)
        self.remote_at_scrape = self.remote_in_flight
        ours = max(self.in_flight, in_flight_before if in_flight_before is not None else self.in_flight)
        self.external = max(0.0, metrics.running + metrics.waiting - ours)
        self.peak_running = max(self.peak_running, metrics.running)
        self.saturated = self.saturated or metrics.waiting >= 1
        self.stats.request_rate.sample(metrics.requests_finished, metrics.scraped_at)
        self.stats.token_rate.sample(metrics.generation_tokens, metrics.scraped_at)
        self._learn_from_histograms(previous.latency if previous is not None else {}, metrics.latency)

    def _learn_from_histograms(self, before: dict[str, Latency], now: dict[str, Latency]) -> None:
        """vLLM's histograms between two scrapes: the mean TTFT and time per output token of
        every request it served meanwhile, other clients' included."""
        for model, latency in now.items():
            speed = self.learned_speed(model)
            if speed is None or model not in before:
                continue
            ttft, tpot = latency.since(before[model])
            if ttft is not None or tpot is not None:
                count = ttft[1] if ttft is not None else 1.0
                speed.observe(ttft[0] if ttft else None, tpot[0] if tpot else None, count)

    def metrics_failed(self) -> None:
        """/metrics answered, with an error: its old numbers are no longer true."""
        self.metrics = EngineMetrics()
        self.metrics_available = False
        self.external, self.peak_running, self.saturated = 0.0, 0.0, False

    def request_started(self) -> None:
        self.in_flight += 1
        self.sent_total += 1
        self.stats.requests += 1
        self.last_used = self.clock()

    def request_finished(self) -> None:
        self.in_flight -= 1
        self.last_used = self.clock()


@dataclass(frozen=True)
class ClusterEvent:
    kind: str
    server: str
    message: str
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class RequestRecord:
    at: float
    method: str
    path: str
    model: str
    server: str
    status: int
    latency: float
    ttft: float | None
    tokens: int | None
    retries: int


@dataclass
class QueueStats:
    """One model's queue in the router (router/queue.py keeps it current; views read it)."""

    depth: int = 0  # requests waiting now
    oldest_since: float | None = None  # since when (monotonic) the first of them waits
    admitted: int = 0  # requests that waited, then went to a server
    full: int = 0  # answered 429: `queue_size` were waiting already
    timed_out: int = 0  # answered 408: waited `queue_timeout` (or `max_request_time`)
    wait_total: float = 0.0  # seconds the admitted ones waited, together
    last_wait: float = 0.0  # seconds the last admitted one waited

    def oldest_wait(self, now: float) -> float:
        return now - self.oldest_since if self.oldest_since is not None else 0.0

    @property
    def mean_wait(self) -> float:
        return self.wait_total / self.admitted if self.admitted else 0.0


Listener = Callable[[ClusterEvent], None]


class Cluster:
    """Every server, by URL, plus the recent request log and change listeners."""

    def __init__(self, timing: TimingConfig | None = None, clock: Clock = time.monotonic, log_length: int = 500) -> None:
        self.timing = timing or TimingConfig()
        self.clock = clock
        self.servers: dict[str, Server] = {}
        self.request_log: deque[RequestRecord] = deque(maxlen=log_length)
        # The last events, for views that open after they happened (the dashboard's pane).
        self.events: deque[ClusterEvent] = deque(maxlen=200)
        # Background parts of mvtui that crashed and are being restarted: part -> what happened.
        self.faults: dict[str, str] = {}
        # The replicas sharing this cluster through Redis ([cluster] redis_url); None alone.
        self.fleet: FleetStatus | None = None
        self._listeners: list[Listener] = []
        self.rejected = 0  # requests the router answered itself with an error (401, 404, 413...)
        # The router's queue of each model that ever had one (router/queue.py); model -> stats.
        self.queues: dict[str, QueueStats] = {}
        # How long each served model's answers are (routing/speed.py), for `fastest`.
        self.answer_lengths: dict[str, AnswerLength] = {}

    def __iter__(self) -> Iterator[Server]:
        return iter(list(self.servers.values()))

    def __len__(self) -> int:
        return len(self.servers)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def part_fault(self, part: str, problem: str | None, *, lasting: bool = True) -> None:
        """A background part crashed (problem) or runs again (None). A lasting fault (a part
        being restarted) is kept for /health until it runs again; every one is an event."""
        if problem is None:
            if self.faults.pop(part, None) is not None:
                self.emit("restarted", part, "running again")
            return
        if lasting:
            self.faults[part] = problem
        self.emit("crash", part, problem)

    def emit(self, kind: str, server: Server | str, message: str) -> None:
        event = ClusterEvent(kind, server if isinstance(server, str) else server.name, message)
        self.events.append(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # one broken view must not stop the poller or the proxy
                log.exception("a listener failed on the event %r", event)

    def find(self, key: str) -> Server | None:
        """A server by URL, name or host:port."""
        if key in self.servers:
            return self.servers[key]
        for server in self.servers.values():
            if key in (server.name, server.config.name) or server.url.endswith("//" + key):
                return server
        return None

    def require(self, key: str) -> Server:
        """The server named `key` (name, URL or host:port); UnknownServer names the others."""
        server = self.find(key)
        if server is None:
            names = ", ".join(server.name for server in self) or "none"
            raise UnknownServer(f"no server named {key!r}; servers: {names}")
        return server

    def add(self, config: ServerConfig) -> Server:
        server = Server(config, self.timing, self.clock)
        self.servers[config.url] = server
        self.emit("added", server, f"added {server.display_url}")
        return server

    def forget(self, server: Server) -> None:
        if self.servers.get(server.url) is server:
            del self.servers[server.url]
            self.emit("removed", server, f"removed {server.display_url}")

    def apply(self, configs: Iterable[ServerConfig], timing: TimingConfig | None = None) -> list[Server]:
        """Match servers by URL: keep state of unchanged ones, add new ones, mark gone ones
        removed (they finish in flight, then the caller forgets them). Returns new servers."""
        if timing is not None:
            self.timing = timing
        wanted = {config.url: config for config in configs}
        added = []
        for url, config in wanted.items():
            server = self.servers.get(url)
            if server is None:
                added.append(self.add(config))
                continue
            self._update(server, config)
        for server in list(self.servers.values()):
            if server.url not in wanted and server.lifecycle is None and not server.removed:
                server.removed = True
                self.emit("removing", server, "no longer in the config in force; finishing requests in flight")
        return added

    def _update(self, server: Server, config: ServerConfig) -> None:
        if server.removed:
            server.removed = False
            self.emit("restored", server, "back in the config")
        if config.drain != server.config.drain:
            server.drain = config.drain
        server.config = config
        server.health.fail_threshold = self.timing.fail_threshold
        server.health.recover_threshold = self.timing.recover_threshold

    def models(self, *, routable_only: bool = False) -> list[str]:
        names: dict[str, None] = {}
        for server in self.servers.values():
            if server.removed or (routable_only and not server.is_up):
                continue
            names.update(dict.fromkeys(server.models))
        return sorted(names)

    def serving(self, model: str) -> list[Server]:
        return [server for server in self.servers.values() if not server.removed and server.serves(model)]

    def routable(self, model: str) -> list[Server]:
        return [server for server in self.servers.values() if server.routable and server.serves(model)]

    def record(self, record: RequestRecord) -> None:
        self.request_log.append(record)

    def summary(self) -> ClusterSummary:
        servers = list(self.servers.values())
        # A down or sleeping server is not scraped: its last rates are history, not now.
        scraped = [server for server in servers if server.is_up and not server.asleep]
        return ClusterSummary(
            up=sum(server.is_up for server in servers),
            total=len(servers),
            request_rate=sum(server.stats.request_rate.latest for server in scraped),
            token_rate=sum(server.stats.token_rate.latest for server in scraped),
            errors=sum(server.stats.errors for server in servers) + self.rejected,
            retries=sum(server.stats.retries for server in servers),
            in_flight=sum(server.in_flight for server in servers),
            queued=sum(stats.depth for stats in self.queues.values()),
        )

    def answer_length(self, model: str) -> AnswerLength:
        """Call only for a model some server serves: the table grows by model."""
        length = self.answer_lengths.get(model)
        if length is None:
            length = self.answer_lengths[model] = AnswerLength()
        return length

    def queue_depth(self, model: str) -> int:
        """Requests for `model` waiting in the router now."""
        stats = self.queues.get(model)
        return stats.depth if stats is not None else 0


@dataclass(frozen=True)
class ClusterSummary:
    up: int
    total: int
    request_rate: float
    token_rate: float
    errors: int
    retries: int
    in_flight: int
    queued: int = 0  # requests waiting in the router's queues (every model)

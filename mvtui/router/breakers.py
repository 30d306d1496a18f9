"""The circuit breakers of every server, as the proxy uses them: which servers may get a
request now, and each try's verdict. A change of state is a cluster event (the dashboard's
events, the headless log); `/load-stats` and `/metrics` read the state from each server.

The state machine itself is `mvtui.routing.breaker`; `[router] breaker`, `breaker_failures`,
`breaker_cooldown` and `breaker_max_cooldown` set it, live.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

from mvtui.cluster.state import Cluster, Server
from mvtui.config.schema import Config, RouterConfig
from mvtui.routing.breaker import BreakerSettings, BreakerState

Clock = Callable[[], float]


class Breakers:
    def __init__(self, cluster: Cluster, config: Callable[[], Config], clock: Clock = time.monotonic) -> None:
        self.cluster = cluster
        self.config = config
        self.clock = clock
        self._router: RouterConfig | None = None
        self._settings = BreakerSettings()
        self.tripped: set[str] = set()  # servers whose breaker is not closed: the rest cost nothing

    @property
    def settings(self) -> BreakerSettings:
        """From the config in force; turning breakers off closes every one of them."""
        router = self.config().router
        if router is not self._router:
            self._router = router
            self._settings = BreakerSettings(router.breaker, router.breaker_failures, router.breaker_cooldown, router.breaker_max_cooldown)
            if not router.breaker:
                for server in self.cluster:
                    self._report(server, server.breaker.reset(), "turned off")
        return self._settings

    def allowed(self, servers: list[Server], excluded: set[str], now: float) -> list[Server]:
        """The servers a request may go to now: not excluded, and with a breaker that lets it
        (the list given, when every breaker is closed and none is excluded)."""
        if not self.tripped or not self.settings.enabled:
            return [server for server in servers if server.url not in excluded] if excluded else servers
        return [server for server in servers if server.url not in excluded and server.breaker.allows(now)]

    def retry_after(self, servers: Iterable[Server], now: float) -> int:
        """Whole seconds until the first of these breakers lets a probe through (at least 1)."""
        waits = [server.breaker.retry_in(now) for server in servers if server.breaker.state is BreakerState.OPEN]
        return max(1, math.ceil(min(waits, default=1.0)))

    def dispatched(self, server: Server) -> None:
        if server.breaker.state is not BreakerState.CLOSED:
            self._report(server, server.breaker.dispatched(), "one probe request let through")

    def succeeded(self, server: Server) -> None:
        breaker = server.breaker
        if breaker.failures or breaker.state is not BreakerState.CLOSED:
            self._report(server, breaker.succeeded(), "the probe succeeded")

    def failed(self, server: Server) -> None:
        breaker = server.breaker
        probing = breaker.state is BreakerState.HALF_OPEN
        changed = breaker.failed(self.clock(), self.settings)
        if changed is not None:
            why = "the probe failed" if probing else f"{breaker.failures} failed tries in a row"
            self._report(server, changed, f"for {breaker.cooldown:g} s: {why}")

    def released(self, server: Server) -> None:
        """The try ended without a verdict (its client left, or its time ran out)."""
        if server.breaker.state is BreakerState.HALF_OPEN:
            self._report(server, server.breaker.released(self.clock()), "the probe was abandoned; the next request probes")

    def _report(self, server: Server, state: BreakerState | None, why: str) -> None:
        if state is None:
            return
        if state is BreakerState.CLOSED:
            self.tripped.discard(server.url)
        else:
            self.tripped.add(server.url)
        self.cluster.emit("breaker", server, f"circuit breaker {state.value}: {why}")

"""Run-time switches (faults) and the counters tests read back (stats)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from mvtui.sim.config import SimConfig


class FaultUpdateError(ValueError):
    pass


@dataclass
class Faults:
    fail_rate: float = 0.0  # share of inference requests answered 500 before any byte
    hang: bool = False  # accept inference requests and never answer
    slow: float = 1.0  # multiplies prefill and per-token time
    cut_after_tokens: int | None = None  # drop the connection once N tokens went out
    dead: bool = False  # /health answers 503, inference requests 500
    cut_body: bool = False  # non-streamed answers: headers and half the body, then the connection closes
    stall_body: bool = False  # non-streamed answers: headers and half the body, then silence
    redirect_to: str | None = None  # inference requests answered 307 to this URL (its own: a loop)
    pad_answer_bytes: int = 0  # non-streamed answers carry this many more bytes (a huge answer)

    @classmethod
    def from_config(cls, config: SimConfig) -> Faults:
        return cls(config.fail_rate, config.hang, config.slow, config.cut_after_tokens)

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update, all or nothing; `exit` is handled by the server."""
        unknown = set(changes) - {f.name for f in fields(self)} - {"exit"}
        if unknown:
            raise FaultUpdateError(f"unknown fault(s): {', '.join(sorted(unknown))}")
        candidate = Faults(**asdict(self))
        for name, value in changes.items():
            if name != "exit":
                setattr(candidate, name, _checked(name, value))
        for f in fields(self):
            setattr(self, f.name, getattr(candidate, f.name))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _checked(name: str, value: Any) -> Any:
    if name == "redirect_to":
        if value is None or isinstance(value, str):
            return value
        raise FaultUpdateError("redirect_to must be a URL or null")
    if name == "pad_answer_bytes":
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise FaultUpdateError("pad_answer_bytes must be a non-negative integer")
    if name in ("hang", "dead", "cut_body", "stall_body"):
        if not isinstance(value, bool):
            raise FaultUpdateError(f"{name} must be true or false")
        return value
    if name == "cut_after_tokens":
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise FaultUpdateError("cut_after_tokens must be a non-negative integer or null")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FaultUpdateError(f"{name} must be a number")
    if name == "fail_rate" and not 0.0 <= value <= 1.0:
        raise FaultUpdateError("fail_rate must be within 0..1")
    if name == "slow" and value <= 0:
        raise FaultUpdateError("slow must be > 0")
    return float(value)


@dataclass
class RequestCounters:
    """What happened at the HTTP edge, before or beside the engine."""

    received: int = 0  # inference requests that reached a handler, whatever became of them
    requests: int = 0  # inference requests admitted to the engine
    failed: int = 0  # answered 500 by the fail_rate fault or while dead
    hung: int = 0
    cut: int = 0
    requests_while_sleeping: int = 0  # arrived while the engine slept or was waking
    requests_without_weights: int = 0  # arrived after a level 2 wake, before reload_weights


@dataclass(frozen=True)
class SimStats:
    running: int
    waiting: int
    aborted: int
    finished: int
    received: int
    requests: int
    failed: int
    hung: int
    cut: int
    preemptions: int
    kv_cache_usage: float
    requests_while_sleeping: int
    requests_without_weights: int
    sleeping: bool
    sleep_level: int
    sleep_count: int
    wake_count: int
    sleeps_with_inflight: int
    weights_loaded: bool
    prefix_cache_reset_needed: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

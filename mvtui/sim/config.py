"""Options of the simulated vLLM server, and their command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

SLEEP_REQUEST_MODES = ("hang", "fail")


@dataclass(frozen=True)
class SimConfig:
    model: str = "demo"
    host: str = "127.0.0.1"
    port: int = 0
    max_num_seqs: int = 8
    tokens_per_s: float = 40.0
    ttft_ms: float = 40.0
    prompt_ms_per_token: float = 0.02
    kv_blocks: int = 512
    block_size: int = 16
    max_model_len: int = 4096
    default_max_tokens: int = 64
    enable_sleep_mode: bool = False
    wake_ms_l1: float = 300
    wake_ms_l2: float = 1500
    startup_ms: float = 0
    legacy_metrics: bool = False
    api_key: str | None = None
    fail_rate: float = 0.0
    hang: bool = False
    slow: float = 1.0
    cut_after_tokens: int | None = None
    seed: int = 0
    lora: tuple[str, ...] = ()
    # What a generation request meets while the engine sleeps: "hang" (like newer vLLM
    # builds: it waits until the engine is woken) or "fail" (an immediate 500).
    sleep_requests: str = "hang"

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid simulator config: " + "; ".join(problems))

    def problems(self) -> list[str]:
        checks = [
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.tokens_per_s > 0, "tokens_per_s must be > 0"),
            (self.ttft_ms >= 0 and self.prompt_ms_per_token >= 0, "ttft_ms and prompt_ms_per_token must be >= 0"),
            (self.kv_blocks >= 1 and self.block_size >= 1, "kv_blocks and block_size must be >= 1"),
            (self.max_model_len >= 2, "max_model_len must be >= 2"),
            (self.default_max_tokens >= 1, "default_max_tokens must be >= 1"),
            # vLLM refuses to start when one full-length sequence cannot fit in the KV cache.
            (
                self.kv_blocks * self.block_size >= self.max_model_len,
                f"kv_blocks*block_size ({self.kv_blocks * self.block_size}) must hold max_model_len ({self.max_model_len})",
            ),
            (0.0 <= self.fail_rate <= 1.0, "fail_rate must be within 0..1"),
            (self.slow > 0, "slow must be > 0"),
            (self.cut_after_tokens is None or self.cut_after_tokens >= 0, "cut_after_tokens must be >= 0"),
            (min(self.wake_ms_l1, self.wake_ms_l2, self.startup_ms) >= 0, "wake and startup delays must be >= 0"),
            (self.sleep_requests in SLEEP_REQUEST_MODES, f"sleep_requests must be one of {SLEEP_REQUEST_MODES}"),
            (self.model not in self.lora, "a LoRA adapter cannot share the base model's name"),
        ]
        return [message for ok, message in checks if not ok]

    @property
    def served_names(self) -> tuple[str, ...]:
        return (self.model, *self.lora)


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """The `mvtui sim` options; names follow `vllm serve` where vLLM has one."""
    d = SimConfig()
    add = parser.add_argument
    add("--port", type=int, required=True, help="port to listen on")
    add("--model", default=d.model, help="served model name (default %(default)s)")
    add("--host", default=d.host, help="address to bind (default %(default)s)")
    add("--max-num-seqs", type=int, default=d.max_num_seqs, help="sequences decoded at once; the rest wait")
    add("--tokens-per-s", type=float, default=d.tokens_per_s, help="decode speed of one sequence")
    add("--ttft-ms", type=float, default=d.ttft_ms, help="fixed prefill cost of a request")
    add("--prompt-ms-per-token", type=float, default=d.prompt_ms_per_token, help="prefill cost per prompt token")
    add("--kv-blocks", type=int, default=d.kv_blocks, help="KV cache size in blocks")
    add("--block-size", type=int, default=d.block_size, help="tokens per KV block")
    add("--max-model-len", type=int, default=d.max_model_len, help="longest prompt+output accepted")
    add("--default-max-tokens", type=int, default=d.default_max_tokens, help="output length when a request sets none")
    add("--enable-sleep-mode", action="store_true", help="sleep API (also needs VLLM_SERVER_DEV_MODE=1)")
    add("--wake-ms-l1", type=float, default=d.wake_ms_l1, help="wake-up time after a level 1 sleep")
    add("--wake-ms-l2", type=float, default=d.wake_ms_l2, help="wake-up time after a level 2 sleep")
    add(
        "--sleep-requests",
        choices=SLEEP_REQUEST_MODES,
        default=d.sleep_requests,
        help="a generation request sent to a sleeping engine hangs until woken, or fails with 500",
    )
    add("--startup-ms", type=float, default=d.startup_ms, help="delay before listening (weights loading)")
    add("--legacy-metrics", action="store_true", help="vLLM <= 0.10 metric names (gpu_cache_usage_perc)")
    add("--api-key", default=d.api_key, help="require 'Authorization: Bearer KEY' on /v1 routes")
    add("--fail-rate", type=float, default=d.fail_rate, help="share of generation requests answered 500")
    add("--hang", action="store_true", help="accept inference requests and never answer")
    add("--slow", type=float, default=d.slow, help="multiplies prefill and token time")
    add("--cut-after-tokens", type=int, default=d.cut_after_tokens, help="drop the connection after N tokens")
    add("--seed", type=int, default=d.seed, help="seed of generated text and of faults")
    add("--lora", nargs="+", action="extend", default=[], metavar="NAME", help="LoRA adapter names to serve")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    values = {f.name: getattr(args, f.name) for f in fields(SimConfig) if hasattr(args, f.name)}
    values["lora"] = tuple(values.get("lora") or ())
    return SimConfig(**values)

"""mvtui: one program to watch, steer and front a cluster of vLLM servers."""

__version__ = "0.1.0"
